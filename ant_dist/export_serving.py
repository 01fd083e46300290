"""`python -m ant_dist.export_serving`: the entry point; the stage lives in ant_dist.serving.export_serving (its docstring: `--help`)."""

import sys

from ant_dist.serving.export_serving import main

if __name__ == "__main__":
    sys.exit(main())
