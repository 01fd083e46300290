#!/usr/bin/env python
"""Pack a raw catalog (Amazon 2018 / 2023 or a generic table) into shards/<domain>/.

Example:
    python tools/pack.py domain=Food meta=data/raw/Food/meta_Food.json.gz \
        interactions=data/raw/Food/Food.csv images=data/raw/Food/images out=shards
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ant_dist.data.pack_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
