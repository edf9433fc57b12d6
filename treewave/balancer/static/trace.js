// treewave status page: the space-time diagram of a traced wave, with replay.
// One lane per participant (the balancer first), time left to right in causal order
// (one column per event, from the trace's `step`), one arrow per message from its send
// to its receive, a diamond per decision. Echo: the spanning tree is highlighted as it
// forms; Finn: each lane shows its inc/ninc sizes growing and when it decides.
// Data: GET /api/waves and /api/waves/{id}; new traces arrive as `trace` events on
// /api/events. Plain ES2017, no dependencies, works offline.
(function () {
  "use strict";

  const STATS_W = 118; // room for "inc 30 · ninc 30 ✓" or "← a-long-name ✓"
  const TOP = 20;
  const RIGHT = 24;
  const BASE_DELAY_MS = 450;

  function $(id) { return document.getElementById(id); }
  const panel = $("trace-panel");
  if (!panel) return;
  const svg = $("trace-svg");
  const SVGNS = svg.namespaceURI; // the SVG namespace, without a URL in this file
  const box = $("trace-box");

  const st = {
    trace: null,
    pos: 0,
    timer: null,
    follow: true, // "latest" selected: new traces replace the diagram and play
    waves: [],
    geom: null,
    items: [], // per event index: the SVG element drawn for it
    laneStats: new Map(),
    laneGroups: new Map(),
  };

  function svgEl(tag, attrs, parent) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function clamp(v, lo, hi) { return Math.max(lo, Math.min(hi, v)); }

  function msText(seconds, origin) {
    if (seconds === null || seconds === undefined) return "–";
    return ((seconds - origin) * 1000).toFixed(2) + " ms";
  }

  function clockText(clock) {
    if (!clock) return "–";
    return "{" + Object.entries(clock).map(([k, v]) => `${k}:${v}`).join(", ") + "}";
  }

  async function getJSON(path) {
    let resp;
    try {
      resp = await fetch(path, { headers: { Accept: "application/json" } });
    } catch (err) {
      throw new Error(`GET ${path}: cannot reach the balancer (${err.message})`);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      throw new Error(`GET ${path} failed (HTTP ${resp.status}): ${(data && data.error) || text}`);
    }
    return data;
  }

  // --- drawing --------------------------------------------------------------------------

  // The label column fits the longest name plus the per-lane stats.
  function labelWidth(trace) {
    const holder = svgEl("g", { class: "lane" }, svg);
    const probe = svgEl("text", { class: "lane-name", x: 0, y: -100 }, holder);
    let widest = 0;
    for (const name of trace.lanes) {
      probe.textContent = name;
      widest = Math.max(widest, probe.getComputedTextLength());
    }
    holder.remove();
    return Math.ceil(8 + widest + 10 + STATS_W);
  }

  function geometry(trace) {
    const LABEL_W = labelWidth(trace);
    const lanes = trace.lanes.length;
    const steps = Math.max(trace.steps, 1);
    const availH = Math.max(box.clientHeight, 200);
    const availW = Math.max(box.clientWidth, 400);
    const rowH = clamp(Math.floor((availH - TOP - 10) / lanes), 14, 34);
    const stepW = clamp((availW - LABEL_W - RIGHT) / steps, 5, 40);
    return {
      labelW: LABEL_W,
      rowH,
      stepW,
      width: Math.ceil(LABEL_W + stepW * steps + RIGHT),
      height: Math.ceil(TOP + rowH * lanes + 10),
      lane: new Map(trace.lanes.map((n, i) => [n, i])),
      x: (step) => LABEL_W + (step + 0.5) * stepW,
      y: (i) => TOP + (i + 0.5) * rowH,
    };
  }

  function draw(trace) {
    svg.replaceChildren();
    const g = geometry(trace);
    const LABEL_W = g.labelW;
    st.geom = g;
    svg.replaceChildren();
    svg.setAttribute("width", g.width);
    svg.setAttribute("height", g.height);
    svg.setAttribute("viewBox", `0 0 ${g.width} ${g.height}`);
    svg.dataset.lanes = String(trace.lanes.length);
    svg.dataset.messages = String(trace.messages);
    svg.dataset.wave = trace.wave_id;
    svg.dataset.algorithm = trace.algorithm;

    const defs = svgEl("defs", {}, svg);
    for (const kind of ["explore", "reply", "finn", "tree", "lost"]) {
      const m = svgEl("marker", {
        id: `tw-arrow-${kind}`, viewBox: "0 0 10 10", refX: 9, refY: 5,
        markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse",
      }, defs);
      svgEl("path", { d: "M0,0 L10,5 L0,10 z", class: `arrowhead ${kind}` }, m);
    }

    // Step ruler and lanes.
    const ruler = svgEl("g", { class: "ruler" }, svg);
    const every = g.stepW >= 14 ? 5 : g.stepW >= 7 ? 10 : 25;
    for (let s = 0; s < trace.steps; s += every) {
      svgEl("line", { x1: g.x(s), y1: TOP - 4, x2: g.x(s), y2: g.height - 6, class: "tick" }, ruler);
      const t = svgEl("text", { x: g.x(s), y: TOP - 7, class: "tick-label" }, ruler);
      t.textContent = String(s);
    }
    const missing = new Set(trace.missing || []);
    const lanesG = svgEl("g", { class: "lanes" }, svg);
    st.laneStats = new Map();
    st.laneGroups = new Map();
    trace.lanes.forEach((name, i) => {
      const y = g.y(i);
      const lane = svgEl("g", {
        class: "lane" + (missing.has(name) ? " missing" : "") + (name === "balancer" ? " lane-balancer" : ""),
        "data-name": name,
      }, lanesG);
      svgEl("rect", { x: 0, y: y - g.rowH / 2, width: g.width, height: g.rowH, class: "lane-bg" }, lane);
      svgEl("line", { x1: LABEL_W, y1: y, x2: g.width - RIGHT / 2, y2: y, class: "lane-line" }, lane);
      const label = svgEl("text", { x: 8, y: y + 4, class: "lane-name" }, lane);
      label.textContent = name + (missing.has(name) ? " (no trace)" : "");
      const stats = svgEl("text", { x: LABEL_W - 6, y: y + 4, class: "lane-stats" }, lane);
      st.laneStats.set(name, stats);
      st.laneGroups.set(name, lane);
      const title = svgEl("title", {}, lane);
      title.textContent = missing.has(name)
        ? `${name}: its part of the trace is missing (it did not answer)` : name;
    });

    // Messages and decisions, in the trace's order (the replay order).
    const origin = Math.min(...trace.events.map((e) => e.sent).filter((v) => v !== null && v !== undefined), Infinity);
    const marks = svgEl("g", { class: "marks" }, svg);
    st.items = trace.events.map((e, i) => {
      let node;
      if (e.kind === "decide") {
        const x = g.x(e.step);
        const y = g.y(g.lane.get(e.from));
        const r = clamp(g.rowH * 0.36, 4, 8);
        node = svgEl("path", {
          d: `M${x},${y - r} L${x + r},${y} L${x},${y + r} L${x - r},${y} Z`,
          class: "decide", "data-i": i, "data-from": e.from,
        }, marks);
        const sets = e.inc !== undefined ? ` with |inc| = ${e.inc}, |ninc| = ${e.ninc}` : "";
        svgEl("title", {}, node).textContent =
          `#${i + 1} ${e.from} decides${sets}\nits clock: ${msText(e.sent, origin)}\nvector clock ${clockText(e.clock)}`;
        return node;
      }
      const y1 = g.y(g.lane.get(e.from));
      const y2 = g.y(g.lane.get(e.to));
      const received = e.received !== null && e.received !== undefined;
      const x1 = e.send_step === null || e.send_step === undefined ? LABEL_W + 2 : g.x(e.send_step);
      let x2 = g.x(e.step);
      let y2end = y2;
      if (!received) {
        // Sent, never received (or the receiver's part is missing): a short stub.
        x2 = x1 + Math.max(g.stepW * 1.5, 10);
        y2end = y1 + (y2 - y1) * 0.35;
      }
      const classes = ["msg", e.kind];
      if (e.tree) classes.push("tree");
      if (!received) classes.push("lost");
      if (e.send_step === null || e.send_step === undefined) classes.push("orphan");
      const marker = !received ? "lost" : e.kind === "explore" && e.tree ? "tree" : e.kind;
      node = svgEl("line", {
        x1, y1, x2, y2: y2end, class: classes.join(" "), "data-i": i,
        "data-from": e.from, "data-to": e.to, "marker-end": `url(#tw-arrow-${marker})`,
      }, marks);
      let sets = "";
      if (e.inc !== undefined) {
        sets = `\ncarries |inc| = ${e.inc}, |ninc| = ${e.ninc}, |dec| = ${e.dec}`;
        if (e.known_inc !== undefined) sets += `\n${e.to} then has |inc| = ${e.known_inc}, |ninc| = ${e.known_ninc}`;
      }
      svgEl("title", {}, node).textContent =
        `#${i + 1} ${e.from} → ${e.to}: ${e.kind}${e.tree ? " (spanning-tree edge)" : ""}` +
        `\nsent ${msText(e.sent, origin)} (${e.from}'s clock)` +
        `\nreceived ${received ? msText(e.received, origin) + ` (${e.to}'s clock)` : "– (no receive recorded)"}` +
        `${sets}\nvector clock at the receive ${clockText(e.clock)}`;
      return node;
    });
  }

  // --- replay ---------------------------------------------------------------------------

  function laneState(trace, upto) {
    const lanes = new Map(trace.lanes.map((n) => [n, { inc: null, ninc: null, decided: false, parent: null, echoed: false }]));
    const grow = (name, inc, ninc) => {
      const s = lanes.get(name);
      if (!s || inc === undefined || inc === null) return;
      s.inc = Math.max(s.inc || 0, inc);
      s.ninc = Math.max(s.ninc || 0, ninc);
    };
    for (let i = 0; i < upto; i++) {
      const e = trace.events[i];
      if (e.kind === "decide") {
        const s = lanes.get(e.from);
        if (s) s.decided = true;
        grow(e.from, e.inc, e.ninc);
      } else if (e.kind === "finn") {
        grow(e.from, e.inc, e.ninc);
        if (e.received !== null) grow(e.to, e.known_inc, e.known_ninc);
      } else if (e.kind === "explore" && e.tree && e.received !== null) {
        const s = lanes.get(e.to);
        if (s) s.parent = e.from;
      } else if (e.kind === "reply") {
        const s = lanes.get(e.from);
        if (s) s.echoed = true;
      }
    }
    return lanes;
  }

  function apply() {
    const trace = st.trace;
    if (!trace) {
      for (const id of ["trace-play", "trace-pause", "trace-step", "trace-end", "trace-back", "trace-restart"]) {
        $(id).disabled = true;
      }
      return;
    }
    const n = trace.events.length;
    st.pos = clamp(st.pos, 0, n);
    st.items.forEach((node, i) => {
      node.classList.toggle("future", i >= st.pos);
      node.classList.toggle("shown", i < st.pos);
      node.classList.toggle("current", i === st.pos - 1);
    });
    const lanes = laneState(trace, st.pos);
    for (const [name, s] of lanes) {
      const text = st.laneStats.get(name);
      const group = st.laneGroups.get(name);
      if (!text || !group) continue;
      let label = "";
      if (trace.algorithm === "finn") {
        if (s.inc !== null) label = `inc ${s.inc} · ninc ${s.ninc}`;
        if (s.decided) label += " ✓";
      } else {
        if (s.parent) label = `← ${s.parent}`;
        if (s.echoed) label += " ✓";
        if (name === "balancer" && s.decided) label = "decided ✓";
      }
      text.textContent = label;
      group.classList.toggle("decided", s.decided || (trace.algorithm === "echo" && s.echoed));
    }
    panel.dataset.pos = String(st.pos);
    panel.dataset.total = String(n);
    $("trace-pos").textContent = `${st.pos} / ${n}`;
    $("trace-play").disabled = st.timer !== null || st.pos >= n;
    $("trace-pause").disabled = st.timer === null;
    $("trace-step").disabled = st.pos >= n;
    $("trace-end").disabled = st.pos >= n;
    $("trace-back").disabled = st.pos <= 0;
    $("trace-restart").disabled = st.pos <= 0;
    // Keep the newest event in view while replaying a wide wave.
    const cur = st.items[st.pos - 1];
    if (cur && st.geom && st.timer !== null) {
      const e = trace.events[st.pos - 1];
      const x = st.geom.x(e.step);
      if (x < box.scrollLeft + st.geom.labelW || x > box.scrollLeft + box.clientWidth - 40) {
        box.scrollLeft = Math.max(0, x - box.clientWidth / 2);
      }
    }
  }

  function pause() {
    if (st.timer !== null) clearTimeout(st.timer);
    st.timer = null;
    apply();
  }

  function tick() {
    if (!st.trace || st.pos >= st.trace.events.length) {
      st.timer = null;
      apply();
      return;
    }
    st.pos += 1;
    const speed = parseFloat($("trace-speed").value) || 1;
    st.timer = setTimeout(tick, BASE_DELAY_MS / speed);
    apply();
  }

  function play() {
    if (!st.trace) return;
    if (st.pos >= st.trace.events.length) st.pos = 0;
    if (st.timer !== null) clearTimeout(st.timer);
    st.timer = setTimeout(tick, 0);
    apply();
  }

  function stepBy(delta) {
    if (st.timer !== null) { clearTimeout(st.timer); st.timer = null; }
    st.pos += delta;
    apply();
  }

  // --- loading --------------------------------------------------------------------------

  function info(trace) {
    const p = $("trace-info");
    p.replaceChildren();
    const strong = document.createElement("code");
    strong.textContent = trace.wave_id;
    p.append(`${trace.algorithm === "finn" ? "Finn" : "Echo"} wave `, strong, " · ");
    const state = document.createElement("span");
    state.className = trace.complete ? "ok" : "bad";
    const why = [];
    if ((trace.missing || []).length) why.push(`no trace from ${trace.missing.join(", ")}`);
    if ((trace.wave_missing || []).length) why.push(`the wave missed ${trace.wave_missing.join(", ")}`);
    if (trace.unreceived) why.push(`${trace.unreceived} message${trace.unreceived === 1 ? "" : "s"} with no receive`);
    state.textContent = trace.complete ? "complete trace" : "partial trace" + (why.length ? ": " + why.join("; ") : "");
    p.append(state);
    const decisions = trace.events.filter((e) => e.kind === "decide").length;
    p.append(` · ${trace.messages} messages · ${decisions} decision${decisions === 1 ? "" : "s"}` +
      ` · ${trace.lanes.length} lanes` + (trace.trigger ? ` · started by ${trace.trigger}` : "") +
      (typeof trace.duration_s === "number" ? ` · ${(trace.duration_s * 1000).toFixed(1)} ms` : ""));
  }

  function show(trace, startAt) {
    pause();
    st.trace = trace;
    panel.dataset.wave = trace.wave_id;
    info(trace);
    draw(trace);
    st.pos = startAt === "end" ? trace.events.length : 0;
    box.scrollLeft = 0;
    apply();
  }

  function renderList() {
    const select = $("trace-wave");
    const chosen = select.value;
    const keep = select.options[0];
    select.replaceChildren(keep);
    for (const w of st.waves) {
      const o = document.createElement("option");
      o.value = w.wave_id;
      const state = w.ready === false ? "gathering…" : w.complete ? "complete" : "partial";
      o.textContent = `${w.algorithm} ${w.wave_id} (${w.trigger}, ${state})`;
      select.append(o);
    }
    if (chosen && st.waves.some((w) => w.wave_id === chosen)) select.value = chosen;
  }

  async function refreshList() {
    const listing = await getJSON("/api/waves");
    st.waves = listing.waves || [];
    if (listing.enabled === false) {
      $("trace-info").textContent = "Tracing is off on this balancer (--trace-history 0).";
    }
    renderList();
    return st.waves;
  }

  async function load(waveId, startAt) {
    const trace = await getJSON("/api/waves/" + encodeURIComponent(waveId));
    show(trace, startAt);
  }

  function fail(err) {
    const p = $("trace-info");
    p.replaceChildren();
    const s = document.createElement("span");
    s.className = "bad";
    s.textContent = err.message;
    p.append(s);
  }

  async function onNewTrace(event) {
    try {
      await refreshList();
      if (st.follow && event && event.wave_id) await load(event.wave_id, "start").then(play);
    } catch (err) {
      fail(err);
    }
  }

  // --- controls -------------------------------------------------------------------------

  $("trace-play").addEventListener("click", play);
  $("trace-pause").addEventListener("click", pause);
  $("trace-step").addEventListener("click", () => stepBy(1));
  $("trace-back").addEventListener("click", () => stepBy(-1));
  $("trace-restart").addEventListener("click", () => { stepBy(-st.pos); });
  $("trace-end").addEventListener("click", () => { if (st.trace) stepBy(st.trace.events.length - st.pos); });
  $("trace-wave").addEventListener("change", () => {
    const id = $("trace-wave").value;
    st.follow = id === "";
    const target = id || (st.waves[0] && st.waves[0].wave_id);
    if (target) load(target, "end").catch(fail);
  });
  $("trace-echo").addEventListener("click", async () => {
    const button = $("trace-echo");
    button.disabled = true;
    try {
      const tree = await getJSON("/api/tree");
      // The `trace` event follows; if the stream is down, load it directly.
      if (!window.EventSource) await onNewTrace({ wave_id: tree.wave_id });
    } catch (err) {
      fail(err);
    } finally {
      button.disabled = false;
    }
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (st.trace) { draw(st.trace); apply(); } }, 150);
  });

  // Exposed for tests and for the curious (console): the loaded trace and the position.
  window.treewaveTrace = { state: st, load, play, pause, step: stepBy };

  // --- start ----------------------------------------------------------------------------

  refreshList()
    .then((waves) => { if (waves.length) return load(waves[0].wave_id, "end"); return null; })
    .catch(fail);
  if (window.EventSource) {
    const es = new EventSource("/api/events");
    es.addEventListener("trace", (ev) => onNewTrace(JSON.parse(ev.data)));
  }
  apply();
})();
