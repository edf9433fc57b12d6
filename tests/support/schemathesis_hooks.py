"""Schemathesis hooks for `tests/integration/test_schemathesis.py` (loaded by the `st`
process through `SCHEMATHESIS_HOOKS`).

Work sizes are capped before each call: the API accepts up to 10,000 tasks per server per
Finn wave and 100,000 per submission, and schemathesis tries those limits in every phase,
so a run would queue hundreds of thousands of emulated tasks lasting up to an hour each,
and spend its time moving and persisting them rather than exercising the API. Only the
sizes of otherwise valid values are capped; wrong types, out-of-range values, extra fields
and every other negative case go out as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis

CAPS = {"tasks_per_node": 3, "count": 5}
DURATION_CAP_S = 0.2


def _capped(body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    for key, cap in CAPS.items():
        value = out.get(key)
        if type(value) is int and value > cap:
            out[key] = cap
    for key in ("duration_s", "actual_s"):
        value = out.get(key)
        if type(value) is float and DURATION_CAP_S < value <= 3600:
            out[key] = DURATION_CAP_S
    return out


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if isinstance(case.body, dict):
        case.body = _capped(case.body)
