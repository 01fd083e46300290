import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ant_dist.train.losses import (NegativeSampler, alignment_loss, full_softmax, naive_full_softmax,
                             sampled_softmax)
from ant_dist.model.ant import FeatureBank
from ant_dist.model.irl import IRL, IRLConfig


def _irl_setup(n_items=103, n_queries=17, seed=0, train=False):
    torch.manual_seed(seed)
    irl = IRL(IRLConfig(text_dim=12, image_dim=10, hidden=16, price_dim=8, n_heads=3))
    for m in (irl.text, irl.image, irl.price):  # non-trivial gates
        torch.nn.init.normal_(m.w_gate, std=0.3)
        torch.nn.init.normal_(m.w_noise, std=0.3)
        torch.nn.init.normal_(m.bias, std=0.3)
    irl.train(train)
    price = torch.rand(n_items) * 100
    price[::5] = float("nan")
    bank = FeatureBank(torch.randn(n_items, 12), torch.randn(n_items, 10), price)
    h = torch.randn(n_queries, 16, requires_grad=True)
    targets = torch.randint(0, n_items, (n_queries,))
    item_fn = lambda rows: irl(*bank.gather(rows)).embedding  # noqa: E731
    return irl, item_fn, h, targets


def _grads(loss, h, params):
    """Gradients w.r.t. h and params; an unused parameter (gate noise in eval) gets zeros."""
    gs = torch.autograd.grad(loss, [h] + list(params), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, [h] + list(params))]


