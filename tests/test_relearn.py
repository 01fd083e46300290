"""Re-learning on a target domain: what each mode loads, freezes and trains; model selection;
test metrics from the best validation weights, checked against a naive evaluation."""

import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ant_dist.config import RelearnConfig, load_config
from ant_dist.methods import FUSION_ABLATION, IRL_ITEM_REPRS, IRL_ONLY_OPTIONS, ITEM_REPRS
from ant_dist.model.ant import ANT, ANTConfig, FeatureBank
from ant_dist.pipeline.launcher import launch_command
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRecConfig
from ant_dist.relearn import main as relearn_main
from ant_dist.model.io import export_model, load_model
from ant_dist.train.data import Corpus, DomainSequences
from ant_dist.train.selection import Selection
from ant_dist.train.target import build_target_model
from test_pretrain import _records, _run

# ---------------------------------------------------------------------------- parameters per mode


def _pretrained_dir(tmp_path):
    torch.manual_seed(1)
    model = ANT(ANTConfig(irl=IRLConfig(text_dim=12, image_dim=10, hidden=16, n_heads=3),
                          sasrec=SASRecConfig(hidden=16, n_layers=1, n_heads=2, max_len=7)))
    with torch.no_grad():  # every tensor random, so a re-initialised one can never equal it by chance
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    export_model(model, tmp_path / "pre", {"domains": ["A"], "seed": 4})
    return tmp_path / "pre", {k: v.clone() for k, v in model.state_dict().items()}


def _group(name):
    if name.startswith("irl."):
        return "irl"
    if name.startswith("id_embedding."):
        return "id"
    if name.startswith("sasrec.position."):
        return "position"
    return "sasrec"


# (mode, item_repr) -> per group: (loaded from the pre-trained model?, trained?); None = absent
EXPECTED = {
    ("relearn", "irl"): {"irl": (False, True), "position": (False, True), "sasrec": (True, False), "id": None},
    ("relearn", "irl+id"): {"irl": (False, True), "position": (False, True), "sasrec": (True, False),
                            "id": (False, True)},
    ("relearn", "id"): {"irl": None, "position": (False, True), "sasrec": (True, False), "id": (False, True)},
    ("finetune", "irl"): {"irl": (True, True), "position": (True, False), "sasrec": (True, False), "id": None},
    ("finetune", "irl+id"): {"irl": (True, True), "position": (True, False), "sasrec": (True, False),
                             "id": (False, True)},
    ("scratch", "irl"): {"irl": (False, True), "position": (False, True), "sasrec": (False, True), "id": None},
    ("scratch", "id"): {"irl": None, "position": (False, True), "sasrec": (False, True), "id": (False, True)},
    ("zeroshot", "irl"): {"irl": (True, False), "position": (True, False), "sasrec": (True, False), "id": None},
}


@pytest.mark.parametrize("mode,item_repr", sorted(EXPECTED))
def test_each_mode_loads_freezes_and_trains_exactly_its_parameters(tmp_path, mode, item_repr):
    pre, weights = _pretrained_dir(tmp_path)
    cfg = load_config(RelearnConfig, None, [f"pretrained={pre}", "domain=T", f"mode={mode}",
                                            f"item_repr={item_repr}"])
    features, corpus = SimpleNamespace(text_dim=12, image_dim=10), SimpleNamespace(n_items=9)
    torch.manual_seed(0)
    model = build_target_model(cfg, features, corpus)
    seen = {g: 0 for g in ("irl", "position", "sasrec", "id")}
    for name, p in model.named_parameters():
        group = _group(name)
        expect = EXPECTED[(mode, item_repr)][group]
        assert expect is not None, f"{name} should not exist with item_repr={item_repr}"
        loaded, trained = expect
        seen[group] += 1
        if group == "id":
            assert p.shape == (9, 16), "the ID table spans the target catalog"
        else:
            same = torch.equal(p.detach(), weights[name])
            assert same == loaded, f"{mode}/{item_repr}: {name} {'differs from' if loaded else 'equals'} the " \
                                   f"pre-trained tensor"
        assert p.requires_grad == trained, f"{mode}/{item_repr}: {name} requires_grad={p.requires_grad}"
    for group, expect in EXPECTED[(mode, item_repr)].items():
        assert (seen[group] > 0) == (expect is not None), f"{group} presence"
    assert model.cfg.sasrec.max_len == 7 and model.cfg.sasrec.hidden == 16, "architecture of the pre-trained model"


