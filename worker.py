"""`python worker.py`: run t2v workers (see `worker/cli.py`; `--help` lists the flags).

The code lives in the `worker/` package beside this script; `import worker` finds the package, not this file.
"""

import sys

from worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
