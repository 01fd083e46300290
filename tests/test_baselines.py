"""RecBole baselines (python -m ant_dist.baselines): the split RecBole trains on is ours, our
metric recomputation equals RecBole's own full-sort evaluation where the rules coincide, and a
run's metrics.json is read by the report like any other run. Real RecBole 1.2.1 throughout."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("recbole")

from ant_dist.baselines import run as baselines  # noqa: E402
from ant_dist.baselines.scoring import RecboleScorer, Sequences  # noqa: E402
from ant_dist.baselines.text_features import TextFeatureLayer, text_cluster_tokens  # noqa: E402
from ant_dist.config import BaselinesConfig, PackConfig  # noqa: E402
from ant_dist.data.export_recbole import read_packed_domain  # noqa: E402
from ant_dist.data.pack import pack_domain  # noqa: E402
from ant_dist.eval.results import read_metrics  # noqa: E402
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK  # noqa: E402

TINY = ["epochs=2", "max_len=10", "batch_size=64", "hidden=16", "inner_size=32", "s3rec_pretrain_epochs=1",
        "progress=false"]


def _cfg(world, tmp_path, **kw) -> BaselinesConfig:
    base = dict(domain="Office", shards=str(world / "shards"), features=str(world / "features"), out=str(tmp_path),
                epochs=2, max_len=10, batch_size=64, hidden=16, inner_size=32, progress=False, tracker="none")
    return BaselinesConfig(**{**base, **kw})


def _our_sequences(domain_dir: Path) -> dict:
    """user id -> item ids in time order, read straight from interactions.parquet and the catalog."""
    catalog = pq.read_table(domain_dir / "catalog.parquet").column("item_id").to_pylist()
    inter = pq.read_table(domain_dir / "interactions.parquet").to_pydict()
    return {u: [catalog[r] for r in rows] for u, rows in zip(inter["user_id"], inter["items"])}


def _rows(loader, dataset) -> dict:
    """user token -> [(input item tokens, target item token)] of a RecBole loader's rows."""
    feat = loader._dataset.inter_feat
    users = dataset.id2token("user_id", feat["user_id"].numpy())
    out = defaultdict(list)
    for u, seq, n, t in zip(users, feat["item_id_list"].numpy(), feat["item_length"].numpy(), feat["item_id"].numpy()):
        out[u].append((list(dataset.id2token("item_id", seq[:n])), dataset.id2token("item_id", [t])[0]))
    return out


@pytest.fixture(scope="module")
def sasrec(world, tmp_path_factory):
    """RecBole's SASRec on the world's target, set up by the baselines stage, trained one epoch."""
    tmp = tmp_path_factory.mktemp("sasrec")
    cfg = _cfg(world, tmp)
    packed = read_packed_domain(world / "shards" / "Office")
    seqs = Sequences.from_packed(packed)
    config, dataset, loaders, text, _ = baselines.prepare_data(cfg, "SASRec", tmp / "run", packed, seqs)
    model = baselines.build_model(config, dataset, "SASRec", text, seqs)
    from ant_dist.baselines.recbole_setup import build_trainer
    trainer = build_trainer(config, model, tmp / "tb")
    trainer._train_epoch(loaders[0], 0)
    return {"cfg": cfg, "config": config, "dataset": dataset, "loaders": loaders, "model": model,
            "trainer": trainer, "seqs": seqs}


def test_recbole_split_is_ours(world, sasrec):
    """Every user's training rows, validation row and test row in RecBole are ours: inputs are the
    last max_len items before the target; training targets are positions 1..n-3."""
    ours = _our_sequences(world / "shards" / "Office")
    train, valid, test = (_rows(loader, sasrec["dataset"]) for loader in sasrec["loaders"])
    L = sasrec["cfg"].max_len
    assert set(test) == set(valid) == set(ours)
    for u, seq in ours.items():
        assert len(seq) >= 4
        assert train[u] == [(seq[max(0, i - L):i], seq[i]) for i in range(1, len(seq) - 2)], u
        assert valid[u] == [(seq[:-2][-L:], seq[-2])], u
        assert test[u] == [(seq[:-1][-L:], seq[-1])], u


