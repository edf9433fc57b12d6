"""Every option's help names its default once: where the value comes from when the flag is
not given, in the order it is looked up."""

from __future__ import annotations

import argparse

from treewave.cli.main import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_no_option_names_its_default_twice() -> None:
    seen = 0
    for name, sub in subcommands().items():
        for action in sub._actions:
            text = action.help or ""
            assert text.count("(default:") <= 1, f"treewave {name} {action.option_strings}: {text}"
            seen += "(default:" in text
    assert seen > 20  # the check did read the options' help


def test_run_names_the_environment_then_the_topology_file() -> None:
    help_text = subcommands()["run"].format_help()
    flat = " ".join(help_text.split())
    assert (
        "--rebalance-interval S seconds between rebalancing rounds, 0 = off (default: "
        "$TREEWAVE_REBALANCE_S or the topology's rebalance_interval_s)"
    ) in flat
    assert (
        "--wave-timeout S wave deadline in seconds (default: $TREEWAVE_WAVE_TIMEOUT_S or the "
        "topology's wave_timeout_s)"
    ) in flat
