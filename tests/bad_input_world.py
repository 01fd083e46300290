"""The tiny good world of the bad-input matrix (tests/test_bad_input.py) and its helpers.

One domain "Toy" packed from a CSV table, hand-written feature tables, a tiny exported model, a
finished 1-step pre-training run with its checkpoint, a serving export and a RecBole export:
built in-process in a few seconds, then copied and damaged by each row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS, TEXT_DIM, IMAGE_DIM = 12, 8, 4
ITEM_IDS = [f"i{j:02d}" for j in range(N_ITEMS)]


# ----------------------------------------------------------------------------- the good world
def items_csv(path: Path, prices=None, texts=None) -> None:
    prices = prices or [f"{3 + j}.50" for j in range(N_ITEMS)]
    texts = texts or [f"toy number {j}" for j in range(N_ITEMS)]
    rows = ["id,text,price"] + [f'{i},{t},"{p}"' for i, t, p in zip(ITEM_IDS, texts, prices)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def inter_rows() -> list[tuple[str, str, str]]:
    rows = []
    for u in range(8):  # every user sees 7 items, every item is seen
        for t in range(7):
            rows.append((f"u{u}", ITEM_IDS[(u * 3 + t) % N_ITEMS], str(1_600_000_000 + 100 * u + t)))
    return rows


def inter_csv(path: Path, rows=None) -> None:
    rows = rows or inter_rows()
    path.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))


def pack_args(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "ant_dist.data.pack_cli", "domain=Toy", "format=table", f"meta={raw / 'items.csv'}",
            f"interactions={raw / 'inter.csv'}", f"out={out}", "min_core=1", "workers=1", "progress=false", *extra]


def build_good(root: Path) -> Path:
    """The good world in `root` (see the module doc)."""
    import torch

    from ant_dist.config import PackConfig
    from ant_dist.features.feature_table import create_tables, read_catalog, shards_fingerprint, FeatureTables, \
        write_manifest
    from ant_dist.data.pack import pack_domain
    from ant_dist.model.ant import ANT, ANTConfig
    from ant_dist.model.irl import IRLConfig
    from ant_dist.model.sasrec import SASRecConfig
    from ant_dist.model.io import export_model

    raw = root / "raw"
    raw.mkdir()
    items_csv(raw / "items.csv")
    inter_csv(raw / "inter.csv")
    pack_domain(PackConfig(domain="Toy", format="table", meta=str(raw / "items.csv"),
                           interactions=str(raw / "inter.csv"), out=str(root / "shards"), min_core=1, workers=1,
                           progress=False))
    catalog = read_catalog(root / "shards" / "Toy")
    n = catalog.num_rows
    fdir = root / "features" / "Toy"
    price = np.asarray(catalog.column("price_norm").to_numpy(zero_copy_only=False), dtype=np.float32)
    create_tables(fdir, n, TEXT_DIM, IMAGE_DIM, price)
    tables = FeatureTables.open(fdir)
    rng = np.random.default_rng(0)
    tables.write(np.arange(n), rng.normal(size=(n, TEXT_DIM)), np.zeros((n, IMAGE_DIM)), np.zeros(n, bool))
    tables.mark_done(np.arange(n))
    del tables
    write_manifest(fdir, {"domain": "Toy", "rows": n, "dtype": "float16", "complete": True,
                          "shards_dir": str(root / "shards" / "Toy"),
                          "shards_fingerprint": shards_fingerprint(root / "shards" / "Toy"),
                          "text": {"fingerprint": "t", "dim": TEXT_DIM, "path": "t"},
                          "image": {"fingerprint": "i", "dim": IMAGE_DIM, "path": "i"}})
    torch.manual_seed(0)
    model = ANT(ANTConfig(irl=IRLConfig(text_dim=TEXT_DIM, image_dim=IMAGE_DIM, hidden=16, n_heads=2),
                          sasrec=SASRecConfig(hidden=16, n_layers=1, n_heads=2, max_len=10)))
    export_model(model, root / "model", {"domains": ["Toy"], "items_per_domain": [n], "seed": 0,
                                         "features": str(root / "features"), "shards": str(root / "shards")})
    # a finished 1-step pre-training run (its end checkpoint is what a resume starts from)
    res = run_entry(root, pretrain_args(root, "run"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_entry(root, ["-m", "ant_dist.export_serving", f"model={root / 'model'}", "domain=Toy",
                      f"out={root / 'serving'}", "device=cpu", "progress=false"])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_entry(root, ["-m", "ant_dist.export_recbole", str(root / "shards" / "Toy"), "--out",
                           str(root / "recbole")])
    assert res.returncode == 0, res.stderr[-3000:]
    return root


def pretrain_args(root: Path, run: str, *extra: str) -> list[str]:
    return ["-m", "ant_dist.pretrain", f"shards={root / 'shards'}", f"features={root / 'features'}", "domains=[Toy]",
            f"out={root / 'runs'}", f"run_name={run}", "hidden=16", "n_experts=2", "n_heads=2", "n_layers=1",
            "max_len=10", "batch_size=4", "n_negatives=4", "max_steps=1", "eval_every=-1", "tracker=none",
            "progress=false", "num_workers=0", "features_on=device", *extra]


def relearn_args(root: Path, model: Path, *extra: str) -> list[str]:
    return ["-m", "ant_dist.relearn", f"shards={root / 'shards'}", f"features={root / 'features'}", "domain=Toy",
            f"pretrained={model}", f"out={root / 'runs'}", "run_name=rl", "batch_size=4", "max_epochs=1",
            "min_epochs=1", "tracker=none", "progress=false", "resume=never", *extra]


def recommend_args(model: Path, root: Path) -> list[str]:
    return ["-m", "ant_dist.recommend", f"model={model}", "domain=Toy", "history=i01,i02",
            f"shards={root / 'shards'}", f"features={root / 'features'}", "device=cpu", "progress=false"]


def run_entry(cwd: Path, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder: Path) -> dict:
    """Every file's bytes under `folder` (the lock file is not output)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- damage helpers
def copy(good: Path, tmp: Path, *names: str) -> Path:
    for name in names:
        src = good / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / name)
    return tmp


def write_raw(tmp: Path, items=None, inter=None, items_name="items.csv") -> Path:
    raw = tmp / "raw"
    raw.mkdir(exist_ok=True)
    if items is None:
        items_csv(raw / "items.csv")
    else:
        items(raw / items_name)
    if inter is None:
        inter_csv(raw / "inter.csv")
    else:
        inter(raw / "inter.csv")
    return raw


def pack_report(tmp: Path) -> dict:
    return json.loads((tmp / "shards" / "Toy" / "pack_report.json").read_text())


def catalog_rows(tmp: Path) -> dict:
    rows = pq.read_table(tmp / "shards" / "Toy" / "catalog.parquet").to_pylist()
    return {r["item_id"]: r for r in rows}


def shard_texts(tmp: Path) -> dict:
    from ant_dist.data.shards import iter_shard_samples, shard_paths

    return {json.loads(s["json"])["item_id"]: s["txt"].decode("utf-8")
            for s in iter_shard_samples(shard_paths(tmp / "shards" / "Toy"))}


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
