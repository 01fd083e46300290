import math

import numpy as np
import pytest
import torch
from scipy import stats

from ant_dist.metrics import (chunked_target_ranks, full_ranking_metrics, metrics_from_ranks, paired_t_test,
                              summarise, target_ranks)


def test_hand_computed_case_with_ties():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    # target 1 ties with item 2: ties count against the target -> rank 2 (0-based)
    m = full_ranking_metrics(scores, torch.tensor([1]), ks=(1, 2, 3))
    assert m["recall@1"][0] == 0 and m["recall@2"][0] == 0 and m["recall@3"][0] == 1
    assert m["ndcg@3"][0] == pytest.approx(1 / math.log2(4))


def test_history_exclusion_padding_columns_and_padding_users():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1, 9.9], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ranks = target_ranks(scores, torch.tensor([1, 0]), n_items=4, history=[[0, 1], []])
    assert ranks.tolist() == [1, 3]  # item 0 excluded (target 1 stays); column 4 never ranked
    m = full_ranking_metrics(scores, torch.tensor([1, -1]), ks=(10,), n_items=4)
    assert len(m["recall@10"]) == 1  # the padding user is dropped
    m = full_ranking_metrics(scores[:1], torch.tensor([1]), ks=(2,), n_items=4, history=[[0]])
    assert m["recall@2"].tolist() == [1.0]  # excluded by default: rank 1
    m = full_ranking_metrics(scores[:1], torch.tensor([1]), ks=(2,), n_items=4, history=[[0]], exclude_history=False)
    assert m["recall@2"].tolist() == [0.0]  # RecBole's setting: rank 2


def test_all_equal_scores_give_the_worst_rank():
    ranks = target_ranks(torch.zeros(3, 7), torch.tensor([0, 3, 6]))
    assert ranks.tolist() == [6, 6, 6]


@pytest.mark.parametrize("seed", range(3))
def test_ranks_match_brute_force_sort(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (40, 30), generator=g).float()  # many ties
    targets = torch.randint(0, 30, (40,), generator=g)
    ranks = target_ranks(scores, targets).tolist()
    for u in range(40):
        # sort by score descending, the target last among equals (pessimistic)
        order = sorted(range(30), key=lambda j: (-scores[u, j].item(), j == targets[u].item()))
        assert ranks[u] == order.index(targets[u].item())
    m = metrics_from_ranks(torch.tensor(ranks), ks=(5,))
    assert m["recall@5"].tolist() == [float(r < 5) for r in ranks]


def test_chunked_ranks_equal_dense_ranks():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(103, 8, generator=g)
    users = torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 103, (20,), generator=g)
    history = [torch.randint(0, 103, (5,), generator=g).tolist() for _ in range(20)]
    dense = torch.nn.functional.normalize(users, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    for chunk in (10, 103, 1000):
        got = chunked_target_ranks(users, targets, lambda r: emb[r], 103, history, chunk=chunk)
        assert got.tolist() == target_ranks(dense, targets, history=history).tolist()


def test_paired_t_test_matches_formula():
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    res = paired_t_test(a, b)
    assert res["t"] == pytest.approx(t)
    assert res["p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    assert summarise({"x": np.array([1.0, 0.0])}) == {"x": 0.5}