@pytest.mark.parametrize("mode,item_repr,score,pre_score,expect", [
    ("scratch", "id", "", "cos", "dot"),            # SASRec's paper: the dot product
    ("scratch", "irl", "", "dot", "cos"),           # ANT's paper (eq. 13); GB ignores the pre-trained score
    ("scratch", "irl+id", "", "cos", "cos"),        # ANT_e
    ("relearn", "irl+id", "", "dot", "dot"),        # a pre-trained user model keeps its score
    ("finetune", "irl", "", "cos", "cos"),
    ("scratch", "id", "cos", "cos", "cos"),         # an explicit setting wins
    ("relearn", "irl", "dot", "cos", "dot"),
])
def test_score_defaults_to_the_methods_paper(tmp_path, mode, item_repr, score, pre_score, expect):
    pre, _ = _pretrained_dir(tmp_path)
    cfg_json = pre / "model_config.json"
    config = json.loads(cfg_json.read_text())
    config["ant"]["score"] = pre_score
    cfg_json.write_text(json.dumps(config))
    cfg = load_config(RelearnConfig, None, [f"pretrained={pre}", "domain=T", f"mode={mode}",
                                            f"item_repr={item_repr}"] + ([f"score={score}"] if score else []))
    model = build_target_model(cfg, SimpleNamespace(text_dim=12, image_dim=10), SimpleNamespace(n_items=9))
    assert model.cfg.score == expect
    export_model(model, tmp_path / "out", {})
    assert load_model(tmp_path / "out")[0].cfg.score == expect, "exported and loaded with its score"


def test_a_model_exported_before_the_score_option_loads_as_cosine(tmp_path):
    pre, _ = _pretrained_dir(tmp_path)
    config = json.loads((pre / "model_config.json").read_text())
    del config["ant"]["score"]
    (pre / "model_config.json").write_text(json.dumps(config))
    assert load_model(pre)[0].cfg.score == "cos"


def test_ffn_mult_sets_the_feed_forward_width_and_a_pretrained_model_keeps_its_own(tmp_path):
    """RecBole's SASRec has inner_size 256 at hidden 64 (ffn_mult=4); the authors' ANT code 1 x hidden."""
    cfg = load_config(RelearnConfig, None, ["domain=T", "mode=scratch", "item_repr=id", "hidden=8", "ffn_mult=4"])
    model = build_target_model(cfg, SimpleNamespace(text_dim=12, image_dim=10), SimpleNamespace(n_items=9))
    assert [b.ffn[0].out_features for b in model.sasrec.blocks] == [32] * cfg.n_layers
    assert [b.ffn[2].in_features for b in model.sasrec.blocks] == [32] * cfg.n_layers
    export_model(model, tmp_path / "out", {})
    assert load_model(tmp_path / "out")[0].sasrec.blocks[0].ffn[0].out_features == 32, "saved with its width"
    pre, _ = _pretrained_dir(tmp_path)  # ffn_mult 1
    cfg = load_config(RelearnConfig, None, [f"pretrained={pre}", "domain=T", "mode=relearn"])
    model = build_target_model(cfg, SimpleNamespace(text_dim=12, image_dim=10), SimpleNamespace(n_items=9))
    assert model.sasrec.blocks[0].ffn[0].out_features == 16


def test_ablations_switch_off_item_model_parts(tmp_path):
    pre, _ = _pretrained_dir(tmp_path)
    cfg = load_config(RelearnConfig, None, [f"pretrained={pre}", "domain=T", "ablate=[-T,P,MoE,MF]"])
    model = build_target_model(cfg, SimpleNamespace(text_dim=12, image_dim=10), SimpleNamespace(n_items=9))
    irl = model.irl.cfg
    assert (irl.use_text, irl.use_image, irl.use_price, irl.use_moe, irl.use_fusion) == (False, True, False, False,
                                                                                         False)
    assert not any("w_gate" in n for n, _ in model.named_parameters()), "-MoE: plain linear maps"


@pytest.mark.parametrize("item_repr,ablate", [(r, "[]") for r in ITEM_REPRS] + [("irl", "[MF]"), ("irl+id", "[MF]")])
def test_beta_changes_exactly_the_item_models_that_methods_says_read_it(item_repr, ablate):
    """The reproduction's grid skips beta for the other item models (pipeline/grid.py): its premise.
    Untrained forward passes only: with T or I ablated the zeroed modality's adaptor still learns a
    constant whose product with the other term beta weighs, so those keep beta (not tested here)."""
    features, corpus = SimpleNamespace(text_dim=12, image_dim=10), SimpleNamespace(n_items=9)
    g = torch.Generator().manual_seed(3)
    price = torch.rand(9, generator=g)
    price[2] = float("nan")  # an unknown price
    bank = FeatureBank(torch.randn(9, 12, generator=g), torch.randn(9, 10, generator=g), price)
    index, mask = torch.randint(0, 9, (4, 6), generator=g), torch.ones(4, 6, dtype=torch.bool)
    mask[0, :3] = False
    outputs = []
    for beta in (0.1, 0.9):
        cfg = load_config(RelearnConfig, None, ["domain=T", "mode=scratch", f"item_repr={item_repr}", f"beta={beta}",
                                                f"ablate={ablate}", "hidden=16", "n_heads=2", "dropout=0",
                                                "irl_dropout=0"])
        torch.manual_seed(0)
        model = build_target_model(cfg, features, corpus).eval()
        with torch.no_grad():
            items = model.encode_items(torch.arange(9), bank)
            outputs.append((items.embedding, model.sequence_states(items, index, mask)))
    same = all(torch.equal(a, b) for a, b in zip(*outputs))
    reads_beta = item_repr in IRL_ITEM_REPRS and FUSION_ABLATION not in ablate and "beta" in IRL_ONLY_OPTIONS
    assert same != reads_beta, f"item_repr={item_repr} ablate={ablate}: beta {'changes' if not same else 'keeps'} " \
                               f"the item vectors and user states"


@pytest.mark.parametrize("args,expect", [
    (["domain=T"], "pretrained="),
    (["domain=T", "mode=scratch", "ablate=[X]"], "unknown switch"),
    (["domain=T", "mode=zeroshot", "item_repr=id", "pretrained=PRE"], "zeroshot needs item_repr=irl"),
    (["domain=T", "mode=finetune", "ablate=[MoE]", "pretrained=PRE"], "ablate=MoE"),
    (["mode=scratch"], "no target domain"),
    (["domain=T", "mode=sideways"], "mode must be"),
    (["domain=T", "mode=scratch", "select_metric=mrr"], "select_metric"),
    (["domain=T", "mode=scratch", "score=cosine"], "score must be"),
])
def test_bad_configurations_are_refused_before_training(tmp_path, capsys, args, expect):
    pre, _ = _pretrained_dir(tmp_path)
    args = [a.replace("PRE", str(pre)) for a in args]
    try:  # a value outside an option's choices stops in the config loader (SystemExit), the rest return
        code = relearn_main([*args, f"out={tmp_path / 'runs'}", "shards=/nonexistent", "tracker=none"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert expect in capsys.readouterr().err


# ---------------------------------------------------------------------------- selection, subsets


def _result(value, users=10):
    return {"D": {"users": users, "mean": {"recall@10": value}}}


def test_early_stopping_counts_patience_in_steps_and_respects_min_epochs():
    sel = Selection("recall@10", patience_steps=6, min_epochs=3)
    history = [(2, 1, 0.1), (4, 2, 0.3), (6, 3, 0.3), (8, 4, 0.2), (10, 5, 0.25)]
    stops = []
    for step, epoch, value in history:
        sel.update(step, epoch, _result(value))
        stops.append(sel.should_stop(step, epoch))
    assert (sel.best_step, sel.best_epoch, sel.best_value) == (4, 2, 0.3), "a tie keeps the earlier step"
    assert stops == [False, False, False, False, True], "stop once 6 steps passed without improvement"
    early = Selection("recall@10", patience_steps=1, min_epochs=3)
    early.update(1, 0, _result(0.5))
    early.update(2, 1, _result(0.1))
    assert not early.should_stop(2, 1), "never before min_epochs"
    pooled = Selection("recall@10")
    pooled.update(1, 0, {"A": {"users": 1, "mean": {"recall@10": 1.0}}, "B": {"users": 3, "mean": {"recall@10": 0.0}}})
    assert pooled.best_value == pytest.approx(0.25), "pooled over users, not averaged over domains"


def test_train_user_subsets_are_nested_and_seeded():
    lengths = np.full(200, 6)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dom = DomainSequences("D", 0, 10, offsets, np.zeros(offsets[-1], dtype=np.int64))
    subsets = {}
    for fraction in (0.1, 0.25, 1.0):
        c = Corpus([dom])
        c.subsample_train_users(fraction, seed=3)
        subsets[fraction] = set(c.train_users.tolist())
        assert len(c.train_users) == round(200 * fraction)
    assert subsets[0.1] <= subsets[0.25] <= subsets[1.0]
    other = Corpus([dom])
    other.subsample_train_users(0.25, seed=4)
    assert set(other.train_users.tolist()) != subsets[0.25]


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pretrained(world):
    run = world / "runs" / "rl-pre"
    if not (run / "model" / "model_config.json").is_file():
        res = _run([sys.executable, "-m", "ant_dist.pretrain", f"shards={world / 'shards'}",
                    f"features={world / 'features'}", "domains=[Food,Home]", f"out={world / 'runs'}",
                    "run_name=rl-pre", "hidden=32", "batch_size=64", "n_negatives=128", "eval_every=-1",
                    "max_steps=40", "progress=false", "tracker=none", "num_workers=0"])
        assert res.returncode == 0, res.stderr[-3000:]
    return run / "model"


def _relearn(world, pretrained, run, *extra, processes=1):
    args = ["-m", "ant_dist.relearn", f"shards={world / 'shards'}", f"features={world / 'features'}",
            "domain=Office", f"pretrained={pretrained}", f"out={world / 'runs'}", f"run_name={run}",
            "batch_size=32", "progress=false", "tracker=none", "resume=never", *extra]
    cmd = [sys.executable, *args]
    if processes > 1:  # _run's environment sets ACCELERATE_USE_CPU=1 where there is no GPU
        cmd = launch_command(args, processes, cpu=False)[0]
    res = _run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((world / "runs" / run / "metrics.json").read_text())


@torch.no_grad()
def _naive_test_metrics(model, world, split="test", k=10):
    """Independent evaluation: the full (users x items) cosine score matrix of the Office domain."""
    import pyarrow.parquet as pq

    from ant_dist.features.catalog import load_catalog_features

    n_items = pq.read_metadata(world / "shards" / "Office" / "catalog.parquet").num_rows
    feats = load_catalog_features(world / "features", world / "shards", ["Office"], [n_items], "device", 1.0,
                                  torch.device("cpu"))
    seqs = [np.asarray(s, dtype=np.int64) for s in
            pq.read_table(world / "shards" / "Office" / "interactions.parquet").column("items").to_pylist()]
    model.eval()
    table = model.encode_items(torch.arange(n_items), feats).embedding
    table = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cut = 1 if split == "test" else 2
    recall, ndcg = [], []
    for s in seqs:
        if len(s) < 3:
            continue
        hist, target = s[:-cut], int(s[-cut])
        x = torch.as_tensor(hist[-model.cfg.sasrec.max_len:])
        emb = model.encode_items(x, feats).embedding[None]
        h = model.user_states(emb, torch.ones(1, len(x), dtype=torch.bool))[0, -1]
        scores = table @ (h / h.norm())
        better = [j for j in range(n_items) if j != target and j not in set(hist.tolist()) and scores[j] >= scores[target]]
        r = len(better)
        recall.append(float(r < k))
        ndcg.append(1 / math.log2(r + 2) if r < k else 0.0)
    return np.array(recall), np.array(ndcg)


@pytest.mark.slow
def test_relearn_selects_the_best_epoch_and_tests_its_weights(world, pretrained):
    m = _relearn(world, pretrained, "rl-relearn", "patience_steps=10", "min_epochs=2", "max_epochs=40", "seed=1")
    values = [c["value"] for c in m["curve"]]
    best = int(np.argmax(values))  # the first maximum
    assert (m["best"]["step"], m["best"]["epoch"]) == (m["curve"][best]["step"], m["curve"][best]["epoch"])
    assert m["best"]["value"] == pytest.approx(values[best])
    assert m["steps"] - m["best"]["step"] >= 10 and m["epochs"] < 40, "stopped early, after the patience"
    assert m["method"] == "ReL" and m["pretrain_seed"] == 0
    assert m["trainable"] == {"irl": "trained", "position": "trained", "sasrec": "frozen", "id": "absent"}

    run = world / "runs" / "rl-relearn"
    exported = load_file(str(run / "model" / "model.safetensors"))
    pre = load_file(str(pretrained / "model.safetensors"))
    for name, t in exported.items():
        if name.startswith("sasrec.") and not name.startswith("sasrec.position."):
            assert torch.equal(t, pre[name]), f"{name}: the frozen user model must not move"
        else:
            assert not torch.equal(t, pre[name]), f"{name}: re-learned"
    best = load_file(str(run / "best" / "model.safetensors"))
    assert all(torch.equal(best[k], exported[k]) for k in best), "model/ holds the best validation weights"
    last = next((run / "checkpoints").iterdir())
    assert int(last.name.split("-")[1]) == m["steps"]
    final = load_file(str(last / "model.safetensors"))
    assert any(not torch.equal(final[k], exported[k]) for k in final), "the last step is not the best one"

    model, _ = load_model(run / "model")
    for split in ("test", "valid"):
        recall, ndcg = _naive_test_metrics(model, world, split)
        got = m[split]["Office"]
        assert got["users"] == len(recall)
        np.testing.assert_array_equal(np.array(got["per_user"]["recall@10"]), recall)
        np.testing.assert_allclose(np.array(got["per_user"]["ndcg@10"]), ndcg, rtol=1e-6)
        assert got["mean"]["recall@10"] == pytest.approx(recall.mean())


@pytest.mark.slow
def test_zero_shot_evaluates_the_pretrained_model_as_it_is(world, pretrained):
    m = _relearn(world, pretrained, "rl-zeroshot", "mode=zeroshot", processes=2)
    assert m["steps"] == 0 and m["method"] == "zero-shot"
    assert _records(world / "runs" / "rl-zeroshot", "start")[0]["world_size"] == 2
    model, _ = load_model(pretrained)
    recall, ndcg = _naive_test_metrics(model, world)
    np.testing.assert_array_equal(np.array(m["test"]["Office"]["per_user"]["recall@10"]), recall)
    np.testing.assert_allclose(np.array(m["test"]["Office"]["per_user"]["ndcg@10"]), ndcg, rtol=1e-6)


@pytest.mark.slow
def test_id_sasrec_trains_on_two_processes(world, pretrained):
    m = _relearn(world, pretrained, "rl-id2", "mode=scratch", "item_repr=id", "max_epochs=3", "patience_steps=0",
                 "train_users_fraction=0.5", processes=2)
    assert m["method"] == "ID-SASRec" and m["epochs"] == 3
    assert m["trainable"] == {"irl": "absent", "position": "trained", "sasrec": "trained", "id": "trained"}
    start = _records(world / "runs" / "rl-id2", "start")[0]
    assert start["world_size"] == 2
    import pyarrow.parquet as pq

    lengths = [len(s) for s in pq.read_table(world / "shards" / "Office" / "interactions.parquet")
               .column("items").to_pylist()]
    assert start["train_sequences"] == round(0.5 * sum(n >= 4 for n in lengths)), "half the trainable users"
    assert m["test"]["Office"]["users"] == m["valid"]["Office"]["users"] > 0, "every user is still evaluated"
