"""Our ID-SASRec against an independent reference: RecBole 1.2.1's SASRec, with its weights copied in.

RecBole is a test-only dependency (tools/setup.sh installs it and the few packages its import
needs). Its SASRec is the one the literature and the issue's baseline figures come from; ours
must compute the same function:
- the user state (`SASRec.forward`) at every real position, for sequences of several lengths;
- with score=dot, the full-catalog scores (`full_sort_predict`) and so the evaluation's ranks;
- the training loss and its gradients: RecBole trains on every prefix, we train on every
  position of a sequence at once, which is the same sum of cross entropies.

Intentional differences, each tested below:
- RecBole's item table has a padding row (id 0) that `full_sort_predict` scores and its softmax
  counts; our catalog has no padding item (row r is RecBole's id r + 1);
- score=cos (ANT's default): cos(h, v)/tau instead of the dot product;
- training windows: one window of the last max_len positions per user (the original SASRec)
  instead of every prefix of the whole history (RecBole); the same when histories fit the window;
- the feed-forward width: ours defaults to the hidden size (the ANT/UniSRec code), RecBole's to
  `inner_size` (256); here `ffn_mult` is set to RecBole's width.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender.sasrec import SASRec as RecBoleSASRec

from ant_dist.model.ant import ANT, ANTConfig
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRec, SASRecConfig
from ant_dist.train.data import Corpus, DomainSequences, EpochBatches, epoch_batches, epoch_order
from ant_dist.train.evaluate import catalog_embeddings, rank_users
from ant_dist.features.catalog import CatalogFeatures
from ant_dist.train.objective import TrainObjective

N_ITEMS, HIDDEN, INNER, MAX_LEN = 60, 16, 64, 12


class _Dataset:
    """The one thing RecBole's SequentialRecommender asks of a dataset: the item count (with padding)."""

    def num(self, field: str) -> int:
        return N_ITEMS + 1


def _recbole_sasrec(seed: int = 0) -> RecBoleSASRec:
    torch.manual_seed(seed)
    config = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
              "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": MAX_LEN,
              "device": "cpu", "n_layers": 2, "n_heads": 2, "hidden_size": HIDDEN, "inner_size": INNER,
              "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "initializer_range": 0.02, "loss_type": "CE"}
    rb = RecBoleSASRec(config, _Dataset())
    with torch.no_grad():  # away from the init (unit norms, zero biases) so every copied tensor matters
        for name, p in rb.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.mul_(20.0)  # std 0.4: scores spread out, so ranks are not decided by rounding
    return rb.eval()


def _as_ours(rb: RecBoleSASRec, get) -> dict[str, torch.Tensor]:
    """RecBole's tensors (`get(param)`: the weight or its gradient) under our parameter names."""
    out = {"id_embedding.weight": get(rb.item_embedding.weight)[1:],  # our row r = RecBole id r + 1
           "sasrec.position.weight": get(rb.position_embedding.weight),
           "sasrec.input_norm.weight": get(rb.LayerNorm.weight), "sasrec.input_norm.bias": get(rb.LayerNorm.bias)}
    for i, layer in enumerate(rb.trm_encoder.layer):
        att, ffn, ours = layer.multi_head_attention, layer.feed_forward, f"sasrec.blocks.{i}."
        for kind in ("weight", "bias"):
            out[ours + f"qkv.{kind}"] = torch.cat([get(getattr(m, kind)) for m in (att.query, att.key, att.value)])
            for mine, theirs in (("out", att.dense), ("norm1", att.LayerNorm), ("ffn.0", ffn.dense_1),
                                 ("ffn.2", ffn.dense_2), ("norm2", ffn.LayerNorm)):
                out[ours + f"{mine}.{kind}"] = get(getattr(theirs, kind))
    return out