@pytest.mark.parametrize("chunk", [7, 32, 100, 103, 500])
def test_full_softmax_equals_naive_loss_and_gradients(chunk):
    irl, item_fn, h, targets = _irl_setup()
    params = list(irl.parameters())
    ref = naive_full_softmax(h, targets, item_fn(torch.arange(103)))
    got = full_softmax(h, targets, item_fn, 103, params, chunk=chunk)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    for g_ref, g_got in zip(_grads(ref, h, params), _grads(full_softmax(h, targets, item_fn, 103, params, chunk=chunk),
                                                           h, params)):
        assert torch.allclose(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_full_softmax_replays_dropout_and_gate_noise_in_backward():
    # One chunk covering the catalog draws the same random numbers as the naive pass from
    # the same seed; the backward must recompute with exactly those draws.
    irl, item_fn, h, targets = _irl_setup(train=True)
    params = list(irl.parameters())
    torch.manual_seed(123)
    ref = naive_full_softmax(h, targets, item_fn(torch.arange(103)))
    g_ref = _grads(ref, h, params)
    torch.manual_seed(123)
    got = full_softmax(h, targets, item_fn, 103, params, chunk=103)
    g_got = _grads(got, h, params)
    assert torch.allclose(got, ref, rtol=1e-5)
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_full_softmax_rejects_bad_targets():
    irl, item_fn, h, _ = _irl_setup()
    with pytest.raises(ValueError):
        full_softmax(h, torch.tensor([0, 103]), item_fn, 103, list(irl.parameters()))


_MEM_SCRIPT = textwrap.dedent("""
    import sys, torch
    from ant_dist.train.losses import full_softmax

    def hwm_mib():  # this process's peak RSS (VmHWM), in MiB
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    n_items, chunk = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    feats = torch.randn(n_items, 16)
    w = torch.randn(16, 32, requires_grad=True)
    h = torch.randn(2048, 32, requires_grad=True)
    t = torch.randint(0, n_items, (2048,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS: measure only the loss from here
    before = hwm_mib()
    loss = full_softmax(h, t, lambda r: feats[r] @ w, n_items, [w], chunk=chunk)
    loss.backward()
    print(hwm_mib() - before)
""")


def _peak_mib(n_items, chunk):
    # A fixed mmap threshold makes glibc return every large buffer to the OS when freed, so
    # the peak RSS measures what the loss allocates; with glibc's default (a threshold that
    # grows after the first large free) freed chunks pile up in the heap and RSS drifts by
    # hundreds of MiB from run to run, whatever the algorithm.
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(n_items), str(chunk)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"})
    return float(out.stdout.strip().splitlines()[-1])


def test_full_softmax_peak_memory_grows_with_chunk_not_catalog():
    small_cat, big_cat = _peak_mib(20_000, 1024), _peak_mib(160_000, 1024)
    big_chunk = _peak_mib(20_000, 16_384)
    # dense logits for 160k items would be 2048 x 160k x 4 B = 1.25 GiB (several copies in backward)
    assert big_cat - small_cat < 60, (small_cat, big_cat)
    # one 2048 x 16k chunk of logits is 128 MiB: a larger chunk must cost visibly more
    assert big_chunk - small_cat > 100, (small_cat, big_chunk)


def _random_catalog(n_items=2000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_items, d, generator=g)
    h = torch.randn(64, d, generator=g, requires_grad=True)
    targets = torch.randint(0, n_items, (64,), generator=g)
    return emb, h, targets


def test_sampled_softmax_approaches_exact_loss_and_gradient():
    emb, h, targets = _random_catalog()
    exact = naive_full_softmax(h, targets, emb, tau=0.2)
    g_exact = torch.autograd.grad(exact, h)[0]
    sampler = NegativeSampler(2000)
    errors, cosines = [], []
    for k in (50, 500, 20_000):
        gen = torch.Generator().manual_seed(1)
        loss = sampled_softmax(h, targets, lambda r: emb[r], sampler, k, tau=0.2, generator=gen)
        g = torch.autograd.grad(loss, h)[0]
        errors.append(abs(loss.item() - exact.item()))
        cosines.append(F.cosine_similarity(g.flatten(), g_exact.flatten(), dim=0).item())
    assert errors[2] < errors[0] and errors[2] < 0.02 * exact.item()
    assert cosines[0] < cosines[2] and cosines[2] > 0.99


@pytest.mark.parametrize("chunk", [7, 500], ids=["chunked", "dense"])
def test_dot_score_is_cross_entropy_of_plain_dot_products_without_tau(chunk):
    """score=dot (SASRec's): logits h . v, tau unused, on the exact (dense and chunked) and sampled paths."""
    irl, item_fn, h, targets = _irl_setup()
    params = list(irl.parameters())
    emb = item_fn(torch.arange(103))
    reference = F.cross_entropy(h @ emb.T, targets)
    ref_grads = _grads(reference, h, params)
    loss = full_softmax(h, targets, item_fn, 103, params, tau=0.07, chunk=chunk, score="dot")
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(_grads(loss, h, params), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert abs(naive_full_softmax(h, targets, emb, tau=0.07).item() - reference.item()) > 0.1, "cos differs"
    # sampled: every item as a negative, no correction -> the same exact loss (a row's target is masked)
    sampled = sampled_softmax(h, targets, item_fn, NegativeSampler(103), 0, tau=0.07, logq=False,
                              negatives=torch.arange(103), score="dot")
    assert sampled.item() == pytest.approx(reference.item(), rel=1e-5)


def test_in_batch_negatives_with_mixture_correction_also_converge():
    emb, h, targets = _random_catalog()
    exact = naive_full_softmax(h, targets, emb, tau=0.2)
    pop = torch.bincount(targets, minlength=2000).float() + 1.0
    gen = torch.Generator().manual_seed(1)
    loss = sampled_softmax(h, targets, lambda r: emb[r], NegativeSampler(2000), 20_000, tau=0.2,
                           in_batch_negatives=True, popularity=pop, generator=gen)
    assert abs(loss.item() - exact.item()) < 0.02 * exact.item()


@pytest.mark.parametrize("logq", [True, False])
def test_logq_correction_removes_popularity_bias(logq):
    # Free item scores learned from targets ~ p_true with negatives ~ q (popularity). The
    # sampled-softmax optimum is softmax(s) = p_true with logQ correction, and p_true / q
    # (renormalised) without it: a known answer either way.
    torch.manual_seed(0)
    n, steps = 40, 1000
    p_true = torch.softmax(torch.randn(n), 0)
    sampler = NegativeSampler(n, torch.arange(1, n + 1, dtype=torch.float32), alpha=1.0)
    tilted = p_true / sampler.probs
    tilted = tilted / tilted.sum()
    item = torch.nn.Parameter(torch.randn(n, n) * 0.01)
    h = torch.ones(1, n)
    opt = torch.optim.Adam([item], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = torch.multinomial(p_true, 256, replacement=True, generator=gen)
        loss = sampled_softmax(h.expand(256, -1), t, lambda r: item[r], sampler, 64, tau=0.05, logq=logq,
                               generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        learned = torch.softmax(F.normalize(h, dim=-1) @ F.normalize(item, dim=-1).T / 0.05, dim=-1)[0]
    tv_true = 0.5 * (learned - p_true).abs().sum().item()
    tv_tilted = 0.5 * (learned - tilted).abs().sum().item()
    if logq:
        assert tv_true < 0.1 and tv_tilted > 0.25, (tv_true, tv_tilted)
    else:
        assert tv_tilted < 0.1 and tv_true > 0.25, (tv_true, tv_tilted)


def test_accidental_hits_are_masked():
    emb = torch.eye(4)
    h = torch.tensor([[1.0, 0, 0, 0]])
    sampler = NegativeSampler(4)
    sampler.probs = torch.tensor([1.0, 0, 0, 0])  # always samples item 0 = the target
    loss = sampled_softmax(h, torch.tensor([0]), lambda r: emb[r], sampler, 5, logq=False)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # only the positive is left


def test_alignment_loss_hand_computed():
    zt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    zm = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    has = torch.tensor([True, True, False])
    # item 2 has no image and drops out. Image 0 vs texts (0, 1): cos = 1, 0; image 1 vs
    # texts (0, 1): cos = 1/sqrt(2) both, so its softmax is (1/2, 1/2) whatever tau is.
    l0 = -math.log(math.exp(1 / 0.1) / (math.exp(1 / 0.1) + math.exp(0)))
    l1 = -math.log(0.5)
    assert alignment_loss(zm, zt, has, tau=0.1).item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert alignment_loss(zm, zt, torch.tensor([True, False, False])).item() == 0.0


_DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from ant_dist.train.losses import NegativeSampler, sampled_softmax
    rank = int(sys.argv[1]); out = sys.argv[2]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=2)
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(50, 8))
    h = torch.randn(6, 8)
    t = torch.arange(6) + 6 * rank
    gen = torch.Generator().manual_seed(100 + rank)
    loss = sampled_softmax(h, t, lambda r: emb[r], NegativeSampler(50), 7, tau=0.5, generator=gen,
                           gather_across_ranks=True)
    loss.backward()
    json.dump({"loss": loss.item(), "grad": emb.grad.tolist()}, open(out + str(rank), "w"))
    dist.destroy_process_group()
""")


def _run_two_gloo_ranks(script: str, tmp_path) -> None:
    """Runs `script` as ranks 0 and 1 of a gloo group (argv: rank, output prefix tmp_path/r, port);
    each rank writes tmp_path/r<rank>. Both must exit 0; neither outlives the test."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path / "r"), port]) for r in range(2)]
    try:
        assert all(p.wait(timeout=120) == 0 for p in procs)
    finally:
        for p in procs:
            p.kill()


def test_cross_rank_negatives_gathered_with_local_gradient(tmp_path):
    _run_two_gloo_ranks(_DIST_SCRIPT, tmp_path)
    # reference in one process: both ranks' negatives, the other rank's detached
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(50, 8))
    h = torch.randn(6, 8)
    negs = [NegativeSampler(50).sample(7, torch.Generator().manual_seed(100 + r)) for r in range(2)]
    for rank in range(2):
        t = torch.arange(6) + 6 * rank
        e = F.normalize(emb, dim=-1)
        neg_emb = torch.cat([e[negs[r]] if r == rank else e[negs[r]].detach() for r in range(2)])
        rows = torch.cat(negs)
        hn = F.normalize(h, dim=-1)
        pos = (hn * e[t]).sum(-1, keepdim=True) / 0.5
        neg = hn @ neg_emb.T / 0.5 - math.log(14 / 50)
        neg = neg.masked_fill(rows[None] == t[:, None], -math.inf)
        ref = (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]).mean()
        grad = torch.autograd.grad(ref, emb)[0]
        got = json.load(open(tmp_path / f"r{rank}"))
        assert got["loss"] == pytest.approx(ref.item(), rel=1e-5)
        assert np.allclose(got["grad"], grad.numpy(), atol=1e-6)


