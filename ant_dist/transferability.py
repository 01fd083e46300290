"""`python -m ant_dist.transferability`: the entry point; the stage lives in ant_dist.eval.transferability (its docstring: `--help`)."""

import sys

from ant_dist.eval.transferability import main

if __name__ == "__main__":
    sys.exit(main())
