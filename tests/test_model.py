
import pytest
import torch

from ant_dist.model.ant import ANT, ANTConfig, FeatureBank
from ant_dist.model.irl import IRL, IRLConfig, MoEAdaptor, PriceEncoder, sinusoidal_price_encoding
from ant_dist.model.sasrec import SASRec, SASRecConfig


def small_cfg(**irl_kw) -> ANTConfig:
    return ANTConfig(irl=IRLConfig(text_dim=12, image_dim=10, hidden=16, price_dim=8, n_heads=3, **irl_kw),
                     sasrec=SASRecConfig(hidden=16, n_layers=2, n_heads=2, max_len=12))


def bank(n=20, seed=0) -> FeatureBank:
    g = torch.Generator().manual_seed(seed)
    price = torch.rand(n, generator=g) * 100
    price[::4] = float("nan")
    return FeatureBank(torch.randn(n, 12, generator=g).half(), torch.randn(n, 10, generator=g).half(), price)


def test_price_encoding_matches_formula():
    p = torch.tensor([0.0, 3.0, 99.5])
    enc = sinusoidal_price_encoding(p, dim=8, omega=50_000.0)
    for j in range(4):
        w = 50_000.0 ** (-2 * j / 8)
        assert torch.allclose(enc[:, 2 * j], torch.sin(p * w), atol=1e-6)
        assert torch.allclose(enc[:, 2 * j + 1], torch.cos(p * w), atol=1e-6)
    pe = PriceEncoder(dim=8)
    out = pe(torch.tensor([float("nan"), 3.0]))
    assert torch.equal(out[0], pe.unknown.detach()) and torch.allclose(out[1], enc[1])


def test_moe_matches_per_expert_loop():
    torch.manual_seed(0)
    moe = MoEAdaptor(6, 4, n_heads=3, kind="whitening", dropout=0.0)
    torch.nn.init.normal_(moe.bias)
    torch.nn.init.normal_(moe.w_gate)
    moe.eval()
    x = torch.randn(5, 6)
    gates = torch.softmax(x @ moe.w_gate, dim=-1)
    ref = sum(gates[:, k:k + 1] * ((x - moe.bias[k]) @ moe.weight[k]) for k in range(3))
    assert torch.allclose(moe(x), ref, atol=1e-5)
    lin = MoEAdaptor(6, 4, n_heads=3, kind="linear", dropout=0.0).eval()
    torch.nn.init.normal_(lin.bias)
    ref = sum((x @ lin.weight[k] + lin.bias[k]) / 3 for k in range(3))  # zero gates: equal weights
    assert torch.allclose(lin(x), ref, atol=1e-5)


def test_gate_noise_only_in_training():
    moe = MoEAdaptor(6, 4, n_heads=3)
    x = torch.randn(5, 6)
    moe.train()
    assert not torch.allclose(moe.gates(x), moe.gates(x))
    moe.eval()
    assert torch.allclose(moe.gates(x), torch.full((5, 3), 1 / 3))


def test_fusion_and_ablations():
    torch.manual_seed(0)
    irl = IRL(small_cfg().irl).eval()
    b = bank()
    t, m, p = b.gather(torch.arange(8))
    out = irl(t, m, p)
    assert out.embedding.shape == (8, 16)
    assert torch.allclose(out.embedding, out.z_text + out.z_image + out.z_price + 0.3 * out.z_text * out.z_image,
                          atol=1e-6)
    no_text = IRL(small_cfg(use_text=False).irl).eval()
    no_text.load_state_dict(irl.state_dict())
    a = no_text(t, m, p).embedding
    assert torch.allclose(a, no_text(torch.randn_like(t.float()), m, p).embedding)
    no_fusion = IRL(small_cfg(use_fusion=False).irl).eval()
    no_fusion.load_state_dict(irl.state_dict())
    assert torch.allclose(no_fusion(t, m, p).embedding, out.z_text + out.z_image + out.z_price, atol=1e-6)
    plain = IRL(small_cfg(use_moe=False).irl)
    assert not any(isinstance(mod, MoEAdaptor) for mod in plain.modules())


