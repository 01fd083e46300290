"""The RecBole export, read back by independent readers: a pandas reader that does what RecBole's
`Dataset._load_feat` and its stable sorts do, the raw ml-100k files through a brute-force
5-core / stable time order / last-50 reference, and our own packer (format=recbole)."""

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ant_dist.config import ExportRecboleConfig, PackConfig
from ant_dist.data.pack import pack_domain
from ant_dist.data.export_recbole import cli_overrides, export_domain, main
from test_real_data import _reference_sequences  # the brute-force 5-core, stable-sort, last-50 reference

ROOT = Path(__file__).resolve().parents[1]


def _recbole_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None:
        pytest.skip("the recbole wheel (installed by tools/setup.sh) ships ml-100k; it is not installed")
    return Path(spec.submodule_search_locations[0])


# ----------------------------------------------------------------------------- independent readers
def read_like_recbole(path: Path) -> pd.DataFrame:
    """An atomic file as RecBole 1.2's `_load_feat` reads it: pandas, python engine, default quoting
    and missing-value markers; token_seq fields split on spaces with empty tokens dropped."""
    with open(path, encoding="utf-8") as f:
        header = f.readline()[:-1].split("\t")
    types = dict(h.split(":") for h in header)
    df = pd.read_csv(path, delimiter="\t", dtype={h: np.float64 if h.endswith(":float") else str for h in header},
                     engine="python")
    df.columns = list(types)
    for name, kind in types.items():
        if kind == "token_seq":
            df[name] = [[t for t in (v if isinstance(v, str) else "").split(" ") if t] for v in df[name]]
    return df


def recbole_sequences(inter_path: Path) -> dict[str, list[tuple[str, float]]]:
    """Per-user (item, timestamp) after RecBole's sorts: stable by time (order TO), then stable by
    (user, time) (sequential data augmentation)."""
    df = read_like_recbole(inter_path)
    rows = list(zip(df["user_id"], df["item_id"], df["timestamp"]))
    rows = sorted(rows, key=lambda r: r[2])              # Python's sort is stable
    rows = sorted(rows, key=lambda r: (r[0], r[2]))
    seqs = defaultdict(list)
    for u, i, t in rows:
        seqs[u].append((i, t))
    return dict(seqs)