def test_popularity_sampler_keeps_items_without_interactions_drawable():
    # 10 % of the catalog has no training interactions: with counts + 1 they stay drawable,
    # so a large K brings the sampled loss to the exact one (without smoothing it cannot)
    emb, h, targets = _random_catalog()
    pop = torch.bincount(targets, minlength=2000).float() * 5 + torch.arange(2000) % 7
    pop[:200] = 0
    sampler = NegativeSampler(2000, pop, alpha=1.0)
    assert (sampler.probs > 0).all()
    assert sampler.probs[0].item() == pytest.approx(1.0 / float((pop + 1).sum()), rel=1e-5)
    exact = naive_full_softmax(h, targets, emb, tau=0.2).item()
    gen = torch.Generator().manual_seed(3)
    loss = sampled_softmax(h, targets, lambda r: emb[r], sampler, 100_000, tau=0.2, generator=gen).item()
    assert abs(loss - exact) < 0.02 * exact, (loss, exact)
    unsmoothed = NegativeSampler(2000, pop, alpha=1.0, smoothing=0.0)
    assert (unsmoothed.probs[:200] == 0).all()


def test_in_batch_mixture_correction_counts_b_minus_one_draws():
    # hand-computed: 2 items, batch of 2 with targets (0, 1), one sampled negative (item 0),
    # uniform q = 1/2 and data distribution p = 1/2. For row 0 the sampled negative and its own
    # in-batch target are accidental hits; only row 1's target (item 1) is a negative, with
    # expected count K q + (B - 1) p = 1/2 + 1/2 = 1, so its logit is uncorrected.
    emb = torch.eye(2)
    h = torch.eye(2)
    loss = sampled_softmax(h, torch.tensor([0, 1]), lambda r: emb[r], NegativeSampler(2), 0, tau=0.5, logq=True,
                           in_batch_negatives=True, popularity=torch.tensor([1.0, 1.0]), reduction="none",
                           negatives=torch.tensor([0]))
    s_pos, s_neg = 1 / 0.5, 0.0
    row0 = math.log(math.exp(s_pos) + math.exp(s_neg)) - s_pos
    assert loss[0].item() == pytest.approx(row0, rel=1e-5)


