"""`python -m ant_dist.demo`: the entry point; the stage lives in ant_dist.pipeline.demo (its docstring: `--help`)."""

import sys

from ant_dist.pipeline.demo import main

if __name__ == "__main__":
    sys.exit(main())
