"""Recommendations and the serving export, on a hand-built model whose ranking follows by hand.

The world: one domain "Toys" packed twice (v1: 7 items; v2: the same plus a new item "AB" that
sorts between A and B, so every later row shifts), with hand-written feature tables. The
hand-built IRL model maps an item to its text feature (every other weight is zero) and its user
model has no attention layers and zero position embeddings, so the user state is
LayerNorm(last item's feature). The features are zero-mean (rows of a Hadamard matrix), so
that LayerNorm only rescales, and the score of item j is cos(feature of the last history item,
feature of j): the expected ranking is a hand calculation.
"""

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from scipy.linalg import hadamard

from ant_dist.config import PackConfig
from ant_dist.features.feature_table import (
    FeatureTables,
    create_tables,
    read_catalog,
    shards_fingerprint,
    write_manifest,
)
from ant_dist.data.pack import pack_domain
from ant_dist.serving.export_serving import main as export_main
from ant_dist.model.ant import ANT, ANTConfig
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRec, SASRecConfig
from ant_dist.serving.recommend import main as recommend_main
from ant_dist.model.io import export_model

D, IMAGE_DIM = 8, 4
P1, P2, P3, P4 = (hadamard(D)[i].astype(np.float32) for i in range(1, 5))  # zero-mean, orthogonal
FEATURES = {"0123": P4, "A": P1, "B": P2, "C": P1 + 0.5 * P3, "D": P2 + 0.5 * P4, "E": P3, "F": -P1}
NEW = {"AB": 2 * P1 + 0.25 * P3}
LONG_TEXT = "a brand new toy " * 20


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _pack(root, name, features):
    ids = sorted(features)
    raw = root / f"raw-{name}"
    raw.mkdir()
    texts = [LONG_TEXT if i in NEW else f"toy {i}" for i in ids]
    pq.write_table(pa.table({"id": ids, "text": texts, "price": [9.5] * len(ids)}), raw / "items.parquet")
    # two users who between them touch every item (min_core=1 keeps them all)
    seq = ids + ids[::-1]
    users = ["u1"] * len(ids) + ["u2"] * len(ids)
    pq.write_table(pa.table({"user": users, "item": seq, "timestamp": list(range(len(seq)))}),
                   raw / "inter.parquet")
    pack_domain(PackConfig(domain="Toys", format="table", meta=str(raw / "items.parquet"),
                           interactions=str(raw / "inter.parquet"), out=str(root / name), min_core=1, workers=1,
                           progress=False))
    return root / name


def _embed(shards, out, features, text_fingerprint="text-encoder-1"):
    """Feature tables written directly (what ant_dist.embed would write for these features)."""
    catalog = read_catalog(shards / "Toys")
    ids = catalog.column("item_id").to_pylist()
    fdir = out / "Toys"
    price = np.asarray(catalog.column("price_norm").to_numpy(zero_copy_only=False), dtype=np.float32)
    create_tables(fdir, len(ids), D, IMAGE_DIM, price)
    t = FeatureTables.open(fdir)
    rows = np.arange(len(ids))
    t.write(rows, np.stack([features[i] for i in ids]), np.zeros((len(ids), IMAGE_DIM)), np.zeros(len(ids), bool))
    t.mark_done(rows)
    del t
    write_manifest(fdir, {"domain": "Toys", "rows": len(ids), "dtype": "float16", "complete": True,
                          "shards_dir": str(shards / "Toys"), "shards_fingerprint": shards_fingerprint(shards / "Toys"),
                          "text": {"fingerprint": text_fingerprint, "dim": D, "path": text_fingerprint},
                          "image": {"fingerprint": "image-encoder-1", "dim": IMAGE_DIM, "path": "img"}})
    return out


def _config(item_source, n_items=0, n_layers=0):
    return ANTConfig(item_source=item_source, n_items=n_items,
                     irl=IRLConfig(text_dim=D, image_dim=IMAGE_DIM, hidden=D, price_dim=8, n_heads=2, dropout=0.0),
                     sasrec=SASRecConfig(hidden=D, n_layers=n_layers, n_heads=2, max_len=5, dropout=0.0))