_FULL_GRAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from ant_dist.train.losses import NegativeSampler, sampled_softmax
    rank = int(sys.argv[1]); out = sys.argv[2]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=2)
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(50, 8))
    h = torch.randn(12, 8)[6 * rank:6 * rank + 6]
    t = torch.arange(6) + 6 * rank
    negs = torch.tensor([[3, 17, 29, 41, 8, 22, 45], [11, 2, 38, 19, 30, 47, 5]])[rank]
    loss = sampled_softmax(h, t, lambda r: emb[r], NegativeSampler(50), 0, tau=0.5, negatives=negs,
                           gather_across_ranks=True, gather_full_gradient=True, reduction="sum")
    loss.backward()
    json.dump({"grad": emb.grad.tolist()}, open(out + str(rank), "w"))
    dist.destroy_process_group()
""")


def test_cross_rank_negatives_with_full_gradient_sum_to_the_joint_gradient(tmp_path):
    # data parallelism sums (averages) the ranks' gradients: with the full-gradient gather that
    # sum must be the gradient of both ranks' losses computed in one process with every negative live
    _run_two_gloo_ranks(_FULL_GRAD_SCRIPT, tmp_path)
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(50, 8))
    h_all = torch.randn(12, 8)
    negs = torch.tensor([3, 17, 29, 41, 8, 22, 45, 11, 2, 38, 19, 30, 47, 5])
    e = F.normalize(emb, dim=-1)
    total = 0.0
    for rank in range(2):
        h, t = F.normalize(h_all[6 * rank:6 * rank + 6], dim=-1), torch.arange(6) + 6 * rank
        pos = (h * e[t]).sum(-1, keepdim=True) / 0.5
        neg = (h @ e[negs].T / 0.5 - math.log(14 / 50)).masked_fill(negs[None] == t[:, None], -math.inf)
        total = total + (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]).sum()
    ref = torch.autograd.grad(total, emb)[0]
    got = sum(np.array(json.load(open(tmp_path / f"r{r}"))["grad"]) for r in range(2))
    assert np.allclose(got, ref.numpy(), atol=1e-5)


_SHARDED_EXACT_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from ant_dist.train.losses import full_softmax
    rank = int(sys.argv[1]); out = sys.argv[2]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=2)
    torch.manual_seed(0)
    emb, w = torch.nn.Parameter(torch.randn(37, 8)), torch.nn.Parameter(torch.randn(8, 8))
    h_all, t_all = torch.randn(13, 8), torch.randint(0, 37, (13,))
    mine = slice(0, 5) if rank == 0 else slice(5, 13)  # the ranks hold different numbers of positions
    h = h_all[mine].clone().requires_grad_()
    loss = full_softmax(h, t_all[mine], lambda r: emb[r] @ w, 37, [emb, w], tau=0.5, chunk=4,
                        reduction="none", shard_across_ranks=True)
    loss.sum().backward()
    json.dump({"loss": loss.tolist(), "h": h.grad.tolist(), "emb": emb.grad.tolist(), "w": w.grad.tolist()},
              open(out + str(rank), "w"))
    dist.destroy_process_group()
""")


