"""Every module under `treewave` lists its public names in `__all__`, and that list is honest.

The project's rule: a module's public API is what its `__all__` says. A name in it that
does not exist breaks `from module import *` (and misleads readers and type checkers);
a duplicate hides a copy-paste slip. A module without `__all__` exports everything it
happens to import, so each one must have it. Packages list their public submodules.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import pytest

import treewave


def _raise(name: str) -> None:
    # walk_packages skips a package that fails to import unless told otherwise.
    raise ImportError(f"cannot import {name}")


# `treewave.cli.__main__` is included: it only runs the command line under `python -m`.
MODULES = sorted(
    ["treewave"]
    + [m.name for m in pkgutil.walk_packages(treewave.__path__, "treewave.", onerror=_raise)]
)


def test_the_walk_finds_every_layer() -> None:
    for name in ("treewave.core.echo", "treewave.wire.links", "treewave.cli.__main__"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_all_is_defined_and_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    names = module.__all__
    assert isinstance(names, list)
    assert all(isinstance(n, str) for n in names)
    assert len(names) == len(set(names)), f"{name}.__all__ has duplicates"
    # What `from name import *` does; for a package, it also imports the listed submodules.
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)
    for n in names:
        assert hasattr(module, n), f"{name}.__all__ lists {n!r}, which {name} does not define"
        assert n in namespace


def test_packages_list_their_public_submodules() -> None:
    # The top-level package keeps `__all__` empty: its docstring names the subpackages.
    for name in MODULES:
        module: ModuleType = importlib.import_module(name)
        if name == "treewave" or not hasattr(module, "__path__"):
            continue
        public = {m.name for m in pkgutil.iter_modules(module.__path__) if m.name[0] != "_"}
        assert sorted(module.__all__) == sorted(public), name