def _hand_built(model):
    """Item model: v = text feature; user model: LayerNorm(last item), no positions."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        if model.irl is not None:
            model.irl.text.weight.copy_(torch.eye(D).expand(2, D, D))  # both experts: identity
        model.sasrec.input_norm.weight.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    v1 = _pack(root, "shards", FEATURES)
    v2 = _pack(root, "shards2", {**FEATURES, **NEW})
    _embed(v1, root / "features", FEATURES)
    _embed(v2, root / "features2", {**FEATURES, **NEW})
    trained = {"features": str(root / "features"), "shards": str(root / "shards")}
    export_model(_hand_built(ANT(_config("irl"))), root / "irl", {"domains": ["Toys"], "items_per_domain": [7],
                                                                   **trained})
    # ID model trained on [Other (3 items), Toys]: Toys' rows start at 3 in the ID table. The
    # Other rows point along P1 strongly, so a missed offset would rank them first.
    ids = sorted(FEATURES)
    table = np.concatenate([np.stack([5 * P1] * 3), np.stack([FEATURES[i] for i in ids])])
    id_model = _hand_built(ANT(_config("id", n_items=10)))
    with torch.no_grad():
        id_model.id_embedding.weight.copy_(torch.from_numpy(table))
    export_model(id_model, root / "id", {"domains": ["Other", "Toys"], "items_per_domain": [3, 7], **trained})
    # irl+id: the ID part lifts E (P3 + 4 P1) above C when the ID table is used
    both = _hand_built(ANT(_config("irl+id", n_items=7)))
    with torch.no_grad():
        both.id_embedding.weight[ids.index("E")] = torch.from_numpy(4 * P1)
    export_model(both, root / "irl_id", {"domains": ["Toys"], "items_per_domain": [7], **trained})
    torch.manual_seed(0)
    rand = ANT(_config("irl", n_layers=1))
    with torch.no_grad():
        for p in rand.parameters():
            p.normal_(0.0, 0.5)
    export_model(rand.eval(), root / "random", {"domains": ["Toys"], "items_per_domain": [7], **trained})
    return root


def _run(main, capsys, *args):
    rc = main([*args, "progress=false", "device=cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def _recommend(toys, capsys, model, history, *extra):
    rc, out, err = _run(recommend_main, capsys, f"model={toys / model}", "domain=Toys", f"history={history}",
                        "json=true", *extra)
    assert rc == 0, err
    return json.loads(out), err


def test_top_item_is_the_nearest_to_the_last_history_item(toys, capsys):
    got, _ = _recommend(toys, capsys, "irl", "B,A", "k=4")
    items = got["items"]
    assert items[0]["item_id"] == "C"  # A (cos 1) and B are history: C is next
    assert items[0]["score"] == pytest.approx(1 / math.sqrt(1.25), abs=1e-5)
    assert not {"A", "B"} & {it["item_id"] for it in items}
    for it in items:  # every score is the hand cosine with the LAST item's feature
        assert it["score"] == pytest.approx(_cos(P1, FEATURES[it["item_id"]]), abs=1e-5)
        assert it["new"] is False and it["text"] == f"toy {it['item_id']}"
    assert got["scoring"] == "irl" and got["catalog_items"] == 7
    # order matters: ending with B makes D (P2 + P4/2) the best
    assert _recommend(toys, capsys, "irl", "A,B")[0]["items"][0]["item_id"] == "D"
    # an id that YAML would read as the octal number 83 is kept as typed
    assert _recommend(toys, capsys, "irl", "0123")[0]["items"][0]["item_id"] == "D"
    # keeping the history: the last item itself scores 1
    kept = _recommend(toys, capsys, "irl", "B,A", "exclude_history=false")[0]["items"][0]
    assert kept["item_id"] == "A" and kept["score"] == pytest.approx(1.0, abs=1e-5)


def test_new_item_comes_first_without_retraining(toys, capsys):
    new = (f"shards={toys / 'shards2'}", f"features={toys / 'features2'}")
    got, _ = _recommend(toys, capsys, "irl", "B,A", "k=3", *new)
    items = got["items"]
    assert [it["item_id"] for it in items[:2]] == ["AB", "C"]
    assert items[0]["score"] == pytest.approx(2 / math.sqrt(4.0625), abs=1e-5)
    assert items[0]["new"] is True and items[1]["new"] is False
    assert items[0]["text"] == LONG_TEXT.strip()
    # the table: rank, id, score (new items marked), text cut to ~80 characters
    rc, out, err = _run(recommend_main, capsys, f"model={toys / 'irl'}", "domain=Toys", "history=B,A", "k=3", *new)
    assert rc == 0, err
    lines = out.splitlines()
    assert "1 not seen in training" in lines[0]
    first = lines[2].split()
    assert first[:3] == ["1", "AB", f"{2 / math.sqrt(4.0625):.4f}*"]
    assert len(lines[2]) < 120 and lines[2].endswith("…")


def test_unknown_history_ids_and_bad_input_exit_2(toys, capsys):
    rc, _, err = _run(recommend_main, capsys, f"model={toys / 'irl'}", "domain=Toys", "history=A,NOPE,AB")
    assert rc == 2 and "NOPE" in err and "AB" in err  # AB exists only in the newer catalog
    rc, _, err = _run(recommend_main, capsys, f"model={toys / 'irl'}", "domain=Toys", "history=,")
    assert rc == 2 and "history is empty" in err
    rc, _, err = _run(recommend_main, capsys, f"model={toys / 'irl'}", "domain=Nowhere", "history=A")
    assert rc == 2 and "Nowhere" in err
    # features embedded with another text encoder than the model's
    other = toys / "features_other"
    if not other.exists():
        _embed(toys / "shards2", other, {**FEATURES, **NEW}, text_fingerprint="another-encoder")
    rc, _, err = _run(recommend_main, capsys, f"model={toys / 'irl'}", "domain=Toys", "history=A",
                      f"shards={toys / 'shards2'}", f"features={other}")
    assert rc == 2 and "another text encoder" in err


def test_id_models_score_only_their_catalog(toys, capsys, tmp_path):
    # on the trained catalog the ID table (at offset 3) gives the same ranking as the features
    got, _ = _recommend(toys, capsys, "id", "B,A")
    assert got["items"][0]["item_id"] == "C" and got["scoring"] == "id"
    assert got["items"][0]["score"] == pytest.approx(1 / math.sqrt(1.25), abs=1e-5)
    # a catalog with a new item: refused, and the message says what can score it
    rc, _, err = _run(recommend_main, capsys, f"model={toys / 'id'}", "domain=Toys", "history=B,A",
                      f"shards={toys / 'shards2'}", f"features={toys / 'features2'}")
    assert rc == 2 and "ID model" in err and "item_source=irl" in err and "8 items" in err
    # as many items as trained, but not the same ones (F replaced by G): refused too
    swapped = {**{i: f for i, f in FEATURES.items() if i != "F"}, "G": -P1}
    rc, _, err = _run(recommend_main, capsys, f"model={toys / 'id'}", "domain=Toys", "history=B,A",
                      f"shards={_pack(tmp_path, 'shards', swapped)}")
    assert rc == 2 and "other items" in err
    # irl+id: the ID part counts on its own catalog (E: P3 + 4 P1, cos 4/sqrt(17) beats C) ...
    got, _ = _recommend(toys, capsys, "irl_id", "B,A")
    assert got["items"][0]["item_id"] == "E" and got["scoring"] == "irl+id"
    assert got["items"][0]["score"] == pytest.approx(4 / math.sqrt(17), abs=1e-5)
    # ... and on the newer catalog it scores with the IRL part alone, and says so
    got, err = _recommend(toys, capsys, "irl_id", "B,A", f"shards={toys / 'shards2'}",
                          f"features={toys / 'features2'}")
    assert got["scoring"] == "irl-only" and "IRL part only" in err
    assert [it["item_id"] for it in got["items"][:2]] == ["AB", "C"]


def _serving_top_k(out, history, k):
    """Score from the exported files alone, as their README says: plain torch."""
    items = load_file(str(out / "item_embeddings.safetensors"))
    ids = pq.read_table(out / "item_ids.parquet").column("item_id").to_pylist()
    spec = json.loads((out / "user_encoder.json").read_text())
    encoder = SASRec(SASRecConfig(**spec["sasrec"])).eval()
    encoder.load_state_dict(load_file(str(out / "user_encoder.safetensors")))
    rows = [ids.index(i) for i in history]
    x = items["item_inputs"][rows][-spec["sasrec"]["max_len"]:].unsqueeze(0)
    with torch.no_grad():
        h = encoder(x, torch.ones(x.shape[:2], dtype=torch.bool))[0, -1]
    scores = items["item_table"] @ (h / h.norm())
    scores[rows] = -float("inf")
    top = torch.topk(scores, k)
    return [ids[i] for i in top.indices.tolist()], top.values.tolist(), items, ids


def test_serving_export_scores_like_recommend(toys, capsys):
    new = (f"shards={toys / 'shards2'}", f"features={toys / 'features2'}")
    out = toys / "serving"
    rc, _, err = _run(export_main, capsys, f"model={toys / 'random'}", "domain=Toys", f"out={out}", *new)
    assert rc == 0, err
    # a history longer than max_len (5): only the most recent 5 count, on both paths
    history = ["F", "E", "0123", "D", "C", "B"]
    want_ids, want_scores, items, ids = _serving_top_k(out, history, 2)
    got, _ = _recommend(toys, capsys, "random", ",".join(history), "k=2", *new)
    assert [it["item_id"] for it in got["items"]] == want_ids
    assert [it["score"] for it in got["items"]] == pytest.approx(want_scores, abs=1e-5)
    assert ids == sorted({**FEATURES, **NEW})
    assert torch.allclose(items["item_table"].norm(dim=1), torch.ones(len(ids)), atol=1e-6)
    assert json.loads((out / "serving.json").read_text())["items"] == 8
    # a second export into the same folder is refused unless asked for
    rc, _, err = _run(export_main, capsys, f"model={toys / 'random'}", "domain=Toys", f"out={out}", *new)
    assert rc == 2 and "overwrite=true" in err


def test_serving_export_of_the_hand_built_model(toys, capsys):
    out = toys / "serving_hand"
    rc, _, err = _run(export_main, capsys, f"model={toys / 'irl'}", "domain=Toys", f"out={out}",
                      f"shards={toys / 'shards2'}", f"features={toys / 'features2'}", "overwrite=true")
    assert rc == 0, err
    want_ids, want_scores, items, ids = _serving_top_k(out, ["B", "A"], 2)
    # the item model is the identity: inputs are the features, the table their unit vectors
    feats = torch.from_numpy(np.stack([{**FEATURES, **NEW}[i] for i in ids]))
    assert torch.allclose(items["item_inputs"], feats, atol=1e-6)
    assert torch.allclose(items["item_table"], feats / feats.norm(dim=1, keepdim=True), atol=1e-6)
    assert want_ids == ["AB", "C"] and want_scores[0] == pytest.approx(2 / math.sqrt(4.0625), abs=1e-5)
    shutil.rmtree(out)
