"""Command line of the packer (tools/pack.py and `python -m ant_dist.data.pack_cli`)."""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from ant_dist.config import PackConfig, parse_cli
from ant_dist.data.pack import PackError, pack_domain
from ant_dist.data.raw_readers import InputError
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from ant_dist.runtime.locking import LockedError

DESCRIPTION = """
Pack one domain of a raw catalog into WebDataset shards plus catalog/interactions tables.
Formats: amazon2018 (meta_*.json[.gz] + ratings CSV item,user,rating,timestamp or review
JSON lines), amazon2023 (meta_*.jsonl[.gz] + review JSONL), table (CSV/Parquet items with
id,text[,price,image] and interactions with user,item,timestamp). Images come from a local
folder of <item_id>.<jpg|png|webp>. Output layout and every cleaning rule: docs/data.md.
Exit codes: 0 packed, 2 bad input (message says why; pack_report.json has the counts) or
the domain folder in use by another packer (message names its pid).
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_cli(PackConfig, argv, "tools/pack.py", DESCRIPTION)
    try:
        report = pack_domain(cfg)
    except (InputError, PackError, LockedError) as exc:
        print(f"pack: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = report["output"]
    print(f"packed {cfg.domain}: {out['items']} items ({out['items_with_image']} with image, "
          f"{out['items_with_price']} with price), {out['users']} users, {out['interactions']} "
          f"interactions, {out['shards']} shard(s) in {report['seconds']:.1f}s")
    skipped = {k: v for k, v in report["skipped"].items() if v}
    if skipped:
        print(f"  skipped: {json.dumps(skipped, sort_keys=True)}")
    repaired = {k: v for k, v in report["repaired"].items() if v}
    if repaired:
        print(f"  repaired: {json.dumps(repaired, sort_keys=True)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
