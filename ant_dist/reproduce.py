"""`python -m ant_dist.reproduce`: the entry point; the stage lives in ant_dist.pipeline.runner (its docstring: `--help`)."""

import sys

from ant_dist.pipeline.runner import main

if __name__ == "__main__":
    sys.exit(main())
