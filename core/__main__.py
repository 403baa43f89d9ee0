"""`python -m core` runs the core-collector command line."""

import sys

from core.cli import main

sys.exit(main())