def test_our_metrics_equal_recbole_full_sort(sasrec):
    """Without history exclusion (RecBole's rule) our per-user recomputation averages to what
    RecBole's own full-sort evaluation reports on the same trained model."""
    theirs = sasrec["trainer"].evaluate(sasrec["loaders"][2], load_best_model=False)
    scorer = RecboleScorer(sasrec["model"], sasrec["dataset"], sasrec["seqs"], sasrec["config"]["device"])
    users = sasrec["seqs"].eval_users()
    assert len(users) == len(sasrec["seqs"].sequences)  # min_core 5: every user is evaluated by both
    ours = scorer.evaluate(users, "test", exclude_history=False, batch=37)["mean"]
    for k in (10, 20, 50):
        assert ours[f"recall@{k}"] == pytest.approx(float(theirs[f"recall@{k}"]), abs=1e-4)
        assert ours[f"ndcg@{k}"] == pytest.approx(float(theirs[f"ndcg@{k}"]), abs=1e-4)
    assert 0 < ours["recall@50"] < 1  # a real, non-degenerate comparison
    # excluding the history can only lift a target (fewer items compete): never lower per user
    excl = scorer.evaluate(users, "test", exclude_history=True, batch=50)["per_user"]
    incl = scorer.evaluate(users, "test", exclude_history=False, batch=50)["per_user"]
    assert np.all(np.asarray(excl["recall@10"]) >= np.asarray(incl["recall@10"]))


def test_scores_are_in_catalog_order(sasrec):
    """Column r of our score matrix is catalog row r: the dot product of the user state with that
    item's RecBole embedding, computed here by hand."""
    model, seqs = sasrec["model"], sasrec["seqs"]
    scorer = RecboleScorer(model, sasrec["dataset"], seqs, sasrec["config"]["device"])
    got = scorer.scores([0, 1], cut=1)
    inter = scorer.interaction([0, 1], cut=1)
    model.eval()
    with torch.no_grad():
        h = model.forward(inter["item_id_list"], inter["item_length"])  # RecBole's SASRec: the last state
        ids = sasrec["dataset"].token2id("item_id", seqs.item_tokens)
        want = h @ model.item_embedding.weight[torch.as_tensor(ids)].T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_text_clusters_group_similar_texts():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8) * 10
    text = np.concatenate([c + rng.normal(0, 0.1, (5, 8)) for c in centres])
    tokens = [t.split() for t in text_cluster_tokens(text, k=4, seed=0)]
    assert all(len(t) == 3 and len(set(t)) == 3 for t in tokens)
    first = [t[0] for t in tokens]
    for g in range(4):  # same group, same nearest cluster; different groups, different ones
        assert len(set(first[5 * g:5 * g + 5])) == 1
    assert len(set(first)) == 4


def test_text_feature_layer_reads_our_vectors():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    layer = TextFeatureLayer(table, hidden=2)
    sparse, dense = layer(None, torch.tensor([[1, 3]]))
    assert sparse["item"] is None and dense["item"].shape == (1, 2, 1, 2)
    want = torch.as_tensor(table[[1, 3]]) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(dense["item"][0, :, 0], want)
    assert "table" not in layer.state_dict()  # data, rebuilt from the feature table


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "ant_dist.baselines", *args], capture_output=True, text=True,
                          timeout=900, **kw)


@pytest.mark.slow
def test_baselines_end_to_end(world, tmp_path):
    """All five through the CLI (W&B offline): each metrics.json passes the report's schema check
    and covers every user with >= 3 items; FDSA trained our text projection; a rerun is a no-op."""
    args = [f"shards={world / 'shards'}", f"features={world / 'features'}", f"out={tmp_path}", "domain=Office",
            "models=[NPE,SASRec,BERT4Rec,FDSA,S3-Rec]", *TINY]
    res = _run(args)
    assert res.returncode == EXIT_OK, res.stderr[-3000:]
    users = Sequences.from_packed(read_packed_domain(world / "shards" / "Office")).eval_users()
    for label in ("NPE", "SASRec", "BERT4Rec", "FDSA", "S3-Rec"):
        run_dir = tmp_path / "baselines" / "Office" / label / "seed0"
        run = read_metrics(run_dir / "metrics.json", ["recall@10", "ndcg@10", "recall@50"])
        assert run.method == label and run.fraction == 1.0
        assert np.array_equal(run.test["Office"].user_ids, users)
        assert 0 <= run.best["epoch"] < 2
        assert (run_dir / "model" / "model.safetensors").is_file()
        assert list((run_dir / "wandb").glob("offline-run-*")), label
    from safetensors.torch import load_file
    fdsa = load_file(str(tmp_path / "baselines" / "Office" / "FDSA" / "seed0" / "model" / "model.safetensors"))
    assert "feature_embed_layer.proj.weight" in fdsa
    assert not [k for k in fdsa if k.startswith("feature_embed_layer.") and "proj" not in k]
    before = (tmp_path / "baselines" / "Office" / "SASRec" / "seed0" / "metrics.json").stat().st_mtime_ns
    again = _run(args[:-len(TINY)] + ["model=SASRec", "models=[]", "progress=false"])
    assert again.returncode == EXIT_OK and "exists" in again.stdout
    assert (tmp_path / "baselines" / "Office" / "SASRec" / "seed0" / "metrics.json").stat().st_mtime_ns == before


