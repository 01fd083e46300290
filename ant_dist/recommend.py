"""`python -m ant_dist.recommend`: the entry point; the stage lives in ant_dist.serving.recommend (its docstring: `--help`)."""

import sys

from ant_dist.serving.recommend import main

if __name__ == "__main__":
    sys.exit(main())