def _ours(rb: RecBoleSASRec, score: str = "dot") -> ANT:
    model = ANT(ANTConfig(item_source="id", n_items=N_ITEMS, score=score, irl=IRLConfig(hidden=HIDDEN),
                          sasrec=SASRecConfig(hidden=HIDDEN, n_layers=2, n_heads=2, max_len=MAX_LEN, dropout=0.5,
                                              ffn_mult=INNER // HIDDEN)))
    model.load_state_dict(_as_ours(rb, lambda p: p.detach().clone()))  # strict: every tensor mapped
    return model.eval()


def _sequences(lengths, seed=1) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.integers(0, N_ITEMS, n) for n in lengths]


def _recbole_batch(seqs) -> dict:
    """RecBole's input: ids shifted by one (0 is padding), right-padded to max_len, and the lengths."""
    item_seq = torch.zeros(len(seqs), MAX_LEN, dtype=torch.long)
    for i, s in enumerate(seqs):
        item_seq[i, :len(s)] = torch.as_tensor(s) + 1
    return {"item_id_list": item_seq, "item_length": torch.tensor([len(s) for s in seqs])}


def _our_states(model: ANT, seqs) -> torch.Tensor:
    """(B, L, d) states at every position, sequences right-padded to the longest (not to max_len)."""
    length = max(len(s) for s in seqs)
    rows = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        rows[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), True
    return model.user_states(model.id_embedding(rows) * mask.unsqueeze(-1), mask), mask


def _corpus(seqs) -> Corpus:
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    return Corpus([DomainSequences("d", 0, N_ITEMS, offsets, np.concatenate(seqs).astype(np.int64))])


def _features() -> CatalogFeatures:
    """Feature tables an ID model never reads (the trainer's interface needs them)."""
    table = {"text": np.zeros((N_ITEMS, 2), np.float16), "image": np.zeros((N_ITEMS, 2), np.float16),
             "price": np.full(N_ITEMS, np.nan, np.float32), "has_image": np.zeros(N_ITEMS, bool)}
    return CatalogFeatures([table], "device", torch.device("cpu"))


LENGTHS = [1, 2, 3, 5, 8, MAX_LEN]


@torch.no_grad()
def test_user_states_equal_recbole_forward_at_every_real_position():
    rb = _recbole_sasrec()
    model = _ours(rb)
    seqs = _sequences(LENGTHS)
    ours, mask = _our_states(model, seqs)
    batch = _recbole_batch(seqs)
    for k in range(1, MAX_LEN + 1):  # RecBole's state after k items = its forward with length k
        real = batch["item_length"] >= k
        if not real.any():
            continue
        theirs = rb.forward(batch["item_id_list"][real], torch.full((int(real.sum()),), k))
        np.testing.assert_allclose(ours[real, k - 1].numpy(), theirs.numpy(), atol=1e-5, rtol=0)
    last = SASRec.last(ours, mask)
    assert last.abs().max() > 0.1, "states far from zero, or the comparison above could not fail"


@torch.no_grad()
def test_dot_scores_and_ranks_equal_recbole_full_sort_predict():
    rb = _recbole_sasrec()
    model = _ours(rb, score="dot")
    seqs = _sequences([3, 4, 6, 9, 14, 20, 30], seed=2)  # histories: all but the last item (the target)
    hist = [s[:-1][-MAX_LEN:] for s in seqs]
    theirs = rb.full_sort_predict(_recbole_batch(hist))
    table = catalog_embeddings(model, None, N_ITEMS, chunk=16, device=torch.device("cpu"))
    ours, mask = _our_states(model, hist)
    scores = SASRec.last(ours, mask) @ table.T
    np.testing.assert_allclose(scores.numpy(), theirs[:, 1:].numpy(), atol=1e-4, rtol=1e-5)  # column 0: padding
    # the evaluation's ranks (streamed in chunks, every item ranked, history included) from RecBole's scores
    ranks = rank_users(model, None, table, _corpus(seqs), np.arange(len(seqs)), "test", MAX_LEN,
                       exclude_history=False, chunk=16)
    s = theirs[:, 1:]
    target = torch.tensor([int(x[-1]) for x in seqs])
    expected = (s >= s[torch.arange(len(seqs)), target][:, None]).sum(1) - 1  # pessimistic, minus the target
    np.testing.assert_array_equal(ranks, expected.numpy())
    assert len(set(ranks.tolist())) > 3


@torch.no_grad()
def test_cos_scores_are_recbole_states_and_items_by_cosine():
    """The intentional difference: score=cos ranks by the cosine of the same state and item vectors."""
    rb = _recbole_sasrec()
    model = _ours(rb, score="cos")
    seqs = _sequences([4, 7, 11, 16, 25], seed=3)
    hist = [s[:-1][-MAX_LEN:] for s in seqs]
    h = rb.forward(_recbole_batch(hist)["item_id_list"], torch.tensor([len(x) for x in hist]))
    cos = F.normalize(h, dim=-1) @ F.normalize(rb.item_embedding.weight[1:], dim=-1).T
    table = catalog_embeddings(model, None, N_ITEMS, chunk=16, device=torch.device("cpu"))
    ranks = rank_users(model, None, table, _corpus(seqs), np.arange(len(seqs)), "test", MAX_LEN,
                       exclude_history=False, chunk=16)
    target = torch.tensor([int(x[-1]) for x in seqs])
    expected = (cos >= cos[torch.arange(len(seqs)), target][:, None]).sum(1) - 1
    np.testing.assert_array_equal(ranks, expected.numpy())
    dot = h @ rb.item_embedding.weight[1:].T
    by_dot = (dot >= dot[torch.arange(len(seqs)), target][:, None]).sum(1) - 1
    assert not torch.equal(by_dot, expected), "cos and dot must rank differently here, or this proves nothing"


def _recbole_prefix_losses(rb: RecBoleSASRec, seqs, users) -> tuple[torch.Tensor, torch.Tensor]:
    """RecBole's training examples: every prefix predicts its next item, over the last max_len + 1
    items of each training part (our window: ours, like the original SASRec, trains on one window of
    max_len positions per user; RecBole on every prefix of the whole history. The two agree when the
    training part has at most max_len + 1 items: every ML-100K user at max_len 50, as packing keeps the
    last 50 interactions and two are held out).

    Returns the cross entropies over our catalog (RecBole's logits without the padding column)
    and over RecBole's own (with it)."""
    prefixes, targets = [], []
    for u in users:
        train = seqs[u][:-2][-(MAX_LEN + 1):]
        for t in range(1, len(train)):
            prefixes.append(train[:t])
            targets.append(int(train[t]))
    batch = _recbole_batch(prefixes)
    logits = rb.forward(batch["item_id_list"], batch["item_length"]) @ rb.item_embedding.weight.T
    target = torch.tensor(targets)
    return (F.cross_entropy(logits[:, 1:], target, reduction="none"),
            F.cross_entropy(logits, target + 1, reduction="none"))


@pytest.mark.parametrize("chunk", [4096, 16], ids=["dense", "chunked"])
def test_training_loss_and_gradients_equal_recbole_over_every_prefix(chunk):
    """The trainer's batch (catalog rows not 0..n-1: the ID table must be read by catalog row) and
    its exact loss with score=dot, against RecBole's SASRec on the same examples."""
    rb = _recbole_sasrec()
    model = _ours(rb, score="dot")
    seqs = _sequences([5, 6, 9, 14, 17, 23, 30], seed=4)
    corpus = _corpus(seqs)
    n = len(corpus.train_users)
    batch = EpochBatches(corpus, epoch_order(n, 0, 0), epoch_batches(n, n), 0, 0, 1, MAX_LEN, 0)[0]
    assert len(batch["rows"]) < N_ITEMS, "the batch's rows must differ from 0..n-1 for this test to bite"
    objective = TrainObjective(model, _features(), loss="exact", tau=0.07, align_weight=0.0, exact_chunk=chunk).eval()
    out = objective(batch)
    ours_sum = out["rec_sum"]
    theirs, theirs_with_padding = _recbole_prefix_losses(rb, seqs, batch["users"].numpy())
    assert int(out["positions"]) == len(theirs) == batch["n_global"]
    np.testing.assert_allclose(float(ours_sum), float(theirs.detach().sum()), rtol=1e-5)
    # RecBole's own softmax also counts the padding item: its loss is larger by exactly that term
    assert float(theirs_with_padding.detach().sum()) > float(theirs.detach().sum()) + 1e-3
    out["loss"].backward()
    theirs.mean().backward()
    grads = _as_ours(rb, lambda p: p.grad)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), grads[name].numpy(), atol=1e-6, rtol=1e-4, err_msg=name)
