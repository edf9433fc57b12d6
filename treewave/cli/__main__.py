"""`python -m treewave.cli` runs the `treewave` console script."""

import sys

from treewave.cli.main import main

sys.exit(main())