def packed(domain_dir: Path) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str], dict[str, float]]:
    """(sequences with timestamps, texts, prices) of a packed domain, read with pyarrow and tarfile."""
    catalog = pq.read_table(domain_dir / "catalog.parquet").to_pylist()
    ids = [c["item_id"] for c in catalog]
    inter = pq.read_table(domain_dir / "interactions.parquet").to_pylist()
    seqs = {r["user_id"]: [(ids[i], t) for i, t in zip(r["items"], r["timestamps"])] for r in inter}
    texts = {}
    for shard in sorted(domain_dir.glob("items-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                texts[meta["item_id"]] = members[name[:-len("json")] + "txt"].decode("utf-8")
    return seqs, texts, {c["item_id"]: c["price"] for c in catalog}


def _items_only(seqs):
    return {u: [i for i, _ in s] for u, s in seqs.items()}


# ----------------------------------------------------------------------------- ml-100k
@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    src = _recbole_dir() / "dataset_example" / "ml-100k"
    root = tmp_path_factory.mktemp("ml")
    pack_domain(PackConfig(domain="ml-100k", format="recbole", meta=str(src / "ml-100k.item"),
                           interactions=str(src / "ml-100k.inter"), out=str(root / "shards"), workers=1,
                           progress=False))
    record = export_domain(ExportRecboleConfig(domain_dir=str(root / "shards" / "ml-100k"), out=str(root / "rb"),
                                               progress=False))
    return src, root, record


def test_ml100k_export_gives_recbole_our_sequences(ml100k):
    src, root, record = ml100k
    out = root / "rb" / "ml-100k"
    got = recbole_sequences(out / "ml-100k.inter")
    ours, _, _ = packed(root / "shards" / "ml-100k")
    ref = _reference_sequences(src / "ml-100k.inter")
    assert len(got) == len(ref) == 943
    assert _items_only(got) == ref                                       # 5-core, stable time order, last 50
    assert got == {u: [(i, float(t)) for i, t in s] for u, s in ours.items()}  # and our timestamps
    # Same-timestamp ties decide the order, or this test could not fail: ordered by item id instead,
    # more than 100 sequences would differ.
    by_item = {u: [i for i, _ in sorted(s, key=lambda r: (r[1], r[0]))] for u, s in got.items()}
    assert sum(by_item[u] != ref[u] for u in ref) > 100
    assert record["order"]["same_timestamp_ties"] > 1000 and record["order"]["pack_tie_break"] == "input"


def test_ml100k_items_texts_and_counts(ml100k):
    src, root, record = ml100k
    out = root / "rb" / "ml-100k"
    _, texts, _ = packed(root / "shards" / "ml-100k")
    items = read_like_recbole(out / "ml-100k.item")
    assert list(items.columns) == ["item_id", "text"]                    # no prices in ml-100k
    assert dict(zip(items["item_id"], items["text"])) == {i: t.split() for i, t in texts.items()}
    assert any(t[:2] == ["Toy", "Story."] and "Animation" in t for t in items["text"])
    with open(out / "ml-100k.item", newline="") as f:                    # exact texts, quoting off
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert {r[0]: r[1] for r in rows} == texts
    inter = read_like_recbole(out / "ml-100k.inter")
    ref = _reference_sequences(src / "ml-100k.inter")
    assert record["counts"] == {"users": 943, "items": len(texts), "interactions": sum(map(len, ref.values())),
                                "items_with_price": 0}
    assert len(inter) == record["counts"]["interactions"] and inter["user_id"].nunique() == 943
    assert set(inter["item_id"]) == set(items["item_id"])
    assert record["filtering"]["min_core"] == 5 and record["filtering"]["max_seq_len"] == 50
    on_disk = json.loads((out / "export_recbole.json").read_text())
    assert on_disk["counts"] == record["counts"] and on_disk["dataset"] == "ml-100k"
    assert not list(out.glob("*.tmp"))


def test_ml100k_export_repacks_to_the_same_data(ml100k):
    _, root, _ = ml100k
    out = root / "rb" / "ml-100k"
    pack_domain(PackConfig(domain="again", format="recbole", meta=str(out / "ml-100k.item"),
                           interactions=str(out / "ml-100k.inter"), out=str(root / "shards"), workers=1,
                           progress=False, min_core=1))  # the export is already filtered (0 is not accepted)
    assert packed(root / "shards" / "again") == packed(root / "shards" / "ml-100k")


def test_recbole_yaml_uses_only_recbole_options(ml100k):
    _, root, record = ml100k
    props = _recbole_dir() / "properties"
    known = {**yaml.safe_load((props / "overall.yaml").read_text()),
             **yaml.safe_load((props / "dataset" / "sample.yaml").read_text())}
    ours = yaml.safe_load((root / "rb" / "ml-100k" / record["files"]["recbole_config"]).read_text())
    assert set(ours) <= set(known)
    assert set(ours["eval_args"]) <= set(known["eval_args"])
    assert ours["eval_args"]["order"] == "TO" and ours["MAX_ITEM_LIST_LENGTH"] == 50
    assert ours["user_inter_num_interval"] == ours["item_inter_num_interval"] == "[0,inf)"


# ----------------------------------------------------------------------------- hand-made edge cases
ITEMS = {"i1": ('"Weird" Al Polka', 12.5), "i2": ("None", None), "i3": ("NA", 1e-05),
         "i4": ("plain text & more", 1299.99), "i5": ("Five", None), "x 6": ("Six", 3.0)}
# (user, item, timestamp) in file order; ties at 10 (u1) and 7 (u2)
ROWS = [("u1", "i3", 10), ("u1", "i1", 10), ("u1", "i2", 10), ("u1", "i5", 5), ("u1", "i4", 20), ("u1", "x 6", 30),
        ("u2", "i2", 7), ("u2", "i1", 7), ("u2", "i4", 7), ("u 3", "i5", 1), ("u 3", "i3", 2)]
EXPECTED = {  # by hand: stable time order, ties as the tie_break says, last 4
    "input": {"u1": ["i1", "i2", "i4", "x 6"], "u2": ["i2", "i1", "i4"], "u 3": ["i5", "i3"]},
    "item": {"u1": ["i2", "i3", "i4", "x 6"], "u2": ["i1", "i2", "i4"], "u 3": ["i5", "i3"]},
}


def _pack_tiny(tmp_path: Path, tie_break: str = "input", items: dict = ITEMS, rows: list = ROWS,
               name: str = "tiny") -> Path:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(items), "text": [t for t, _ in items.values()],
                             "price": pa.array([p for _, p in items.values()], pa.float64())}), raw / "items.parquet")
    pq.write_table(pa.table({"user": [r[0] for r in rows], "item": [r[1] for r in rows],
                             "timestamp": [r[2] for r in rows]}), raw / "inter.parquet")
    pack_domain(PackConfig(domain=name, format="table", meta=str(raw / "items.parquet"),
                           interactions=str(raw / "inter.parquet"), out=str(tmp_path / "shards"), min_core=1,
                           max_seq_len=4, tie_break=tie_break, workers=1, progress=False))
    return tmp_path / "shards" / name