def test_exact_loss_sharded_over_ranks_equals_the_dense_loss_of_every_position(tmp_path):
    # each rank runs the item model over half of the catalog only; the losses of its positions,
    # their gradients, and the sum of the ranks' parameter gradients (what data parallelism
    # applies, up to its 1/world) must equal dense cross entropy over the whole catalog
    _run_two_gloo_ranks(_SHARDED_EXACT_SCRIPT, tmp_path)
    got = [json.load(open(tmp_path / f"r{r}")) for r in range(2)]
    torch.manual_seed(0)
    emb, w = torch.nn.Parameter(torch.randn(37, 8)), torch.nn.Parameter(torch.randn(8, 8))
    h_all, t_all = torch.randn(13, 8), torch.randint(0, 37, (13,))
    h_all.requires_grad_()
    logits = F.normalize(h_all, dim=-1) @ F.normalize(emb @ w, dim=-1).T / 0.5
    loss = F.cross_entropy(logits, t_all, reduction="none")
    loss.sum().backward()
    assert np.allclose(got[0]["loss"] + got[1]["loss"], loss.detach().numpy(), atol=1e-5)
    assert np.allclose(got[0]["h"] + got[1]["h"], h_all.grad.numpy(), atol=1e-5)
    for name, param in (("emb", emb), ("w", w)):
        assert np.allclose(np.array(got[0][name]) + np.array(got[1][name]), param.grad.numpy(), atol=1e-5)
    # and the work really was split: a rank's item gradient lives on its half of the catalog only
    # (rows 0-18 on rank 0, 19-36 on rank 1: the item model never ran on the others there)
    assert not np.any(np.array(got[0]["emb"])[19:]) and np.any(np.array(got[0]["emb"])[:19])
    assert not np.any(np.array(got[1]["emb"])[:19]) and np.any(np.array(got[1]["emb"])[19:])



_IN_BATCH_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from ant_dist.train.losses import NegativeSampler, sampled_softmax
    rank = int(sys.argv[1]); out = sys.argv[2]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=2)
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(50, 8))
    h_all, t_all = torch.randn(11, 8), torch.tensor([4, 9, 4, 30, 12, 7, 9, 41, 3, 30, 18])
    pop = torch.arange(50).float() % 5 + 1
    mine = slice(0, 4) if rank == 0 else slice(4, 11)  # the ranks hold different numbers of positions
    negs = torch.tensor([3, 17, 29, 41, 8, 22, 45])  # one shared negative set: no negative gather
    loss = sampled_softmax(h_all[mine], t_all[mine], lambda r: emb[r], NegativeSampler(50), 0, tau=0.5,
                           negatives=negs, in_batch_negatives=True, popularity=pop, gather_in_batch=True,
                           gather_full_gradient=True, reduction="sum")
    loss.backward()
    json.dump({"loss": loss.item(), "grad": emb.grad.tolist()}, open(out + str(rank), "w"))
    dist.destroy_process_group()
""")


def test_in_batch_negatives_across_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    # in-batch candidates are the GLOBAL batch's targets, with B - 1 = 10 in the mixture correction:
    # the ranks' summed losses and summed gradients equal one process holding all 11 positions,
    # written out here by hand (candidates: the 7 shared negatives + all 11 targets)
    _run_two_gloo_ranks(_IN_BATCH_SCRIPT, tmp_path)
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(50, 8))
    h_all, t_all = torch.randn(11, 8), torch.tensor([4, 9, 4, 30, 12, 7, 9, 41, 3, 30, 18])
    p = (torch.arange(50).float() % 5 + 1)
    p = p / p.sum()
    negs = torch.tensor([3, 17, 29, 41, 8, 22, 45])
    e, hn = F.normalize(emb, dim=-1), F.normalize(h_all, dim=-1)
    cand = torch.cat([negs, t_all])
    pos = (hn * e[t_all]).sum(-1, keepdim=True) / 0.5
    neg = hn @ e[cand].T / 0.5 - torch.log(7 * (1 / 50) + 10 * p[cand])
    neg = neg.masked_fill(cand[None] == t_all[:, None], -math.inf)
    ref = (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]).sum()
    grad = torch.autograd.grad(ref, emb)[0]
    got = [json.load(open(tmp_path / f"r{r}")) for r in range(2)]
    assert got[0]["loss"] + got[1]["loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert np.allclose(np.array(got[0]["grad"]) + np.array(got[1]["grad"]), grad.numpy(), atol=1e-5)
    # and each rank alone (its own targets only, B - 1 of its own) would not
    local = sampled_softmax(h_all[:4], t_all[:4], lambda r: emb[r], NegativeSampler(50), 0, tau=0.5,
                            negatives=negs, in_batch_negatives=True, popularity=p * 50, reduction="sum")
    assert abs(local.item() - got[0]["loss"]) > 1e-3


# ----------------------------------------------------------------------------- precision rule
def _exact_in_bf16(n, seed):
    """n vectors with four entries of +-1 in 16: unit vectors have entries +-0.5, so every cosine
    is a multiple of 0.25, exact in bf16 whatever the kernel's accumulation order. The matrix
    product is then the same in bf16 and fp32, and any difference from the float64 reference is
    arithmetic after the product (a division by tau or a log-sum-exp in bf16 is off by ~1e-3)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 16)
    for i in range(n):
        cols = torch.randperm(16, generator=g)[:4]
        out[i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return out


def _float64_reference(h, emb, targets, tau):
    hn, en = F.normalize(h.double(), dim=-1), F.normalize(emb.double(), dim=-1)
    return F.cross_entropy(hn @ en.T / tau, targets, reduction="sum")


def _autocast_is_on():
    x = torch.ones(2, 2)
    return (x @ x).dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [7, 500])  # the chunked and the dense exact paths
