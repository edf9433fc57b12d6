"""A ShiViz file read the way ShiViz's "Choose file" upload reads it, by a real JavaScript
engine (node): the first line is the parser regex, the second the execution delimiter
(both compiled with the "m" flag ShiViz uses, as typed and as ShiViz's newer upload
anchors them with ^...$), the rest is the log, split into executions at the delimiter and
labelled with its `trace` group (js/shiviz.js, js/logEventMatcher/logParser.js)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["Execution", "assert_shiviz_ready", "shiviz_upload"]

READER_JS = r"""
const text = require("fs").readFileSync(0, "utf8");
const lines = text.split("\n", 2);
const log = text.substr(text.indexOf("\n", text.indexOf("\n") + 1) + 1);
function read(parserSource, delimiterSource) {
  const parser = new RegExp(parserSource, "m");  // compiles, as ShiViz does, or throws
  const delimiter = new RegExp(delimiterSource, "m");
  const labels = [""];
  const all = new RegExp(delimiter.source, "mg");
  let m;
  while ((m = all.exec(log)) !== null) labels.push(m.groups.trace);
  const plain = new RegExp(delimiter.source.replace(/\(\?<\w+>/g, "(?:"), "m");
  const executions = [];
  log.split(plain).forEach((chunk, i) => {
    if (!chunk.trim()) return;
    const events = [];
    const each = new RegExp(parser.source, "mg");
    let covered = "";
    let last = 0;
    while ((m = each.exec(chunk)) !== null) {
      covered += chunk.slice(last, m.index);
      last = m.index + m[0].length;
      events.push({ event: m.groups.event, host: m.groups.host, clock: m.groups.clock });
    }
    covered += chunk.slice(last);
    executions.push({ label: labels[i], events, unmatched: covered.trim() });
  });
  return executions;
}
const first = lines[0].trim();
const second = lines[1].trim();
console.log(JSON.stringify({
  asTyped: read(first, second),
  anchored: read("^" + lines[0] + "$", "^" + second + "$"),
}));
"""


@dataclass(frozen=True)
class Execution:
    label: str
    events: list[tuple[str, str, dict[str, int]]]
    """(event text, host, vector clock) in log order."""


def shiviz_upload(text: str) -> list[Execution]:
    """The executions ShiViz makes of an uploaded file (node must be installed)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the ShiViz file check runs its regexes in it)")
    run = subprocess.run(
        [node, "-e", READER_JS], input=text, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"ShiViz could not read the file:\n{run.stderr}"
    both: dict[str, list[dict[str, Any]]] = json.loads(run.stdout)
    assert both["asTyped"] == both["anchored"], "the two ways ShiViz reads the lines disagree"
    out = []
    for ex in both["asTyped"]:
        assert ex["unmatched"] == "", f"lines no event matched: {ex['unmatched'][:300]!r}"
        events = []
        for e in ex["events"]:
            clock = json.loads(e["clock"])  # valid JSON, or this fails
            events.append((e["event"], e["host"], clock))
        out.append(Execution(ex["label"], events))
    return out


def assert_shiviz_ready(text: str, traces: list[dict[str, Any]]) -> list[Execution]:
    """`text` opens in ShiViz as one execution per trace, in order, each with every event
    of its trace; every clock names its own host, whose own entry rises by exactly one per
    event."""
    executions = shiviz_upload(text)
    assert [x.label for x in executions] == [t["wave_id"] for t in traces]
    for ex, trace in zip(executions, traces, strict=True):
        assert len(ex.events) == trace["steps"], ex.label
        own: dict[str, int] = {}
        for _, host, clock in ex.events:
            assert host in clock, f"{host}'s clock does not name it: {clock}"
            assert clock[host] == own.get(host, 0) + 1, (ex.label, host, clock)
            own[host] = clock[host]
    return executions
