"""`python -m cli` runs the `treewave` console script."""

import sys

from cli.main import main

sys.exit(main())
