"""`python -m ant_dist.export_recbole`: the entry point; the stage lives in ant_dist.data.export_recbole (its docstring: `--help`)."""

import sys

from ant_dist.data.export_recbole import main

if __name__ == "__main__":
    sys.exit(main())
