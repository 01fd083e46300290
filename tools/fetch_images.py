#!/usr/bin/env python
"""Download the item images named in Amazon metadata into a folder that tools/pack.py reads (images=).

Example:
    python tools/fetch_images.py format=amazon2018 meta=data/raw/Food/meta_Food.json.gz \
        images=data/raw/Food/images parallel=16 [max_items=100]
Exit codes: 0 finished (failures counted in <images>/fetch_report.json), 2 bad input, 75 stopped by a signal.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ant_dist.data.fetch_images import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