def test_bad_inputs_exit_2(world, tmp_path):
    common = [f"features={world / 'features'}", f"out={tmp_path / 'runs'}", *TINY, "tracker=none"]
    # a domain where one user has 3 items (min_core=1 keeps him): RecBole's split would differ from ours
    entry = next(d for d in json.loads((world / "raw" / "synth_manifest.json").read_text())["target"]
                 if d["name"] == "Office")
    rows = Path(entry["interactions"]).read_text().splitlines()
    first_user = rows[0].split(",")[1]
    mine = [r for r in rows if r.split(",")[1] == first_user]
    short = tmp_path / "short.csv"
    short.write_text("\n".join([r for r in rows if r.split(",")[1] != first_user] + mine[:3]) + "\n")
    report = pack_domain(PackConfig(domain="Short", format="amazon2018", meta=entry["meta"], interactions=str(short),
                                    images=entry["images"], out=str(tmp_path / "shards"), min_core=1,
                                    progress=False, workers=1))
    assert report["status"] == "complete"
    res = _run(["domain=Short", f"shards={tmp_path / 'shards'}", "model=SASRec", *common])
    assert res.returncode == EXIT_BAD_INPUT and "1 users have fewer than 4 items" in res.stderr, res.stderr[-2000:]
    # no packed domain; a text model without the feature table; an unknown model
    res = _run(["domain=Nowhere", f"shards={world / 'shards'}", "model=SASRec", *common])
    assert res.returncode == EXIT_BAD_INPUT and "Nowhere" in res.stderr
    res = _run(["domain=Office", f"shards={world / 'shards'}", "model=FDSA", *common[1:],
                f"features={tmp_path / 'nofeatures'}"])
    assert res.returncode == EXIT_BAD_INPUT and "text embeddings" in res.stderr
    res = _run(["domain=Office", f"shards={world / 'shards'}", "model=GRU4Rec", *common])
    assert res.returncode == EXIT_BAD_INPUT and "model must be one of" in res.stderr
    assert not list((tmp_path / "runs").rglob("metrics.json"))


@pytest.mark.slow
def test_sigterm_stops_a_run_with_exit_75_and_no_results(world, tmp_path):
    """SIGTERM during training: exit 75 (EXIT_STOPPED) before the next batch, no metrics.json."""
    import signal
    import time

    from ant_dist.runtime.exit_codes import EXIT_STOPPED

    args = [sys.executable, "-m", "ant_dist.baselines", f"shards={world / 'shards'}", f"features={world / 'features'}",
            f"out={tmp_path}", "domain=Office", "model=SASRec", "epochs=100000", "patience=100000", "max_len=10",
            "batch_size=16", "hidden=16", "inner_size=32", "tracker=none", "progress=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "baselines" / "Office" / "SASRec" / "seed0" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 600  # a generous bound on a loaded machine, not a timing
        while not (log.is_file() and log.read_text().strip()):  # training is under way: an epoch was logged
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no epoch logged"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "stopped by signal" in err
    assert not (log.parent / "metrics.json").exists()


def test_a_stop_flag_ends_training_before_the_next_batch():
    stop = {"signal": 0}
    batches = baselines.StoppableBatches([1, 2, 3], stop)
    seen = []
    with pytest.raises(baselines.Stopped):
        for b in batches:
            seen.append(b)
            stop["signal"] = 15
    assert seen == [1] and len(batches) == 3
