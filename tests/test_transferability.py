"""Transferability analysis (paper section 6.3) on hand-made feature tables whose answer is known.

World: a target T and auxiliaries A1, A2, 600 items each, 8-d text and image features.
- text: N(0, I) shifted along dim 0 by 0 (T), +6 (A1), -6 (A2): separable (Bayes accuracy 0.9987);
- image: N(3, I) in every domain: inseparable (0.5). A1 lacks 40% of its images (zero rows);
  zero rows lie far from the N(3, I) cloud, so counting them would make (T, A1) separable;
- price: U[0, 30] in T and A1 (A1 with 30% unknown), U[60, 100] in A2.
The model is a fresh ANT: its gates start at zero, so each z is an injective linear map of its
input (hidden 16 >= input dims 8): separability is kept, and identical distributions stay identical.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest

from ant_dist.features.feature_table import shards_fingerprint, write_manifest
from ant_dist.model.ant import ANT, ANTConfig
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRecConfig
from ant_dist.model.io import export_model
from ant_dist.eval.transferability import MODALITIES, balanced_split, embed_domain, main, split_counts

N_ITEMS, DIM = 600, 8
COMMON = ["progress=false", "c_grid=[0.1,1.0,10.0]"]


def _write_domain(root: Path, name: str, text_shift: float, image_missing: float, price_range, price_missing: float,
                  rng: np.random.Generator) -> None:
    shard_dir, fdir = root / "shards" / name, root / "features" / name
    shard_dir.mkdir(parents=True)
    fdir.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": [f"{name}-{i}" for i in range(N_ITEMS)]}), shard_dir / "catalog.parquet")
    text = rng.normal(size=(N_ITEMS, DIM))
    text[:, 0] += text_shift
    image = rng.normal(loc=3.0, size=(N_ITEMS, DIM))
    has_image = rng.random(N_ITEMS) >= image_missing
    image[~has_image] = 0.0
    price = rng.uniform(*price_range, size=N_ITEMS).astype(np.float32)
    price[rng.random(N_ITEMS) < price_missing] = np.nan
    np.save(fdir / "text.npy", text.astype(np.float16))
    np.save(fdir / "image.npy", image.astype(np.float16))
    np.save(fdir / "price.npy", price)
    np.save(fdir / "has_image.npy", has_image)
    np.save(fdir / "done.npy", np.ones(N_ITEMS, dtype=bool))
    write_manifest(fdir, {"domain": name, "rows": N_ITEMS, "dtype": "float16", "complete": True,
                          "text": {"fingerprint": "text-enc", "dim": DIM},
                          "image": {"fingerprint": "image-enc", "dim": DIM},
                          "shards_fingerprint": shards_fingerprint(shard_dir)})


def _tiny_ant(seed: int) -> ANT:
    torch.manual_seed(seed)
    return ANT(ANTConfig(irl=IRLConfig(text_dim=DIM, image_dim=DIM, hidden=16, price_dim=8, n_heads=2),
                         sasrec=SASRecConfig(hidden=16, n_layers=1, max_len=10)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    rng = np.random.default_rng(0)
    _write_domain(root, "T", 0.0, 0.0, (0, 30), 0.0, rng)
    _write_domain(root, "A1", 6.0, 0.4, (0, 30), 0.3, rng)
    _write_domain(root, "A2", -6.0, 0.0, (60, 100), 0.0, rng)
    model = _tiny_ant(1)
    export_model(model, root / "model", {"stage": "pretrain", "domains": ["A1", "A2"]})
    # the same model with the text experts blind to dim 0, the only one where domains differ
    with torch.no_grad():
        model.irl.text.weight[:, 0, :] = 0.0
    export_model(model, root / "model_blind", {"stage": "pretrain", "domains": ["A1", "A2"]})
    return root


def _args(world, out, *extra, model="model"):
    return [f"model={world / model}", f"features={world / 'features'}", f"shards={world / 'shards'}",
            f"out={world / out}", *COMMON, *extra]


def _cells(out_dir):
    report = json.loads((out_dir / "transferability.json").read_text())
    return report, {(c["target"], c["auxiliary"], c["modality"]): c for c in report["results"]}


def _chance(cell):
    # balanced test classes: a classifier that has learned nothing is right Binomial(n, 0.5) times
    return binomtest(cell["correct"], cell["n_test"], 0.5).pvalue > 1e-3


@pytest.fixture(scope="module")
def default_run(world):
    # auxiliary omitted: the model's pre-training domains (A1, A2)
    assert main(_args(world, "out", "targets=[T]", "max_items_per_domain=0")) == 0
    return world / "out"


def test_known_separabilities(default_run):
    report, cells = _cells(default_run)
    assert report["auxiliary"] == ["A1", "A2"]
    for aux in ("A1", "A2"):
        assert cells["T", aux, "text"]["accuracy"] >= 0.97
        assert _chance(cells["T", aux, "image"])
    assert _chance(cells["T", "A1", "price"])
    assert cells["T", "A2", "price"]["accuracy"] >= 0.97
    # items without an image / price are left out: A1 keeps ~60% / ~70%, T keeps all, classes balanced
    assert cells["T", "A1", "image"]["n_per_class"] == report["domains"]["A1"]["with_image"]
    assert cells["T", "A1", "price"]["n_per_class"] == report["domains"]["A1"]["with_price"]
    assert 0.5 * N_ITEMS < report["domains"]["A1"]["with_image"] < 0.7 * N_ITEMS
    for c in cells.values():
        n_train, n_valid, n_test = (round(f * c["n_per_class"]) for f in (0.7, 0.1, 0.2))
        assert (c["n_train"], c["n_valid"]) == (2 * n_train, 2 * n_valid)
        assert c["n_train"] + c["n_valid"] + c["n_test"] == 2 * c["n_per_class"]
        assert c["accuracy"] == c["correct"] / c["n_test"]
        assert c["ci95"][0] <= c["accuracy"] <= c["ci95"][1]


def test_table_matches_json_and_heatmap_opens(default_run):
    _, cells = _cells(default_run)
    md = (default_run / "transferability.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| target | auxiliary | text"))
    rows = [[x.strip() for x in line.strip("|").split("|")] for line in md[header + 2:header + 4]]
    assert [r[:2] for r in rows] == [["T", "A1"], ["T", "A2"]]
    for r in rows:
        for m, shown in zip(MODALITIES, r[2:]):
            assert float(shown) == round(cells[r[0], r[1], m]["accuracy"], 3)
    with Image.open(default_run / "transferability.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 50


def test_missing_modalities_counted_when_asked(world):
    # keeping A1's image-less and price-less items lets the classifier spot the placeholders
    assert main(_args(world, "out_keep", "targets=[T]", "auxiliary=[A1]", "exclude_missing=false")) == 0
    _, cells = _cells(world / "out_keep")
    assert cells["T", "A1", "image"]["n_per_class"] == N_ITEMS
    for m, missing in (("image", 0.4), ("price", 0.3)):
        # expected 0.5 + missing / 2; far from chance
        assert cells["T", "A1", m]["accuracy"] > 0.5 + missing / 4
        assert not _chance(cells["T", "A1", m])


def test_uses_the_models_transformed_embeddings(world):
    # the blind model's z_t carries no dim-0 information: text becomes inseparable
    assert main(_args(world, "out_blind", "targets=[T]", "auxiliary=[A1,A2]", "max_items_per_domain=300",
                      model="model_blind")) == 0
    _, cells = _cells(world / "out_blind")
    for aux in ("A1", "A2"):
        assert _chance(cells["T", aux, "text"])
        assert cells["T", aux, "text"]["n_per_class"] == 300
        assert cells["T", aux, "text"]["n_test"] == 2 * 60  # 300 - 210 - 30 per class


def test_embed_matches_hand_formula(world):
    from ant_dist.features.feature_table import load_features
    from ant_dist.model.io import load_model

    model, _ = load_model(world / "model")
    irl = model.irl.eval()
    table = load_features(world / "features" / "T")
    rows = np.array([0, 5, 17])
    got = embed_domain(irl, table, rows, batch_size=2, device=torch.device("cpu"))
    for m, name in (("text", "text"), ("image", "image")):
        moe = getattr(irl, name)
        w, b = moe.weight.detach().numpy(), moe.bias.detach().numpy()
        x = np.asarray(table[name][rows], dtype=np.float32)
        # zero gates: the plain mean of the experts (x - b_k) W_k
        want = np.mean([(x - b[k]) @ w[k] for k in range(len(w))], axis=0)
        np.testing.assert_allclose(got[m], want, rtol=1e-5, atol=1e-5)


def test_balanced_split_sizes():
    assert split_counts(37) == (26, 4, 7)
    split = balanced_split(np.arange(100), np.arange(1000, 1037), np.random.default_rng(0))
    sizes = {s: (len(t), len(a)) for s, (t, a) in split.items()}
    assert sizes == {"train": (26, 26), "valid": (4, 4), "test": (7, 7)}
    t_all = np.concatenate([t for t, _ in split.values()])
    a_all = np.concatenate([a for _, a in split.values()])
    assert len(set(t_all)) == 37 and set(t_all) <= set(range(100))
    assert sorted(a_all) == list(range(1000, 1037))


def test_bad_input(world, capsys):
    assert main(_args(world, "bad", "targets=[T]", model="nowhere")) == 2
    assert "not an exported model" in capsys.readouterr().err
    assert main(_args(world, "bad", "targets=[T]", "auxiliary=[A1,Nope]")) == 2
    err = capsys.readouterr().err
    assert "unknown domain 'Nope'" in err and "A2" in err
    with pytest.raises(SystemExit) as exc:
        main(_args(world, "bad"))  # targets is required
    assert exc.value.code == 2
    assert "targets" in capsys.readouterr().err
    assert not (world / "bad").exists()


def test_cli_exit_code(world):
    proc = subprocess.run([sys.executable, "-m", "ant_dist.transferability",
                           *_args(world, "bad", "targets=[Nope]")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown domain 'Nope'" in proc.stderr
