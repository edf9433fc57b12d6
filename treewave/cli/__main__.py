"""`python -m treewave.cli` runs the `treewave` console script."""

import sys

from treewave.cli.main import main

__all__: list[str] = []
"""An entry point only: it defines nothing to import (`main` is `treewave.cli.main`'s)."""

# Guarded so that importing this module (tooling that walks every module, such as
# tests/unit/test_public_names.py) does not run the command line; `python -m` still does.
if __name__ == "__main__":
    sys.exit(main())
