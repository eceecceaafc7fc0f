"""`python -m lookout_edge.cli ...` runs the `lookout-edge` command."""

import sys

from .main import main

sys.exit(main())
