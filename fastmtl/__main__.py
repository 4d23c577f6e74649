"""``python -m fastmtl``: the CLI."""

import sys

from fastmtl.cli import main

sys.exit(main())
