import sys

from ant_dist.baselines.run import main

if __name__ == "__main__":
    sys.exit(main())
