// treewave status page: follows /api/events (server-sent events) and updates the
// server-rendered page in place; the action buttons call the balancer's JSON API.
// Plain ES2017, no dependencies, no build step.
(function () {
  "use strict";

  const tree = document.getElementById("tree");
  const overloadPercent = parseFloat(tree.dataset.overloadPercent) || 100;
  // Pressure (expected work per CPU, seconds) comes from the API (core.load.pressure);
  // the bar is full at the lab's overload threshold expressed in seconds.
  const overloadSeconds = (parseFloat(tree.dataset.taskTime) || 2) * overloadPercent / 100;
  const servers = new Map();
  tree.querySelectorAll("g.server").forEach((g) => servers.set(g.dataset.name, g));
  const edges = Array.from(tree.querySelectorAll("path.edge"));
  const MAX_WAVES = 12;

  // Long names are squeezed to fit their box (measured, so any font works).
  tree.querySelectorAll("g.server text.name").forEach((t) => {
    const box = parseFloat(t.parentNode.querySelector("rect.box").getAttribute("width"));
    const room = box - 10;
    t.removeAttribute("textLength");
    if (t.getComputedTextLength() > room) {
      t.setAttribute("textLength", String(room));
      t.setAttribute("lengthAdjust", "spacingAndGlyphs");
    }
  });

  const state = {
    waves: [],
    moves: [],
    movesAt: null,
    clockOffset: 0, // server time minus local time, seconds
  };

  // --- helpers ------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // Squeeze a long stats line into the box instead of letting it overflow.
  function fitText(el, width) {
    if (el.textContent.length > 17) {
      el.setAttribute("textLength", width);
      el.setAttribute("lengthAdjust", "spacingAndGlyphs");
    } else {
      el.removeAttribute("textLength");
      el.removeAttribute("lengthAdjust");
    }
  }

  function ms(seconds) {
    const v = seconds * 1000;
    return (v < 10 ? v.toFixed(1) : Math.round(v).toString()) + " ms";
  }

  function ago(ts) {
    if (!ts) return "";
    const s = Math.max(0, Date.now() / 1000 + state.clockOffset - ts);
    if (s < 60) return Math.floor(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    return Math.floor(s / 3600) + " h";
  }

  // --- rendering ------------------------------------------------------------------------

  function renderServers(status) {
    const snap = status.snapshot;
    const byName = new Map();
    if (snap) for (const n of snap.nodes) byName.set(n.name, n);
    const links = status.links || {};
    for (const [name, g] of servers) {
      const n = byName.get(name);
      const stats = g.querySelector("text.stats");
      const bar = g.querySelector("rect.bar");
      const barMax = parseFloat(g.querySelector("rect.bar-bg").getAttribute("width"));
      g.dataset.link = links[name] ? "up" : "down";
      g.classList.remove("missing", "unknown", "lvl-0", "lvl-1", "lvl-2", "lvl-3", "lvl-4", "lvl-5");
      let tip;
      if (n) {
        const lvl = n.level; // the colour band, from the API (core.load.load_level)
        g.classList.add("lvl-" + lvl);
        g.dataset.running = n.running;
        g.dataset.queued = n.queued;
        g.dataset.cpus = n.cpus;
        g.dataset.missing = "false";
        g.dataset.level = lvl;
        stats.textContent = `run ${n.running}/${n.cpus} · q ${n.queued} · ${n.pressure.toFixed(1)}s`;
        fitText(stats, barMax + 8);
        const ratio = Math.min(1, n.pressure / overloadSeconds);
        bar.setAttribute("width", (barMax * ratio).toFixed(1));
        tip = `${name}\ncpus ${n.cpus} · running ${n.running} · queued ${n.queued}` +
          ` · reserved ${n.reserved}\ncompleted ${n.completed}` +
          `\npressure ${n.pressure.toFixed(2)} s of expected work per cpu` +
          ` (${n.expected_work_s.toFixed(1)} s in all; bar full at ${overloadSeconds.toFixed(1)} s)` +
          `\nEcho parent: ${n.echo_parent || "–"}`;
      } else {
        g.classList.add(snap ? "missing" : "unknown");
        g.dataset.running = "";
        g.dataset.queued = "";
        g.dataset.missing = "true";
        g.dataset.level = "";
        stats.textContent = snap ? "no reply" : "waiting…";
        fitText(stats, barMax + 8);
        bar.setAttribute("width", "0");
        tip = `${name}\nmissing from the last Echo wave`;
      }
      tip += `\nlink from the balancer: ${links[name] ? "up" : "down"}`;
      g.querySelector("title").textContent = tip;
    }
    const pairs = new Set();
    if (snap) {
      for (const n of snap.nodes) {
        if (n.echo_parent) pairs.add([n.echo_parent, n.name].sort().join("|"));
      }
    }
    for (const e of edges) {
      const key = [e.dataset.a, e.dataset.b].sort().join("|");
      e.classList.toggle("echo", pairs.has(key));
    }

    // summary and the Echo line
    const nodes = snap ? snap.nodes : [];
    $("sum-servers").textContent = `${nodes.length}/${servers.size}`;
    $("sum-running").textContent = nodes.reduce((a, n) => a + n.running, 0);
    $("sum-queued").textContent = nodes.reduce((a, n) => a + n.queued, 0);
    $("sum-pressure").textContent = nodes.length
      ? Math.max(...nodes.map((n) => n.pressure)).toFixed(2) + " s" : "–";
    const line = $("echo-line");
    line.replaceChildren();
    if (!snap) {
      line.append("No Echo snapshot yet.");
    } else {
      line.append("Last Echo ", el("code", {}, snap.wave_id), ": ");
      if (snap.complete) line.append(el("span", { class: "ok" }, "complete"));
      else line.append(el("span", { class: "bad" }, "partial, missing " + snap.missing.join(", ")));
      line.append(` · ${snap.messages} messages · ${ms(snap.duration_s)} · ${ago(snap.finished_at)} ago`);
    }
  }

  function renderWaves() {
    const body = $("waves-body");
    const showLive = $("show-live").checked;
    const rows = state.waves.filter((w) => showLive || !w.live).slice(0, MAX_WAVES);
    body.replaceChildren();
    if (!rows.length) {
      body.append(el("tr", { class: "empty" }, el("td", { colspan: "5" },
        showLive ? "no waves yet" : "no waves yet (tick the box to see the page's own Echoes)")));
      return;
    }
    for (const w of rows) {
      const alg = el("span", { class: `alg alg-${w.algorithm}${w.live ? " live" : ""}`,
        title: w.wave_id + (w.live ? " (page refresh)" : "") }, w.algorithm);
      const result = w.complete
        ? el("span", { class: "ok" }, "complete")
        : el("span", { class: "bad" }, "partial: missing " + (w.missing.join(", ") || "?"));
      body.append(el("tr", { "data-wave": w.wave_id },
        el("td", {}, alg), el("td", {}, result),
        el("td", { class: "num" }, w.messages), el("td", { class: "num" }, ms(w.duration_s)),
        el("td", { class: "num ago", "data-ts": w.finished_at }, ago(w.finished_at))));
    }
  }

  const MAX_MOVES = 8;

  function renderMoves() {
    const list = $("moves");
    list.replaceChildren();
    if (!state.moves.length) {
      list.append(el("li", { class: "empty" }, "no tasks moved yet"));
    }
    for (const m of state.moves.slice(0, MAX_MOVES)) {
      list.append(el("li", {}, el("b", {}, m.source), " → ", el("b", {}, m.target),
        `: ${m.tasks} task${m.tasks === 1 ? "" : "s"}`));
    }
    const more = state.moves.length - MAX_MOVES;
    const total = state.moves.reduce((a, m) => a + m.tasks, 0);
    const notes = [];
    if (more > 0) notes.push(`and ${more} more move${more === 1 ? "" : "s"}`);
    if (state.moves.length) notes.push(`${total} task${total === 1 ? "" : "s"} in all`);
    if (state.movesAt) notes.push(`${ago(state.movesAt)} ago`);
    if (notes.length) list.append(el("li", { class: "moves-when" }, notes.join(" · ")));
  }

  // Servers leaving the topology, with what they still hold (GET /api/topology's migration).
  function renderRetiring(migration) {
    const retiring = (migration && migration.retiring) || {};
    const names = Object.keys(retiring).sort();
    $("retiring-card").hidden = names.length === 0;
    const list = $("retiring");
    list.replaceChildren();
    for (const name of names) {
      const r = retiring[name];
      let text = "not reported yet";
      if (r.reported) {
        text = `${r.running} running + ${r.queued} queued · moved ${r.moved}`;
        if (r.reserved) text += ` · ${r.reserved} moving`;
        text += r.grace_left_s > 0 ? ` · grace left ${Math.round(r.grace_left_s)} s` : " · grace over";
      }
      list.append(el("li", { "data-server": name }, el("b", {}, name), `: ${text}`));
    }
  }

  function applyStatus(status) {
    if (typeof status.server_time === "number") {
      state.clockOffset = status.server_time - Date.now() / 1000;
    }
    state.waves = status.waves || [];
    state.moves = status.moves || [];
    state.movesAt = status.last_rebalance_at || null;
    if (typeof status.policy === "string") $("policy-name").textContent = status.policy;
    renderServers(status);
    renderWaves();
    renderMoves();
    renderRetiring(status.migration);
    document.body.dataset.snapshots = String((parseInt(document.body.dataset.snapshots, 10) || 0) + 1);
  }

  // --- messages -------------------------------------------------------------------------

  function showError(message) {
    $("error-text").textContent = message;
    $("error").hidden = false;
    $("notice").hidden = true;
  }

  function showNotice(message) {
    $("notice").textContent = message;
    $("notice").hidden = false;
    $("error").hidden = true;
  }

  $("error-close").addEventListener("click", () => { $("error").hidden = true; });

  // --- live updates ---------------------------------------------------------------------

  function connect() {
    const conn = $("conn");
    const es = new EventSource("/api/events");
    es.addEventListener("open", () => {
      conn.textContent = "live";
      conn.className = "conn conn-on";
    });
    es.addEventListener("error", () => {
      conn.textContent = es.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…";
      conn.className = "conn conn-off";
      if (es.readyState === EventSource.CLOSED) sessionEnded();
    });
    es.addEventListener("snapshot", (ev) => applyStatus(JSON.parse(ev.data)));
    es.addEventListener("wave", (ev) => {
      const w = JSON.parse(ev.data);
      state.waves = [w, ...state.waves.filter((x) => x.wave_id !== w.wave_id)].slice(0, 40);
      renderWaves();
    });
    // A new topology: the tree is laid out by the server, so draw the page again.
    es.addEventListener("topology", () => window.location.reload());
    es.addEventListener("moves", (ev) => {
      state.moves = JSON.parse(ev.data).moves || [];
      state.movesAt = Date.now() / 1000 + state.clockOffset;
      renderMoves();
    });
  }

  // The stream was refused: when reads need the token and this browser's session no longer
  // opens them (the token changed), load the page again, which asks for the token.
  async function sessionEnded() {
    try {
      const resp = await fetch("/api/status", { headers: { Accept: "application/json" } });
      if (resp.status === 401) window.location.reload();
    } catch (_) { /* the balancer is away: "disconnected" says so */ }
  }

  setInterval(() => {
    document.querySelectorAll("#waves-body td.ago").forEach((td) => {
      td.textContent = ago(parseFloat(td.dataset.ts));
    });
  }, 1000);

  // --- actions --------------------------------------------------------------------------

  // The API token, when the balancer requires one: asked for once (on the first 401) and
  // kept in sessionStorage, so it lasts for this tab and is never written to disk.
  const TOKEN_KEY = "treewave.apiToken";

  function storedToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; }
  }

  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) { /* storage disabled: asked again next time */ }
  }

  let tokenAnswer = null; // resolves the pending question; one form for every request

  function askToken(message) {
    if (!tokenAnswer) {
      $("token-hint").textContent = message;
      $("token-input").value = "";
      $("token-form").hidden = false;
      $("token-input").focus();
    }
    return new Promise((resolve) => {
      const previous = tokenAnswer;
      tokenAnswer = (value) => { if (previous) previous(value); resolve(value); };
    });
  }

  function answerToken(value) {
    const answer = tokenAnswer;
    tokenAnswer = null;
    $("token-form").hidden = true;
    if (answer) answer(value);
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    answerToken($("token-input").value.trim());
  });
  $("token-cancel").addEventListener("click", () => answerToken(""));

  async function api(method, path, body) {
    let resp;
    for (;;) {
      const headers = { "Content-Type": "application/json", Accept: "application/json" };
      const token = storedToken();
      if (token) headers.Authorization = "Bearer " + token;
      try {
        resp = await fetch(path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (err) {
        throw new Error(`${method} ${path}: network error, cannot reach the balancer (${err.message})`);
      }
      if (resp.status !== 401) break;
      storeToken("");
      const given = await askToken(token
        ? "The balancer did not accept that token; enter its API token."
        : "This balancer needs its API token to change the cluster.");
      if (!given) throw new Error(`${method} ${path}: not done, the balancer needs its API token`);
      storeToken(given);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      const detail = (data && data.error) || text.trim() || resp.statusText;
      throw new Error(`${method} ${path} failed (HTTP ${resp.status}): ${detail}`);
    }
    return data;
  }

  // Empty fields are left out (the server applies its defaults or says what is missing);
  // anything else goes as typed, so the server's validation speaks for itself.
  function numberField(id) {
    const input = $(id);
    const raw = input.value.trim();
    if (raw === "") {
      // A number input reports "" for text it cannot parse, too.
      return input.validity && input.validity.badInput ? NaN : undefined;
    }
    return Number(raw);
  }

  function withBody(fields) {
    const body = {};
    for (const [k, v] of Object.entries(fields)) {
      if (v === undefined) continue;
      if (Number.isNaN(v)) throw new Error(`${k}: not a number`);
      body[k] = v;
    }
    return body;
  }

  async function run(button, action) {
    button.disabled = true;
    try {
      showNotice(await action());
    } catch (err) {
      showError(err.message);
    } finally {
      button.disabled = false;
    }
  }

  $("finn-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    run($("finn-button"), async () => {
      const body = withBody({
        tasks_per_node: numberField("finn-tasks"),
        duration_s: numberField("finn-duration"),
      });
      const r = await api("POST", "/api/finn", body);
      const outcome = r.complete ? "complete" : `partial (missing ${r.missing.join(", ")})`;
      return `Finn wave ${r.wave_id} ${outcome}: ${r.decided.length} servers took ` +
        `${r.tasks_per_node} task${r.tasks_per_node === 1 ? "" : "s"} each · ` +
        `${r.messages} messages · ${ms(r.duration_s)}`;
    });
  });

  $("submit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    run($("submit-button"), async () => {
      const body = withBody({ node: $("submit-node").value, count: numberField("submit-count") });
      const r = await api("POST", "/api/tasks", body);
      return `${r.accepted} task${r.accepted === 1 ? "" : "s"} queued at ${r.node}`;
    });
  });

  $("rebalance-button").addEventListener("click", () => {
    run($("rebalance-button"), async () => {
      const r = await api("POST", "/api/rebalance", {});
      const moved = r.moves.reduce((a, m) => a + m.tasks, 0);
      const partial = r.complete ? "" : ` (partial: missing ${r.missing.join(", ")})`;
      if (r.moves.length) {
        state.moves = r.moves;
        state.movesAt = Date.now() / 1000 + state.clockOffset;
        renderMoves();
      }
      return `Rebalance: ${moved} task${moved === 1 ? "" : "s"} moved in ${r.moves.length} ` +
        `move${r.moves.length === 1 ? "" : "s"}; max pressure ` +
        `${r.max_pressure_before.toFixed(2)} s → ${r.max_pressure_after.toFixed(2)} s per cpu` +
        partial;
    });
  });

  $("show-live").addEventListener("change", renderWaves);

  // --- start ----------------------------------------------------------------------------

  try {
    applyStatus(JSON.parse($("tw-initial").textContent));
  } catch (err) {
    showError("could not read the initial state: " + err.message);
  }
  if (window.EventSource) connect();
  else showError("this browser has no EventSource: the page will not update live");
})();
