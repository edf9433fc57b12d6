"""Which value of a setting is in force: flag > environment > topology file > default.

Every service and command resolves its settings here, in one place, so the balancer, the
local supervisor and the status they report cannot disagree. The flag and the environment
are already parsed by the command line (`cli.settings.resolve` puts the flag before the
variable); the topology file's `Settings` already carries the default for what it leaves
out. The result is a `Settings` validated like the file's own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from treewave.core.topology import Settings

__all__ = ["SettingOverrides", "effective_settings"]


@dataclass(frozen=True)
class SettingOverrides:
    """Values given on the command line or in the environment; None: not given."""

    rebalance_interval_s: float | None = None
    wave_timeout_s: float | None = None
    policy: str | None = None


def effective_settings(file: Settings, *overrides: SettingOverrides) -> Settings:
    """The settings in force: the first of `overrides` (highest first, e.g. the flags,
    then the environment) that gives a value wins, else the topology file's value (its
    default when the file leaves it out)."""
    update: dict[str, object] = {}
    for f in fields(SettingOverrides):
        for layer in overrides:
            value = getattr(layer, f.name)
            if value is not None:
                update[f.name] = value
                break
    if not update:
        return file
    return Settings.model_validate({**file.model_dump(), **update})
