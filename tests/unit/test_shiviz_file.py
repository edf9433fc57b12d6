"""The ShiViz file (`treewave trace --shiviz`, `core.trace.shiviz_file`) opens in ShiViz's
upload as it is: checked by reading it the way ShiViz does, in node (tests/support/shiviz.py),
on real waves from the simulator, one wave and several in one file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.shiviz import assert_shiviz_ready
from treewave.cli.main import main
from treewave.core.trace import SHIVIZ_DEFAULT_PARSER, SHIVIZ_DELIMITER, shiviz_file


@pytest.fixture
def waves_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "waves.json"
    assert main(["simulate", "--nodes", "12", "--seed", "4", "--trace", str(out)]) == 0
    capsys.readouterr()
    return out


def test_one_wave_file_starts_with_the_parser_and_delimiter_lines(
    waves_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    waves = json.loads(waves_file.read_text())["waves"]
    assert main(["trace", "echo-1", "--file", str(waves_file), "--shiviz"]) == 0
    text = capsys.readouterr().out
    first, second, third, *_ = text.splitlines()
    # The upload used to take the log's first event line as the regex and fail.
    assert first == SHIVIZ_DEFAULT_PARSER
    assert second == SHIVIZ_DELIMITER
    assert third == "=== wave echo-1 ==="
    (execution,) = assert_shiviz_ready(text, [waves[0]])
    assert {host for _, host, _ in execution.events} == {"balancer", *waves[0]["lanes"][1:]}


def test_several_waves_are_executions_of_one_file(
    waves_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    waves = json.loads(waves_file.read_text())["waves"]
    assert main(["trace", "all", "--file", str(waves_file), "--shiviz"]) == 0
    text = capsys.readouterr().out
    executions = assert_shiviz_ready(text, waves)
    assert [x.label for x in executions] == ["echo-1", "finn-1"]
    assert text == shiviz_file(waves)
    # The same waves named one by one, in the order asked.
    assert main(["trace", "finn-1", "echo-1", "--file", str(waves_file), "--shiviz"]) == 0
    assert [x.label for x in assert_shiviz_ready(capsys.readouterr().out, waves[::-1])] == [
        "finn-1",
        "echo-1",
    ]


def test_several_waves_only_as_a_shiviz_file(
    waves_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "all", "--file", str(waves_file)]) == 1
    assert "only with --shiviz" in capsys.readouterr().err
    assert main(["trace", "echo-1", "finn-1", "--file", str(waves_file), "--json"]) == 1
    assert main(["trace", "nope", "--file", str(waves_file), "--shiviz"]) == 1
    assert "unknown wave 'nope'" in capsys.readouterr().err


def test_a_broken_file_is_noticed(waves_file: Path) -> None:
    """The check itself fails on what ShiViz would refuse: a clock that skips a step."""
    waves = json.loads(waves_file.read_text())["waves"]
    text = shiviz_file(waves[:1])
    lines = text.splitlines()
    last = lines[-1]
    host, clock = last.split(" ", 1)
    bumped = {k: v + (1 if k == host else 0) for k, v in json.loads(clock).items()}
    lines[-1] = f"{host} {json.dumps(bumped, separators=(',', ':'))}"
    with pytest.raises(AssertionError):
        assert_shiviz_ready("\n".join(lines) + "\n", waves[:1])
    with pytest.raises(AssertionError):
        assert_shiviz_ready("\n".join(lines[2:]) + "\n", waves[:1])  # no header lines
