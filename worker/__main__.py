"""`python -m worker`, the same as `python worker.py`."""

import sys

from worker.cli import main

sys.exit(main())