def test_padding_never_changes_outputs():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(hidden=16, n_heads=2, max_len=12)).eval()
    emb = torch.randn(3, 6, 16)
    lengths = torch.tensor([6, 3, 1])
    mask6 = torch.arange(6)[None, :] < lengths[:, None]
    out6 = model(emb, mask6)
    long_emb = torch.cat([emb, torch.randn(3, 5, 16)], dim=1)   # garbage in padding
    long_emb[~torch.cat([mask6, torch.zeros(3, 5, dtype=torch.bool)], 1)] = 123.0
    mask11 = torch.arange(11)[None, :] < lengths[:, None]
    out11 = model(long_emb, mask11)
    for i, n in enumerate(lengths.tolist()):
        assert torch.allclose(out6[i, :n], out11[i, :n], atol=1e-5)
    last = SASRec.last(out11, mask11)
    assert torch.allclose(last[1], out6[1, 2], atol=1e-5)
    # causal: the output at position 1 ignores items after it
    emb2 = emb.clone()
    emb2[0, 4] += 5
    assert torch.allclose(model(emb2, mask6)[0, :4], out6[0, :4], atol=1e-5)


@pytest.mark.parametrize("source", ["irl", "irl+id", "id"])
def test_every_parameter_in_exactly_one_group(source):
    cfg = small_cfg()
    cfg.item_source, cfg.n_items = source, 20
    model = ANT(cfg)
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert (len(groups["irl"]) > 0) == ("irl" in source)
    assert (len(groups["id"]) > 0) == ("id" in source)
    assert len(groups["position"]) == 1


def test_reinit_for_relearning():
    torch.manual_seed(0)
    model = ANT(small_cfg())
    for p in model.parameters():
        torch.nn.init.normal_(p)  # stand-in for pre-trained weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.reinit_for_relearning()
    groups = model.param_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    for p in groups["sasrec"]:
        assert not p.requires_grad and torch.equal(p, before[names[id(p)]])
    for p in groups["irl"] + groups["position"]:
        assert p.requires_grad and not torch.equal(p, before[names[id(p)]])
    # experts restart from nn.Linear's init, gates from zero
    assert torch.count_nonzero(model.irl.text.w_gate) == 0


def test_ant_e_adds_id_embedding_and_id_baseline():
    cfg = small_cfg()
    cfg.item_source, cfg.n_items = "irl+id", 20
    model = ANT(cfg).eval()
    rows = torch.tensor([0, 5, 7])
    out = model.encode_items(rows, bank())
    irl_only = model.irl(*bank().gather(rows)).embedding
    assert torch.allclose(out.embedding, irl_only + model.id_embedding(rows))
    cfg2 = small_cfg()
    cfg2.item_source, cfg2.n_items = "id", 20
    idm = ANT(cfg2)
    assert idm.irl is None
    assert torch.equal(idm.encode_items(rows, None).embedding, idm.id_embedding(rows))


@pytest.mark.parametrize("source", ["irl", "irl+id", "id"])
def test_relearning_after_finetuning_freeze_trains_every_reinitialised_parameter(source):
    # the FT freeze froze the position embeddings too; re-learning must make them trainable again
    torch.manual_seed(0)
    cfg = small_cfg()
    cfg.item_source, cfg.n_items = source, 20
    model = ANT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, mean=3.0)  # stand-in for pre-trained weights, far from any init
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.freeze_for_finetuning()
    model.reinit_for_relearning()
    # by name, independently of param_groups: Φ_IRL, the ID table and Θ_P are re-learnt
    relearnt = {n for n in before
                if n.startswith("irl.") or n.startswith("id_embedding.") or n == "sasrec.position.weight"}
    assert "sasrec.position.weight" in relearnt and ("id_embedding.weight" in relearnt) == ("id" in source)
    assert any(n.startswith("irl.") for n in relearnt) == ("irl" in source)
    for name, p in model.named_parameters():
        if name in relearnt:
            assert p.requires_grad, f"{name} was re-initialised but is frozen"
            assert not torch.equal(p, before[name]), f"{name} was not re-initialised"
        else:
            assert name.startswith("sasrec."), name
            assert not p.requires_grad, f"{name} (Θ_SASRec-P) trains"
            assert torch.equal(p, before[name]), f"{name} (Θ_SASRec-P) changed"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) > 0 and frozen.isdisjoint(relearnt)
