"""`python -m ant_dist.embed`: the entry point; the stage lives in ant_dist.features.embedding (its docstring: `--help`)."""

import sys

from ant_dist.features.embedding import main

if __name__ == "__main__":
    sys.exit(main())
