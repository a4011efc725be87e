"""`python -m worker.sim ...`: see `worker.sim.cli`."""

import sys

from worker.sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
