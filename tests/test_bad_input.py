"""The bad-input matrix: one row per damage a real dataset or a real user brings (issue 15).

Each row damages a copy of a tiny, good world (bad_input_world.py), runs the real entry point as
a subprocess, and checks: the exit code; the expected words in the one-line message (or, for
damage that is repaired, the counted and correct result); no "Traceback" on stderr; and, for the
stages that write a folder, that the previous good output is byte-identical afterwards.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import pytest

from bad_input_world import (ITEM_IDS, N_ITEMS, ROOT, TEXT_DIM, build_good, catalog_rows, copy, inter_csv,
                             inter_rows, items_csv, pack_report, pretrain_args, recommend_args, relearn_args,
                             run_entry, shard_texts, snapshot, truncate, write_raw)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_good(tmp_path_factory.mktemp("good"))


# ----------------------------------------------------------------------------- the rows
@dataclass
class Row:
    id: str
    setup: Callable[[Path, Path], list[str]]  # (good, tmp) -> the command's arguments, after damaging tmp
    code: int
    words: tuple = ()                    # all must appear on stderr's last line (a refusal) or stdout
    unchanged: Optional[str] = None       # folder under tmp that must stay byte-identical
    check: Optional[Callable[[Path, subprocess.CompletedProcess], None]] = None
    timeout: int = 120
    extra: dict = field(default_factory=dict)


def _pack_good(good, tmp):
    return copy(good, tmp, "shards")


def _repack(items=None, inter=None, *extra, meta_name="items.csv", inter_name="inter.csv"):
    def setup(good, tmp):
        _pack_good(good, tmp)
        raw = write_raw(tmp, items, inter, meta_name)
        return ["-m", "ant_dist.data.pack_cli", "domain=Toy", "format=table", f"meta={raw / meta_name}",
                f"interactions={raw / inter_name}", f"out={tmp / 'shards'}", "min_core=1", "workers=1",
                "progress=false", *extra]
    return setup


def _write(text: str | bytes):
    def w(path: Path):
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return w


def _non_utf8_items(path: Path):
    items_csv(path)
    data = path.read_bytes().replace(b"toy number 3", b"toy n\xe9mber 3")  # Latin-1 e-acute
    path.write_bytes(data)


def _check_non_utf8(tmp, res):
    report = pack_report(tmp)
    assert report["repaired"].get("non_utf8_text") == 1, report["repaired"]
    texts = shard_texts(tmp)
    assert texts["i03"] == "toy n\ufffdmber 3"
    assert all(texts[i] == f"toy number {j}" for j, i in enumerate(ITEM_IDS) if j != 3)  # every other text intact


PRICES = {"i00": ("€12,99", 12.99), "i01": ("12,99 €", 12.99), "i02": ("1.5e3", 1500.0), "i03": ("1e400", None),
          "i04": ("EUR 1.299,50", 1299.5), "i05": ("$1,299.99", 1299.99), "i06": ("USD 7", 7.0),
          "i07": ("1,299", None), "i08": ("12.5.3", None), "i09": ("1 299,00 €", 1299.0),
          "i10": ("£3.10", 3.1), "i11": ("Call for price", None)}


def _priced_items(path: Path):
    items_csv(path, prices=[PRICES[i][0] for i in ITEM_IDS])


def _check_prices(tmp, res):
    catalog = catalog_rows(tmp)
    got = {i: catalog[i]["price"] for i in ITEM_IDS}
    for i, (_raw_price, want) in PRICES.items():
        assert got[i] == (pytest.approx(want) if want is not None else None), (i, _raw_price, got[i])
    bad = sum(want is None for _p, want in PRICES.values())
    assert pack_report(tmp)["repaired"].get("bad_price") == bad


def _bad_times(path: Path):
    rows = inter_rows()
    for k, t in enumerate(("1e30", "nan", "-5", "inf", "9223372036854775808")):
        u, i, _ = rows[k]
        rows.append((u, i, t))  # extra rows: each is counted and dropped
    inter_csv(path, rows)


def _check_times(tmp, res):
    report = pack_report(tmp)
    assert report["skipped"].get("bad_timestamp") == 5, report["skipped"]
    ts = pq.read_table(tmp / "shards" / "Toy" / "interactions.parquet").column("timestamps").to_pylist()
    flat = [t for seq in ts for t in seq]
    assert min(flat) >= 1_600_000_000 and max(flat) < 1_700_000_000 and len(flat) == 56


def _amazon_json(path: Path):
    path.write_text("".join(json.dumps({"asin": i, "title": f"toy {i}", "price": "$3.00"}) + "\n" for i in ITEM_IDS))


def _recbole_item(path: Path):
    lines = ["item_id:token\ttitle:token_seq\tprice:float"] + [f"{i}\ttoy {i}\t3.5" for i in ITEM_IDS]
    path.write_bytes("\n".join(lines).replace("toy i04", "toy \udce9i04").encode("utf-8", "surrogateescape")
                     + b"\n")


def _recbole_inter(path: Path):
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                    + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in inter_rows()))


def _check_recbole(tmp, res):
    assert pack_report(tmp)["repaired"].get("non_utf8_text") == 1
    assert shard_texts(tmp)["i04"] == "toy \ufffdi04"


def _yaml_error(tool_args: list[str]):
    def setup(good, tmp):
        copy(good, tmp, "shards")
        (tmp / "bad.yaml").write_text("domain: Toy\nmin_core: [1\nout: x\n")
        return [*tool_args, "--config", str(tmp / "bad.yaml")]
    return setup


def _features_damaged(damage: Callable[[Path], None]):
    def setup(good, tmp):
        copy(good, tmp, "shards", "features")
        damage(tmp / "features" / "Toy")
        return pretrain_args(tmp, "fresh")
    return setup


def _garbage_header(fdir: Path):
    data = bytearray((fdir / "text.npy").read_bytes())
    data[:16] = b"\x00" * 16
    (fdir / "text.npy").write_bytes(bytes(data))


def _wrong_shape(fdir: Path):
    np.save(fdir / "text.npy", np.zeros((N_ITEMS, TEXT_DIM + 1), np.float16))


def _zero_shard(good, tmp):
    copy(good, tmp, "shards")
    shard = tmp / "shards" / "Toy" / "items-000000.tar"
    data = bytearray(shard.read_bytes())
    data[0:2048] = b"\x00" * 2048
    shard.write_bytes(bytes(data))
    from ant_dist.features.encoders import save_random_bert, save_random_swin
    save_random_bert(tmp / "bert")
    save_random_swin(tmp / "swin", image_size=32, embed_dim=16)
    return ["-m", "ant_dist.embed", f"shards={tmp / 'shards'}", f"out={tmp / 'features'}",
            f"text_encoder={tmp / 'bert'}", f"image_encoder={tmp / 'swin'}", "num_workers=0", "progress=false"]


def _missing_encoder(good, tmp):
    copy(good, tmp, "shards")
    return ["-m", "ant_dist.embed", f"shards={tmp / 'shards'}", f"out={tmp / 'features'}",
            f"text_encoder={tmp / 'no-bert'}", f"image_encoder={tmp / 'no-swin'}", "num_workers=0", "progress=false"]


def _shipped_embed_config(good, tmp):
    copy(good, tmp, "shards")
    return ["-m", "ant_dist.embed", "--config", str(ROOT / "configs" / "embed.yaml"), f"shards={tmp / 'shards'}",
            f"out={tmp / 'features'}", "progress=false"]


def _resume(*extra):
    def setup(good, tmp):
        copy(good, tmp, "shards", "features", "runs")
        return pretrain_args(tmp, "run", "max_steps=2", *extra)
    return setup


def _model_damaged(damage: Callable[[Path], None], command: str):
    def setup(good, tmp):
        copy(good, tmp, "shards", "features", "model", "serving")
        damage(tmp / "model")
        if command == "relearn":
            return relearn_args(tmp, tmp / "model")
        if command == "recommend":
            return recommend_args(tmp / "model", tmp)
        return ["-m", "ant_dist.export_serving", f"model={tmp / 'model'}", "domain=Toy", f"out={tmp / 'serving'}",
                "overwrite=true", "device=cpu", "progress=false"]
    return setup


def _relearn_with(*extra):
    def setup(good, tmp):
        copy(good, tmp, "shards", "features", "model")
        return relearn_args(tmp, tmp / "model", *extra)
    return setup


def _bad_json(model: Path):
    (model / "model_config.json").write_text('{"ant": {"irl": ')


def _checkpoint_damaged(good, tmp):
    copy(good, tmp, "shards", "features", "runs")
    [ckpt] = (tmp / "runs" / "run" / "checkpoints").iterdir()
    truncate(ckpt / "model.safetensors", 100)
    return pretrain_args(tmp, "run", "max_steps=2")


def _recbole_export_of(damage: Callable[[Path], None]):
    def setup(good, tmp):
        copy(good, tmp, "shards", "recbole")
        damage(tmp / "shards" / "Toy")
        return ["-m", "ant_dist.export_recbole", str(tmp / "shards" / "Toy"), "--out", str(tmp / "recbole")]
    return setup


def _report_with_config(good, tmp):
    run = tmp / "runs" / "r1"
    run.mkdir(parents=True)
    (tmp / "report.yaml").write_text(f"paths: [{tmp / 'runs'}]\nout: {tmp / 'report'}\n")
    return ["-m", "ant_dist.report", "--config", str(tmp / "report.yaml")]


def _report_empty(good, tmp):
    (tmp / "runs").mkdir()
    (tmp / "report").mkdir()
    (tmp / "report" / "report.md").write_text("the previous report\n")
    return ["-m", "ant_dist.report", str(tmp / "runs"), "--out", str(tmp / "report")]


def _garbage_interactions(good, tmp):
    copy(good, tmp, "shards", "features")
    (tmp / "shards" / "Toy" / "interactions.parquet").write_bytes(b"not parquet")
    return pretrain_args(tmp, "fresh")


def _damaged_state(good, tmp):
    copy(good, tmp, "shards", "features", "runs")
    [ckpt] = (tmp / "runs" / "run" / "checkpoints").iterdir()
    truncate(ckpt / "state.json", 10)
    return pretrain_args(tmp, "run", "max_steps=2")


def _recommend_damaged_features(good, tmp):
    copy(good, tmp, "shards", "features", "model")
    truncate(tmp / "features" / "Toy" / "text.npy", -40)
    return recommend_args(tmp / "model", tmp)


def _serving_occupied(good, tmp):
    copy(good, tmp, "shards", "features", "model", "serving")
    return ["-m", "ant_dist.export_serving", f"model={tmp / 'model'}", "domain=Toy", f"out={tmp / 'serving'}",
            "device=cpu", "progress=false"]


def _embed_over_other_encoders(good, tmp):
    copy(good, tmp, "shards", "features")
    from ant_dist.features.encoders import save_random_bert, save_random_swin
    save_random_bert(tmp / "bert")
    save_random_swin(tmp / "swin", image_size=32, embed_dim=16)
    return ["-m", "ant_dist.embed", f"shards={tmp / 'shards'}", f"out={tmp / 'features'}",
            f"text_encoder={tmp / 'bert'}", f"image_encoder={tmp / 'swin'}", "num_workers=0", "progress=false"]


def _embed_nothing_packed(good, tmp):
    (tmp / "shards").mkdir()
    return ["-m", "ant_dist.embed", f"shards={tmp / 'shards'}", f"out={tmp / 'features'}", "text_encoder=x",
            "image_encoder=y", "progress=false"]


PACK = ["-m", "ant_dist.data.pack_cli"]

ROWS = [
    # --- pack: the previous good pack survives every refusal
    Row("pack-typo-in-interactions", _repack(None, None, inter_name="inter.csvx"), 2,
        ("interactions file not found", "inter.csvx"), unchanged="shards/Toy"),
    Row("pack-items-without-text-column", _repack(_write("id,price\ni00,3\n")), 2,
        ("items.csv", "no column", "text"), unchanged="shards/Toy"),
    Row("pack-interactions-without-timestamp", _repack(None, _write("user,item\nu0,i00\n")), 2,
        ("inter.csv", "no column", "timestamp"), unchanged="shards/Toy"),
    Row("pack-missing-meta", _repack(None, None, meta_name="nope.csv"), 2, ("metadata file not found", "nope.csv"),
        unchanged="shards/Toy"),
    Row("pack-missing-image-folder", _repack(None, None, "images=/nonexistent/images"), 2,
        ("image folder not found",), unchanged="shards/Toy"),
    Row("pack-unknown-format", _repack(None, None, "format=excel"), 2, ("format", "excel"), unchanged="shards/Toy"),
    Row("pack-mostly-malformed-rows", _repack(None, _write("user,item,timestamp\n" + "u0,i00,1,extra\n" * 9
                                                           + "u0,i01,2\n")), 2,
        ("malformed", "Toy.failed_pack_report.json"), unchanged="shards/Toy"),
    Row("pack-nothing-survives-k-core", _repack(None, None, "min_core=100"), 2, ("core filtering",),
        unchanged="shards/Toy"),
    Row("pack-empty-interactions-file", _repack(None, _write("")), 2, ("inter.csv", "empty"), unchanged="shards/Toy"),
    Row("pack-garbage-parquet", _repack(_write(b"PAR1 not really"), None, meta_name="items.parquet"), 2,
        ("items.parquet",), unchanged="shards/Toy"),
    Row("pack-table-format-on-amazon-json", _repack(_amazon_json), 2,
        ("items.csv", "JSON lines", "format=amazon2018"), unchanged="shards/Toy"),
    Row("pack-amazon-format-on-a-csv-table", _repack(None, None, "format=amazon2018"), 2,
        ("malformed", "not JSON lines", "format=table"), unchanged="shards/Toy"),
    Row("pack-yaml-syntax-error", _yaml_error(PACK), 2, ("bad.yaml", "line 3"), unchanged="shards/Toy"),
    Row("pack-unknown-option", _repack(None, None, "min_coer=3"), 2, ("min_coer",), unchanged="shards/Toy"),
    Row("pack-non-utf8-table-text", _repack(_non_utf8_items), 0, check=_check_non_utf8),
    Row("pack-prices-of-every-kind", _repack(_priced_items), 0, check=_check_prices),
    Row("pack-out-of-range-timestamps", _repack(None, _bad_times), 0, check=_check_times),
    Row("pack-non-utf8-recbole-item", _repack(_recbole_item, _recbole_inter, "format=recbole"), 0,
        check=_check_recbole),
    Row("pack-non-utf8-recbole-item-table-hint", _repack(_recbole_item, _recbole_inter, "format=table"), 2,
        ("items.csv", "format=recbole"), unchanged="shards/Toy"),
    # --- embed
    Row("embed-zeroed-shard", _zero_shard, 2, ("items-000000.tar",), timeout=180),
    Row("embed-missing-encoder-folder", _missing_encoder, 2, ("no-bert", "save_pretrained")),
    Row("embed-shipped-config-without-encoders", _shipped_embed_config, 2, ("models/bert-base-uncased",)),
    Row("embed-verify-help", lambda g, t: ["-m", "ant_dist.embed", "verify", "--help"], 0, ("usage",)),
    Row("embed-yaml-syntax-error", _yaml_error(["-m", "ant_dist.embed"]), 2, ("bad.yaml", "line 3")),
    # --- pre-training on damaged feature tables: `embed verify`'s checks at load
    Row("pretrain-truncated-text-npy", _features_damaged(lambda d: truncate(d / "text.npy", -40)), 2,
        ("text.npy", "embed verify")),
    Row("pretrain-garbage-npy-header", _features_damaged(_garbage_header), 2, ("text.npy", "embed verify")),
    Row("pretrain-wrong-shape", _features_damaged(_wrong_shape), 2, ("text.npy", "shape")),
    Row("pretrain-missing-price-npy", _features_damaged(lambda d: (d / "price.npy").unlink()), 2, ("price.npy",)),
    Row("pretrain-garbage-manifest", _features_damaged(lambda d: (d / "manifest.json").write_text("{")), 2,
        ("manifest.json",)),
    Row("pretrain-yaml-syntax-error", _yaml_error(["-m", "ant_dist.pretrain"]), 2, ("bad.yaml", "line 3")),
    Row("pretrain-resume-another-hidden", _resume("hidden=32"), 2, ("hidden", "16", "32")),
    Row("pretrain-resume-another-layers", _resume("n_layers=2"), 2, ("n_layers",)),
    Row("pretrain-resume-another-batch-size", _resume("batch_size=8"), 2, ("batch_size",)),
    Row("pretrain-resume-truncated-checkpoint", _checkpoint_damaged, 2, ("model.safetensors",)),
    # --- models: relearn, recommend, export_serving
    Row("relearn-truncated-model", _model_damaged(lambda m: truncate(m / "model.safetensors", 64), "relearn"), 2,
        ("model.safetensors",)),
    Row("relearn-bad-model-config", _model_damaged(_bad_json, "relearn"), 2, ("model_config.json",)),
    Row("recommend-truncated-model", _model_damaged(lambda m: truncate(m / "model.safetensors", 64), "recommend"),
        2, ("model.safetensors",)),
    Row("recommend-bad-model-config", _model_damaged(_bad_json, "recommend"), 2, ("model_config.json",)),
    Row("export-serving-truncated-model", _model_damaged(lambda m: truncate(m / "model.safetensors", 64),
                                                         "export_serving"), 2, ("model.safetensors",),
        unchanged="serving"),
    Row("relearn-pretrained-another-hidden", _relearn_with("hidden=64"), 2, ("hidden", "64", "16")),
    Row("relearn-pretrained-another-layers", _relearn_with("n_layers=4"), 2, ("n_layers", "4", "1")),
    Row("relearn-pretrained-another-ffn-mult", _relearn_with("ffn_mult=4"), 2, ("ffn_mult", "4", "1")),
    # --- exports and the report
    Row("export-recbole-of-unpacked-folder", _recbole_export_of(lambda d: (d / "catalog.parquet").unlink()), 2,
        ("catalog.parquet",), unchanged="recbole"),
    Row("report-takes-config", _report_with_config, 2, ("metrics.json",)),
    Row("report-of-nothing", _report_empty, 2, ("metrics.json",), unchanged="report"),
    # --- found on the way
    Row("pretrain-garbage-interactions-parquet", _garbage_interactions, 2, ("interactions.parquet", "repack")),
    Row("pretrain-missing-domain", lambda g, t: pretrain_args(copy(g, t, "shards", "features"), "x",
                                                               "domains=[Nope]"), 2, ("Nope", "tools/pack.py")),
    Row("pretrain-resume-cut-short-state-json", _damaged_state, 2, ("state.json", "delete")),
    Row("recommend-truncated-features", _recommend_damaged_features, 2, ("text.npy", "embed verify")),
    Row("export-serving-occupied-without-overwrite", _serving_occupied, 2, ("overwrite=true",),
        unchanged="serving"),
    Row("embed-over-tables-of-other-encoders", _embed_over_other_encoders, 2, ("embedded differently",),
        unchanged="features"),
    Row("embed-nothing-packed", _embed_nothing_packed, 2, ("no packed domains",)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(good, tmp_path, row):
    args = row.setup(good, tmp_path)
    before = snapshot(tmp_path / row.unchanged) if row.unchanged else None
    res = run_entry(tmp_path, args, timeout=row.timeout)
    where = f"exit {res.returncode}\nstdout: {res.stdout[-1500:]}\nstderr: {res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, where
    assert res.returncode == row.code, where
    if row.code == 2:
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, f"a refusal is one line\n{where}"
        assert all(w in lines[0] for w in row.words), where
    else:
        assert all(w in res.stdout for w in row.words), where
    if before is not None:
        assert snapshot(tmp_path / row.unchanged) == before, "the previous good output changed"
    if row.check is not None:
        row.check(tmp_path, res)


def test_relearn_accepts_equal_architecture_options_and_records_the_models(good):
    """The other half of the refusal rows: a value equal to the model's is fine, and an option left
    at its default takes the model's value, so the saved config says what ran."""
    from ant_dist.config import RelearnConfig
    from ant_dist.train.pretrained_arch import adopt_architecture

    cfg = RelearnConfig(pretrained=str(good / "model"), domain="Toy", hidden=16)
    adopt_architecture(cfg, explicit={"hidden", "pretrained", "domain"})
    assert (cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.max_len, cfg.n_experts, cfg.ffn_mult) == (16, 1, 2, 10, 2, 1)
