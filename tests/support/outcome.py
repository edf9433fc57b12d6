"""Whether a test failed, for fixtures that print logs at teardown only then."""

from __future__ import annotations

import pytest

__all__ = ["failed"]


def failed(item: pytest.Item) -> bool:
    """Whether the test's setup or body failed (its reports are kept on the item by the
    `pytest_runtest_makereport` hook in tests/conftest.py)."""
    return any(
        getattr(getattr(item, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )
