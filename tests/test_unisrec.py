"""UniSRec (model/unisrec.py, train/unisrec_objective.py): its defining equations against hand
computations, and pre-training plus every adaptation mode end to end on the tiny world."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ant_dist.features.shard_dataset import drop_words
from ant_dist.model.ant import ANT, ANTConfig, FeatureBank
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRecConfig
from ant_dist.model.unisrec import drop_items, in_batch_contrastive
from ant_dist.train.unisrec_objective import UniSRecObjective

IRL = IRLConfig(text_dim=3, image_dim=2, hidden=4, n_heads=2, dropout=0.0, gate_noise=False)


def _model(source="text", n_items=0) -> ANT:
    torch.manual_seed(0)
    return ANT(ANTConfig(item_source=source, n_items=n_items, irl=IRL,
                         sasrec=SASRecConfig(hidden=4, n_heads=1, n_layers=1, max_len=6, dropout=0.0))).eval()


def _bank(n=6) -> FeatureBank:
    g = torch.Generator().manual_seed(1)
    return FeatureBank(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g), torch.rand(n, generator=g))


def test_text_item_is_the_whitened_mixture_of_the_text_alone():
    model = _model()
    experts = model.side_items.text
    with torch.no_grad():
        experts.w_gate.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]]))
        experts.bias.copy_(torch.tensor([[0.1, 0.2, 0.3], [-0.3, 0.0, 0.5]]))
    bank = _bank()
    rows = torch.tensor([0, 3, 5])
    got = model.encode_items(rows, bank).embedding
    x = bank.text[rows].double().numpy()
    w, b, wg = (t.detach().double().numpy() for t in (experts.weight, experts.bias, experts.w_gate))
    want = []
    for xi in x:
        logits = xi @ wg
        g = np.exp(logits) / np.exp(logits).sum()
        want.append(sum(g[k] * (xi - b[k]) @ w[k] for k in range(2)))
    np.testing.assert_allclose(got.detach().numpy(), np.array(want), rtol=1e-5, atol=1e-6)
    # image and price play no part: other images and prices, the same vectors
    other = FeatureBank(bank.text, torch.zeros(6, 2), torch.full((6,), float("nan")))
    torch.testing.assert_close(model.encode_items(rows, other).embedding, got)
    # transductive (UniSRec_e): the same mixture plus the item's ID embedding
    trans = _model("text+id", n_items=6)
    trans.side_items.load_state_dict(model.side_items.state_dict())
    torch.testing.assert_close(trans.encode_items(rows, bank).embedding,
                               got + trans.id_embedding.weight[rows], rtol=1e-5, atol=1e-6)


def test_in_batch_contrastive_by_hand():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    q_ids = torch.tensor([7, 8, 7])
    k_ids = torch.tensor([7, 8, 7, 9, -1])  # column 4 is padding
    positive = torch.tensor([0, 1, 2])
    got = in_batch_contrastive(q, k, q_ids, k_ids, positive, tau=0.5)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    for j in range(3):
        # candidates: the positive, and every real column whose next item differs from the row's
        cols = [c for c in range(5) if c == positive[j] or (k_ids[c] >= 0 and k_ids[c] != q_ids[j])]
        s = {c: float(qn[j] @ kn[c]) / 0.5 for c in cols}
        want = -s[int(positive[j])] + math.log(sum(math.exp(v) for v in s.values()))
        assert abs(float(got[j]) - want) < 1e-5
    assert set(cols) == {2, 1, 3}  # row 2 (next item 7) neither sees column 0 (7 too) nor the padding


def test_drop_items_by_hand():
    index = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 4, 9]])
    u = torch.tensor([[0.0, 0.1, 0.9, 0.05, 0.0], [0.9, 0.9, 0.0, 0.9, 0.0]])
    got, length, last = drop_items(index, torch.tensor([4, 3]), 0.2, u)
    # row 0: the first item stays whatever its draw, 6 and 8 drop; row 1: 3 drops, 4 and 9 lie past the end
    assert got.tolist() == [[5, 7, 0, 0, 0], [1, 2, 0, 0, 0]] and length.tolist() == [2, 2]
    # the prefix ending at t keeps the view's items up to last[t]: row 0's prefix 5 6 7 -> 5 7
    assert last[0, :4].tolist() == [0, 0, 1, 1] and last[1, :3].tolist() == [0, 1, 1]
    same, n, last = drop_items(index, torch.tensor([5, 5]), 0.0, u)
    assert same.tolist() == index.tolist() and n.tolist() == [5, 5] and last[0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("source, name", [("text", "UniSRec"), ("text+id", "UniSRec_e"), ("fused", "SASRec++"),
                                          ("nova", "NOVA")])
def test_recommend_refuses_the_baselines_models(tmp_path, source, name):
    from ant_dist.model.io import export_model
    from ant_dist.serving.recommend import RecommendError, load_scorer

    model = ANT(ANTConfig(item_source=source, n_items=6, irl=IRL,
                          sasrec=SASRecConfig(hidden=4, n_heads=1, n_layers=1, max_len=6, nova=source == "nova")))
    export_model(model, tmp_path / "model", {"domains": ["Toy"], "items_per_domain": [6]})
    (tmp_path / "shards" / "Toy").mkdir(parents=True)
    with pytest.raises(RecommendError, match=re.escape(f"is a {name} baseline")):
        load_scorer(str(tmp_path / "model"), "Toy", shards=str(tmp_path / "shards"))


def test_word_drop_is_seeded_and_never_empty():
    text = "red wool winter hat with a pompom"
    a, b = drop_words(text, 0.5, (1, 2)), drop_words(text, 0.5, (1, 2))
    assert a == b and a != text and set(a.split()) <= set(text.split())
    assert drop_words(text, 0.999999, (3, 4)) == "red"
    assert drop_words(text, 0.0, (1, 2)) == text


def _prefix_state(model, bank, seq):
    """The last state of a sequence fed alone: the reference for the state at a cut."""
    rows = torch.tensor(seq)
    emb = model.encode_items(rows, bank).embedding.unsqueeze(0)
    return model.user_states(emb, torch.ones(1, len(seq), dtype=torch.bool))[0, -1]


class _WordDropTable:
    """A word-drop text table over the same 6 items (the CatalogFeatures interface the objective reads)."""

    def __init__(self, bank):
        g = torch.Generator().manual_seed(5)
        self.bank = FeatureBank(bank.text + 0.5 * torch.randn(6, 3, generator=g), bank.image, bank.price_norm)

    def gather_all(self, rows):
        return (*self.bank.gather(rows), torch.ones(len(rows), dtype=torch.bool))


@pytest.mark.parametrize("view", ["item drop", "word drop"])
def test_objective_is_the_two_tasks_over_every_prefix(view):
    """One process, no dropout: every prefix of every sequence is an instance, its state the state of
    the prefix fed alone, L_SI by hand over all instances' next items, and L_SS against the state of
    the prefix's view, also fed alone (the view built by hand from the draws: items dropped, or given
    their word-dropped text), with a row's own view never counted as a negative."""
    model, bank = _model(), _bank()
    word_table = _WordDropTable(bank)
    seqs = [[0, 1, 2, 3], [4, 3, 5], [1, 3, 0, 4, 2]]  # training parts: inputs seq[:-1], targets seq[1:]
    users = [7, 8, 9]
    rows = torch.arange(6)
    L = max(len(s) - 1 for s in seqs)
    inputs, targets = torch.zeros(3, L, dtype=torch.long), torch.full((3, L), -1)
    for i, s in enumerate(seqs):
        inputs[i, :len(s) - 1], targets[i, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
    mask = targets >= 0
    draws = torch.tensor([[0.9, 0.1, 0.9, 0.0], [0.0, 0.9, 0.0, 0.0], [0.9, 0.9, 0.05, 0.9]], dtype=torch.float64)
    feats = (bank.text, bank.image, bank.price_norm, torch.ones(6, dtype=torch.bool))
    batch = {"rows": rows, "feats": feats, "inputs": inputs, "targets": targets, "mask": mask, "draws": draws,
             "view_draw": 0.3 if view == "item drop" else 0.95, "users": torch.tensor(users),
             "n_global": int(mask.sum()), "step": 0}
    objective = UniSRecObjective(model, None, word_table, tau=0.1, seq_seq_weight=0.5, item_drop=0.2,
                                 item_drop_coefficient=0.9)
    out = objective(batch)

    def view_state(s, u, t):
        if view == "item drop":  # the dropped items leave the prefix (never the first)
            return _prefix_state(model, bank, [x for j, x in enumerate(s[:t + 1]) if j == 0 or u[j] >= 0.2])
        emb = torch.stack([(word_table.bank if j > 0 and u[j] < 0.2 else bank).text[x] for j, x in enumerate(s[:t + 1])])
        v = model.side_items(emb)  # the word-dropped text's vector at a drawn position
        return model.user_states(v.unsqueeze(0), torch.ones(1, t + 1, dtype=torch.bool))[0, -1]

    with torch.no_grad():  # the reference: each prefix and its view fed alone
        prefixes, aug, nxt, who = [], [], [], []
        for s, u, user in zip(seqs, draws.tolist(), users):
            for t in range(len(s) - 1):
                prefixes.append(s[:t + 1])
                aug.append(view_state(s, u, t))
                nxt.append(s[t + 1])
                who.append(user)
        states = torch.stack([_prefix_state(model, bank, p) for p in prefixes])
        aug = torch.stack(aug)
        v = model.encode_items(torch.tensor(nxt), bank).embedding
        sn, an, vn = (x / x.norm(dim=1, keepdim=True) for x in (states, aug, v))
        eye = torch.eye(len(nxt), dtype=torch.bool)
        # a column whose next item equals the row's (other than its own) is not a candidate; nor, in
        # L_SS, a column whose view is the row's own (the same user's prefixes with equal views)
        dup = (torch.tensor(nxt).unsqueeze(0) == torch.tensor(nxt).unsqueeze(1)) & ~eye
        twin = (torch.tensor(who).unsqueeze(0) == torch.tensor(who).unsqueeze(1)) & ~eye & \
            ((an @ an.T) > 1 - 1e-6)
        si = -torch.log_softmax((sn @ vn.T / 0.1).masked_fill(dup, float("-inf")), dim=1).diagonal().sum()
        ss = -torch.log_softmax((sn @ an.T / 0.1).masked_fill(dup | twin, float("-inf")), dim=1).diagonal().sum()
    n = len(nxt)
    assert n == 9 and dup.any()  # item 3 is the next item of two prefixes
    # item drop: user 7's prefixes [0] and [0 1] share the view [0] (item 1 dropped), user 9's [1 3] and
    # [1 3 0] the view [1 3]; word drop: views never coincide (the prefixes differ in length)
    assert twin.any() == (view == "item drop")
    assert abs(float(out["rec_sum"]) - float(si)) < 1e-4
    assert abs(float(out["align"]) - float(ss) / n) < 1e-4
    assert abs(float(out["loss"].detach()) - (float(si) + 0.5 * float(ss)) / n) < 1e-4


# ----------------------------------------------------------------------------- end to end
def _pretrain(world, run, *extra):
    args = [sys.executable, "-m", "ant_dist.pretrain", f"shards={world / 'shards'}", f"features={world / 'features'}",
            "domains=[Food,Home]", f"out={world / 'runs'}", f"run_name={run}", "model=unisrec", "hidden=16",
            "n_experts=2", "batch_size=64", "eval_users=50", "progress=false", "tracker=none", "num_workers=0", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def _relearn(world, tmp_path, run, *extra):
    args = [sys.executable, "-m", "ant_dist.relearn", f"shards={world / 'shards'}", f"features={world / 'features'}",
            "domain=Office", f"out={tmp_path}", f"run_name={run}", "batch_size=32", "max_epochs=2", "min_epochs=1",
            "progress=false", "tracker=none", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def _embed_word_drop(world, out):
    args = [sys.executable, "-m", "ant_dist.embed", f"shards={world / 'shards'}", f"out={out}", "domains=[Food,Home]",
            f"text_encoder={world / 'bert'}", f"image_encoder={world / 'swin'}", "text_word_drop=0.3",
            "batch_size=64", "num_workers=0", "progress=false"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pretrain_then_every_unisrec_method(world, tmp_path):
    wd = tmp_path / "features_worddrop"
    res = _embed_word_drop(world, wd)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((wd / "Food" / "manifest.json").read_text())
    assert manifest["text"]["word_drop"] == 0.3
    plain, dropped = (np.load(root / "Food" / "text.npy").astype(np.float32) for root in (world / "features", wd))
    changed = np.abs(plain - dropped).max(axis=1) > 1e-3
    assert changed.mean() > 0.5  # (almost) every synthetic text has words enough to lose one

    # a features root without word drop is refused before training
    res = _pretrain(world, "unisrec-bad", f"word_drop_features={world / 'features'}")
    assert res.returncode == 2 and "no word-drop text table" in res.stderr
    res = _pretrain(world, "unisrec", "max_epochs=4", f"word_drop_features={wd}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = world / "runs" / "unisrec"
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["event"] == "train"]
    assert train[0]["loss_path"] == "unisrec-in-batch"
    losses = [r["train/rec_loss"] for r in train]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.2, losses  # the sequence-item task learns
    config = json.loads((run / "model" / "model_config.json").read_text())
    assert config["ant"]["item_source"] == "text"

    model = f"pretrained={run / 'model'}"
    for label, options in (("UniSRec-GB", ["mode=scratch", "item_repr=text", "hidden=16", "n_experts=2"]),
                           ("UniSRec", ["mode=finetune", "item_repr=text", model]),
                           ("UniSRec-ReL", ["mode=relearn", "item_repr=text", model]),
                           ("UniSRec_e", ["mode=finetune", "item_repr=text+id", model])):
        res = _relearn(world, tmp_path, label, *options)
        assert res.returncode == 0, (label, res.stderr[-3000:])
        m = json.loads((tmp_path / label / "metrics.json").read_text())
        assert m["method"] == label and m["config"]["item_repr"] == options[1].split("=")[1]
        assert 0 <= m["test"]["Office"]["mean"]["recall@10"] <= 1
    # a pre-trained start of the other family is refused, naming the pre-training to use
    res = _relearn(world, tmp_path, "bad", "mode=finetune", "item_repr=irl", model)
    assert res.returncode == 2 and "model=ant" in res.stderr
    res = _relearn(world, tmp_path, "bad2", "mode=finetune", "item_repr=text", "model=unisrec", model)
    assert res.returncode == 2 and "pre-training option" in res.stderr


@pytest.mark.slow
def test_unisrec_pretraining_resumes_exactly(world):
    """2 steps, then a rerun of the same command to 4, ends on the weights of 4 steps straight: the views'
    draws and the dropout are functions of (seed, step), restored by nothing but the step."""
    from safetensors.torch import load_file

    steady = ["schedule=constant", "warmup_steps=0", "checkpoint_every=1", "eval_every=-1", "align_weight=0.5"]
    assert _pretrain(world, "uni-straight", "max_steps=4", *steady).returncode == 0
    first = _pretrain(world, "uni-resumed", "max_steps=2", *steady)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _pretrain(world, "uni-resumed", "max_steps=4", *steady)
    assert again.returncode == 0, again.stderr[-3000:]
    starts = [json.loads(x) for x in (world / "runs" / "uni-resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in starts if r["event"] == "start"] == [0, 2]
    a, b = (load_file(str(world / "runs" / r / "model" / "model.safetensors")) for r in ("uni-straight", "uni-resumed"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
