"""SASRec++ and NOVA (model/side_info.py, model/sasrec.py `nova`) against hand computations of
their defining equations, their non-invasiveness, and both through `ant_dist.relearn`."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ant_dist.model.ant import ANT, ANTConfig, FeatureBank
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import Block, SASRecConfig

IRL = IRLConfig(text_dim=3, image_dim=2, hidden=4, price_dim=2, price_omega=10.0)


def _model(source: str) -> ANT:
    torch.manual_seed(0)
    return ANT(ANTConfig(item_source=source, n_items=5, score="dot", irl=IRL,
                         sasrec=SASRecConfig(hidden=4, n_layers=1, n_heads=1, max_len=6, dropout=0.0,
                                             nova=source == "nova"))).eval()


def _bank() -> FeatureBank:
    text = torch.arange(15, dtype=torch.float32).reshape(5, 3) / 10
    image = -torch.arange(10, dtype=torch.float32).reshape(5, 2) / 10
    return FeatureBank(text, image, torch.tensor([0.0, 50.0, float("nan"), 100.0, 3.0]))


def _price_by_hand(p: float, unknown: np.ndarray) -> np.ndarray:
    if math.isnan(p):
        return unknown
    return np.array([math.sin(p), math.cos(p)])  # dim 2: one frequency, omega^0 = 1


def test_sasrec_pp_item_is_a_linear_map_of_id_and_features():
    m, bank = _model("fused"), _bank()
    rows = torch.tensor([0, 2, 3])
    got = m.encode_items(rows, bank).embedding.detach().numpy()
    W, b = m.side_items.proj.weight.detach().numpy(), m.side_items.proj.bias.detach().numpy()
    ids = m.id_embedding.weight.detach().numpy()
    unknown = m.side_items.features.price.unknown.detach().numpy()
    for i, r in enumerate(rows.tolist()):
        x = np.concatenate([ids[r], bank.text[r].numpy(), bank.image[r].numpy(),
                            _price_by_hand(float(bank.price_norm[r]), unknown)])
        np.testing.assert_allclose(got[i], W @ x + b, rtol=1e-5, atol=1e-6)


def _layer_norm(x):
    return (x - x.mean()) / np.sqrt(x.var() + 1e-12)


def _gelu(x):
    return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])


def test_nova_block_by_hand():
    """One NOVA layer, one head, two positions, numpy: queries and keys from the gated fusion of
    (x, side, position), values from x alone; then RecBole's add & norm and feed-forward."""
    torch.manual_seed(1)
    block = Block(SASRecConfig(hidden=4, n_layers=1, n_heads=1, max_len=6, dropout=0.0, nova=True)).eval()
    with torch.no_grad():
        block.gate.copy_(torch.tensor([0.5, -1.0, 0.3, 2.0]))
        for ln in (block.norm1, block.norm2):  # identity affine: the reference's plain layer norm
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    x = torch.randn(1, 2, 4)
    side = torch.randn(1, 2, 2, 4)  # (B, L, [item side, position], d)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool).tril()
    got = block(x, mask, side)[0].detach().numpy()

    P = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    W, bias = P["qkv.weight"], P["qkv.bias"]
    xs, ss = x[0].numpy(), side[0].numpy()
    fused, values = [], []
    for t in range(2):
        f = np.stack([xs[t], ss[t, 0], ss[t, 1]])
        alpha = np.exp(f @ P["gate"]) / np.exp(f @ P["gate"]).sum()
        fused.append(alpha @ f)
        values.append(W[8:] @ xs[t] + bias[8:])
    q = [W[:4] @ f + bias[:4] for f in fused]
    k = [W[4:8] @ f + bias[4:8] for f in fused]
    want = []
    for t in range(2):
        logits = np.array([q[t] @ k[j] / 2.0 for j in range(t + 1)])  # sqrt(head dim 4) = 2
        a = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        att = sum(a[j] * values[j] for j in range(t + 1))
        h = _layer_norm(xs[t] + P["out.weight"] @ att + P["out.bias"])
        ffn = P["ffn.2.weight"] @ _gelu(P["ffn.0.weight"] @ h + P["ffn.0.bias"]) + P["ffn.2.bias"]
        want.append(_layer_norm(h + ffn))
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)


def test_nova_is_non_invasive_sasrec_pp_is_not():
    """With one position the attention weight is 1 whatever the queries and keys: NOVA's output
    cannot depend on the side information (it never enters the values); SASRec++'s does."""
    nova, bank = _model("nova"), _bank()
    with torch.no_grad():  # queries and keys large enough for the attention to tell positions apart
        nova.sasrec.blocks[0].qkv.weight.normal_(0, 1.0)
    other = FeatureBank(bank.text * -3 + 1, bank.image * 5, torch.tensor([7.0, 1.0, 2.0, 3.0, 4.0]))
    mask = torch.ones(1, 1, dtype=torch.bool)
    rows = torch.tensor([1])
    with torch.no_grad():
        a = nova.sequence_states(nova.encode_items(rows, bank), torch.tensor([[0]]), mask)
        b = nova.sequence_states(nova.encode_items(rows, other), torch.tensor([[0]]), mask)
        torch.testing.assert_close(a, b)
        # with two positions the side information does move the attention, so the states
        two = torch.tensor([1, 3])
        m2 = torch.ones(1, 2, dtype=torch.bool)
        a2 = nova.sequence_states(nova.encode_items(two, bank), torch.tensor([[0, 1]]), m2)
        b2 = nova.sequence_states(nova.encode_items(two, other), torch.tensor([[0, 1]]), m2)
        assert not torch.allclose(a2[0, 1], b2[0, 1])
        # the item side of NOVA's score is the ID embedding alone
        torch.testing.assert_close(nova.encode_items(two, bank).embedding, nova.id_embedding(two))
        pp = _model("fused")
        a = pp.sequence_states(pp.encode_items(rows, bank), torch.tensor([[0]]), mask)
        b = pp.sequence_states(pp.encode_items(rows, other), torch.tensor([[0]]), mask)
        assert not torch.allclose(a, b)


def test_side_information_only_with_nova():
    with pytest.raises(ValueError, match="NOVA"):
        ANT(ANTConfig(item_source="nova", n_items=5, irl=IRL, sasrec=SASRecConfig(hidden=4, n_heads=1)))
    plain = _model("fused")
    with pytest.raises(ValueError, match="NOVA"):
        plain.user_states(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), side=torch.zeros(1, 2, 4))


@pytest.mark.slow
@pytest.mark.parametrize("label, repr_", [("SASRec++", "fused"), ("NOVA", "nova")])
def test_relearn_trains_the_baseline_from_scratch(world, tmp_path, label, repr_):
    args = [sys.executable, "-m", "ant_dist.relearn", f"shards={world / 'shards'}", f"features={world / 'features'}",
            "domain=Office", f"out={tmp_path}", "run_name=r", "mode=scratch", f"item_repr={repr_}", "hidden=16",
            "n_heads=2", "n_experts=2", "batch_size=32", "max_epochs=2", "min_epochs=1", "progress=false",
            "tracker=none"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["method"] == label and m["item_repr"] == repr_ and m["config"]["score"] in ("", "dot")
    assert 0 <= m["test"]["Office"]["mean"]["recall@50"] <= 1
    bad = subprocess.run(args[:-1] + ["mode=relearn", "pretrained=" + str(tmp_path / "r" / "model")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "mode=scratch" in bad.stderr