def test_exact_loss_under_bf16_keeps_everything_after_the_product_in_float32(chunk):
    emb, h, t = _exact_in_bf16(103, 0), _exact_in_bf16(40, 1), torch.randint(0, 103, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_is_on()
        got = full_softmax(h, t, lambda r: emb[r], 103, [], tau=0.07, chunk=chunk, reduction="sum")
    ref = _float64_reference(h, emb, t, 0.07)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) / ref.item() < 2e-6, (got.item(), ref.item())


@pytest.mark.parametrize("in_batch", [False, True])
def test_sampled_loss_under_bf16_keeps_everything_after_the_product_in_float32(in_batch):
    # logQ correction, masking and log-sum-exp in float32 after the negatives' bf16 product
    emb, h = _exact_in_bf16(60, 2), _exact_in_bf16(12, 3)
    g = torch.Generator().manual_seed(1)
    t, negs = torch.randint(0, 60, (12,), generator=g), torch.randint(0, 60, (25,), generator=g)
    pop = torch.arange(60).float() % 7 + 1
    sampler = NegativeSampler(60, pop, alpha=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_is_on()
        got = sampled_softmax(h, t, lambda r: emb[r], sampler, 0, tau=0.07, negatives=negs, reduction="none",
                              in_batch_negatives=in_batch, popularity=pop)
    hn, en = F.normalize(h.double(), dim=-1), F.normalize(emb.double(), dim=-1)
    cand = torch.cat([negs, t]) if in_batch else negs
    expected = 25 * sampler.probs.double()[cand]
    if in_batch:
        expected = expected + 11 * (pop / pop.sum()).double()[cand]
    neg = (hn @ en[cand].T / 0.07 - torch.log(expected)).masked_fill(cand[None] == t[:, None], -math.inf)
    pos = (hn * en[t]).sum(-1, keepdim=True) / 0.07
    ref = torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=2e-6, atol=1e-6), (got - ref).abs().max()


def test_alignment_loss_under_bf16_keeps_everything_after_the_product_in_float32():
    zm, zt = _exact_in_bf16(30, 4), _exact_in_bf16(30, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_is_on()
        got = alignment_loss(zm, zt, torch.ones(30, dtype=torch.bool), tau=0.07)
    ref = _float64_reference(zm, zt, torch.arange(30), 0.07) / 30
    assert abs(got.item() - ref.item()) / ref.item() < 2e-6


def test_exact_loss_backward_recomputes_under_the_forwards_autocast():
    # the chunked backward recomputes every chunk's item embeddings: under the forward's autocast
    # (bf16 products), or its gradient would belong to another function than its loss
    emb = torch.nn.Parameter(torch.randn(50, 8))
    w = torch.nn.Parameter(torch.randn(8, 8))
    seen = []

    def item_fn(r):
        seen.append(torch.is_autocast_enabled("cpu"))
        return emb[r] @ w

    h = torch.randn(20, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_softmax(h, torch.randint(0, 50, (20,)), item_fn, 50, [emb, w], chunk=16)
    forward_calls = len(seen)
    loss.backward()  # outside the autocast context, as the trainer's accelerator.backward is
    assert forward_calls == 4 and len(seen) == 8
    assert all(seen), seen
