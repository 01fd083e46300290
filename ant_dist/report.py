"""`python -m ant_dist.report`: the entry point; the stage lives in ant_dist.eval.report (its docstring: `--help`)."""

import sys

from ant_dist.eval.report import main

if __name__ == "__main__":
    sys.exit(main())
