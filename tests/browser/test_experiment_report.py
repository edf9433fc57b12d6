"""The experiment report (report.html) in headless Chromium: one plot per declared figure,
each an inline SVG under its title, drawn offline (the file is opened from disk with the
network unused). Screenshot: artifacts/workbench-report.png (copied to docs/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treewave.cli.main import main
from treewave.experiment.report import FIGURE_TITLES

SPEC = """
name = "report in a browser"
policies = ["lpt", "count", "lab", "steal"]
repetitions = 3
seed = 1
figures = ["makespan", "gantt", "imbalance", "waves"]
[topology]
servers = 8
seed = 5
[settings]
rebalance_interval_s = 0.2
[workload]
durations = "bimodal"
long_s = 3.0
target_s = 3.0
"""

FIGURES_JS = """
return Array.from(document.querySelectorAll('figure.plot')).map(f => ({
  figure: f.dataset.figure,
  caption: f.querySelector('figcaption').textContent,
  svgs: f.querySelectorAll(':scope > svg').length,
  width: f.querySelector('svg').getBoundingClientRect().width,
  paths: f.querySelectorAll('svg path').length,
}));
"""


def test_the_report_shows_one_plot_per_declared_figure(
    driver: Any, tmp_path: Path, artifacts: Path
) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--out", str(out)]) == 0
    driver.set_window_size(1280, 3300)
    driver.get((out / "report.html").as_uri())
    shown = driver.execute_script(FIGURES_JS)
    assert [f["figure"] for f in shown] == ["makespan", "gantt", "imbalance", "waves"]
    for f in shown:
        assert f["caption"] == FIGURE_TITLES[f["figure"]]
        assert f["svgs"] == 1
        assert f["width"] > 300, "the plot is drawn at a readable size"
        assert f["paths"] > 10, "the plot has content"
    assert len(driver.find_elements("css selector", "svg")) == 4
    assert "lab" in driver.find_element("css selector", "pre").text
    driver.save_screenshot(str(artifacts / "workbench-report.png"))