@pytest.mark.parametrize("tie_break", ["input", "item"])
def test_tiny_ties_quotes_null_markers_and_prices(tmp_path, capsys, tie_break):
    domain = _pack_tiny(tmp_path, tie_break)
    assert main([str(domain), "--out", str(tmp_path / "rb"), "name=t", "progress=false"]) == 0
    assert "exported tiny" in capsys.readouterr().out
    out = tmp_path / "rb" / "t"
    got = recbole_sequences(out / "t.inter")
    assert _items_only(got) == EXPECTED[tie_break]
    seqs, texts, prices = packed(domain)
    assert got == {u: [(i, float(t)) for i, t in s] for u, s in seqs.items()}
    items = read_like_recbole(out / "t.item")
    assert dict(zip(items["item_id"], items["text"])) == {i: t.split(" ") for i, (t, _) in ITEMS.items()}
    read_prices = dict(zip(items["item_id"], items["price"]))
    assert all(read_prices[i] == p if p is not None else np.isnan(read_prices[i]) for i, (_, p) in ITEMS.items())
    # our own packer reads the export back to the same data: sequences, texts, prices
    pack_domain(PackConfig(domain="back", format="recbole", meta=str(out / "t.item"), interactions=str(out / "t.inter"),
                           out=str(tmp_path / "shards"), min_core=1, max_seq_len=4, workers=1, progress=False))
    assert packed(tmp_path / "shards" / "back") == (seqs, texts, prices)
    record = json.loads((out / "export_recbole.json").read_text())
    assert record["order"]["pack_tie_break"] == tie_break
    assert record["order"]["same_timestamp_ties"] == 3  # kept rows: u1 one pair at t=10, u2 two pairs at t=7
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([f"domain_dir={domain}", f"out={tmp_path / 'rb'}", "name=t", "progress=false"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first      # a rerun rewrites the same bytes


def test_refuses_missing_and_incomplete_domains(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "ant_dist.export_recbole", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "rb")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr
    domain = _pack_tiny(tmp_path)
    broken = tmp_path / "shards" / "broken"
    shutil.copytree(domain, broken)
    (broken / "catalog.parquet").unlink()
    assert main([str(broken), "--out", str(tmp_path / "rb"), "progress=false"]) == 2
    assert "not a completely packed domain: no catalog.parquet" in capsys.readouterr().err
    shutil.copy(domain / "catalog.parquet", broken / "catalog.parquet")
    report = json.loads((broken / "pack_report.json").read_text())
    (broken / "pack_report.json").write_text(json.dumps({**report, "status": "failed"}))
    assert main([str(broken), "--out", str(tmp_path / "rb"), "progress=false"]) == 2
    assert "status='failed'" in capsys.readouterr().err
    for tar in broken.glob("items-*.tar"):
        tar.unlink()
    (broken / "pack_report.json").write_text(json.dumps(report))
    assert main([str(broken), "--out", str(tmp_path / "rb"), "progress=false"]) == 2
    assert "no items-*.tar shards" in capsys.readouterr().err
    assert not (tmp_path / "rb").exists()                                # nothing written on refusal


def test_refuses_ids_an_atomic_file_cannot_hold(tmp_path, capsys):
    domain = _pack_tiny(tmp_path, items={**ITEMS, "NA": ("missing?", None)}, rows=ROWS + [("u2", "NA", 9)],
                        name="na")  # pandas would read the id NA as a missing value
    assert main([str(domain), "--out", str(tmp_path / "rb"), "progress=false"]) == 2
    assert "item id 'NA'" in capsys.readouterr().err


def test_command_line_forms():
    assert cli_overrides(["shards/Food", "--out", "rb"]) == ["domain_dir=shards/Food", "out=rb"]
    assert cli_overrides(["--out=rb", "shards/Food", "name=F", "--progress"]) == \
        ["out=rb", "domain_dir=shards/Food", "name=F", "--progress"]
    assert cli_overrides(["--config", "c.yaml", "shards/Food"]) == ["--config", "c.yaml", "domain_dir=shards/Food"]
