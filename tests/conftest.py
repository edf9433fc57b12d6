"""Hooks for every tier."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item so fixtures can tell whether the test failed
    (`tests.support.outcome.failed`)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
