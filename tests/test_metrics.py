import math

import numpy as np
import pytest
import torch
from scipy import stats

from ant_dist.eval.metrics import (TIE_RTOL, chunked_target_ranks, full_ranking_metrics, metrics_from_ranks, paired_t_test,
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


# ---------------------------------------------------------------- independent reference
def naive_ranks(scores: np.ndarray, targets, history=None) -> list[int]:
    """Plain-loop pessimistic rank over a full (U x N) float64 score matrix: every other,
    non-excluded item with a score >= the target's, or a NaN score, is above; a NaN target
    score puts every other non-excluded item above."""
    out = []
    for u, t in enumerate(targets):
        excluded = set(history[u]) - {t} if history is not None else set()
        above = 0
        for j in range(scores.shape[1]):
            if j == t or j in excluded:
                continue
            if math.isnan(scores[u, t]) or math.isnan(scores[u, j]) or scores[u, j] >= scores[u, t]:
                above += 1
        out.append(above)
    return out


def cosine_reference(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Float64 cosines; equal item vectors get bit-equal scores by construction (scored once)."""
    un = users / np.linalg.norm(users, axis=1, keepdims=True)
    uniq, inverse = np.unique(items, axis=0, return_inverse=True)
    un_items = uniq / np.linalg.norm(uniq, axis=1, keepdims=True)
    return (un @ un_items.T)[:, np.ravel(inverse)]


CHUNKS = (1, 7, 10, 64, 103, 1000)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_ranks_match_naive_reference_with_exact_ties(chunk):
    # entries in {-1, 0, 1} with four non-zeros: unit vectors have entries +-0.5, so every
    # cosine is a multiple of 0.25, exact in float32 -> a great many exact ties
    rng = np.random.default_rng(1)

    def vectors(n, d=8):
        v = np.zeros((n, d))
        for row in v:
            row[rng.choice(d, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
        return v

    items, users = vectors(103), vectors(25)
    targets = rng.integers(0, 103, 25)
    history = [rng.integers(0, 103, 6).tolist() + [int(targets[u])] for u in range(25)]
    ref = cosine_reference(users, items)
    for hist in (None, history):
        got = chunked_target_ranks(torch.tensor(users, dtype=torch.float32), torch.tensor(targets),
                                   lambda r: torch.tensor(items, dtype=torch.float32)[r], 103, hist, chunk=chunk)
        assert got.tolist() == naive_ranks(ref, targets.tolist(), hist)


def _world_with_duplicates():
    rng = np.random.default_rng(2)
    items = rng.standard_normal((103, 16))
    sources = rng.choice(103, 20, replace=False)
    for k, src in enumerate(sources):  # each source item is copied 1-3 times, anywhere (last chunk too)
        items[rng.choice(103, 1 + k % 3, replace=False)] = items[src]
    users = rng.standard_normal((30, 16))
    targets = np.concatenate([rng.choice(sources, 20), rng.integers(0, 103, 10)])  # 20 users with ties
    return items, users, targets


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", range(1, 17))
def test_chunked_ranks_match_naive_reference_with_duplicate_items(chunk, threads):
    # a copy of the target ties with it on any kernel: every chunk width (BLAS accumulates odd
    # widths' columns in different orders), one or two threads
    items, users, targets = _world_with_duplicates()
    ref = cosine_reference(users, items)
    # the tolerance proof for this construction: apart from exact duplicates, every score is far
    # outside the tie tolerance of the target's (TIE_RTOL = 2.4e-7; the closest is > 1e-5 away)
    gaps = np.abs(ref - ref[np.arange(30), targets][:, None])
    assert ((gaps == 0) | (gaps > 40 * TIE_RTOL)).all()
    expected = naive_ranks(ref, targets.tolist())
    assert sum(int((gaps[u] == 0).sum()) > 1 for u in range(30)) >= 15  # the ties are really there
    table = torch.tensor(items, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = chunked_target_ranks(torch.tensor(users, dtype=torch.float32), torch.tensor(targets),
                                   lambda r: table[r], 103, chunk=chunk)
    finally:
        torch.set_num_threads(before)
    assert got.tolist() == expected


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 103])
def test_copies_that_differ_by_float32_rounding_still_tie(chunk):
    # another machine's item model may produce a copy a few float32 ulps off (a different
    # accumulation order upstream): still a tie. Each copy is nudged by 1-2 ulps in two entries.
    items, users, targets = _world_with_duplicates()
    ref = cosine_reference(users, items)
    table = torch.tensor(items, dtype=torch.float32)
    dup_rows = [i for i in range(103) if (items == items[i]).all(axis=1).sum() > 1]
    for n, i in enumerate(dup_rows):
        for j, ulps in ((n % 16, 1 + n % 2), ((n + 5) % 16, -1)):
            v = table[i, j].clone()
            for _ in range(abs(ulps)):
                v = torch.nextafter(v, torch.tensor(math.copysign(math.inf, ulps)))
            table[i, j] = v
    assert not torch.equal(table, torch.tensor(items, dtype=torch.float32))
    got = chunked_target_ranks(torch.tensor(users, dtype=torch.float32), torch.tensor(targets),
                               lambda r: table[r], 103, chunk=chunk)
    assert got.tolist() == naive_ranks(ref, targets.tolist())


def test_ranks_do_not_depend_on_autocast():
    # evaluation of a bf16-trained model: the ranker computes in float64 whatever the caller's autocast
    items, users, targets = _world_with_duplicates()
    table = torch.tensor(items, dtype=torch.float32)
    args = (torch.tensor(users, dtype=torch.float32), torch.tensor(targets), lambda r: table[r], 103)
    plain = chunked_target_ranks(*args, chunk=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (table[:4] @ table[:4].T).dtype == torch.bfloat16  # autocast really is on
        under_autocast = chunked_target_ranks(*args, chunk=7)
    assert under_autocast.tolist() == plain.tolist()


def test_scores_just_below_the_target_do_not_count():
    # the old 1e-5 tie tolerance counted these as ties; they are strictly below, and well
    # outside float32 noise (~1e-7), so they must not count against the target
    angle = math.atan2(0.8, 0.6)  # target: cosine 0.6 with the user

    def at(a):
        return [math.cos(a), math.sin(a), 0.0, 0.0]

    items = np.array([at(angle), at(angle), at(angle - 4e-6)]          # the target, an exact duplicate, just above
                     + [at(angle + k * 1e-6) for k in (3, 4, 5, 6, 7)]  # five just below
                     + [at(angle + 1.0), [0.0, 0.0, 1.0, 0.0]])         # clearly below
    users = np.array([[1.0, 0.0, 0.0, 0.0]])
    ref = cosine_reference(users, items)
    below = ref[0, 3:8] - ref[0, 0]
    assert ((below < -2e-6) & (below > -1e-5)).all()  # the case the epsilon mis-ranked
    assert naive_ranks(ref, [0]) == [2]  # the duplicate and the one just above
    table = torch.tensor(items, dtype=torch.float32)
    for chunk in (1, 2, 3, 4, 10):
        got = chunked_target_ranks(torch.tensor(users, dtype=torch.float32), torch.tensor([0]),
                                   lambda r: table[r], len(items), chunk=chunk)
        assert got.tolist() == [2]
        got = chunked_target_ranks(torch.tensor(users, dtype=torch.float32), torch.tensor([0]),
                                   lambda r: table[r], len(items), chunk=chunk, tie_eps=1e-5)  # accepted, ignored
        assert got.tolist() == [2]


# ---------------------------------------------------------------- NaN and padding
def test_nan_scores_count_against_the_target():
    nan = float("nan")
    scores = torch.tensor([[nan, nan, nan, nan, nan],     # all NaN: the worst rank, not 0
                           [0.1, nan, 0.9, 0.2, 0.3],     # NaN target: every other item above
                           [0.9, 0.5, nan, 0.1, 0.2],     # a NaN item counts above: items 0 and 2
                           [0.9, 0.5, nan, 0.1, 0.2]])    # ... unless it is excluded (history)
    targets = torch.tensor([0, 1, 1, 1])
    history = [[], [2], [], [2]]
    ranks = target_ranks(scores, targets, history=history)
    assert ranks.tolist() == [4, 3, 2, 1]
    assert ranks.tolist() == naive_ranks(scores.double().numpy(), targets.tolist(), history)
    m = full_ranking_metrics(scores[:1], targets[:1], ks=(5,))
    assert m["recall@5"].tolist() == [1.0] and m["ndcg@5"][0] == pytest.approx(1 / math.log2(6))
    assert full_ranking_metrics(scores[:1], targets[:1], ks=(4,))["recall@4"].tolist() == [0.0]


def test_chunked_nan_vectors_count_against_the_target():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(9, 4, generator=g)
    table[5] = float("nan")  # a broken item: counts above every target
    users = torch.randn(3, 4, generator=g)
    users[0] = float("nan")  # a broken user: every score NaN -> the worst rank
    targets = torch.tensor([2, 5, 3])  # user 1's target is the broken item -> the worst rank
    dense = torch.nn.functional.normalize(users, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    expected = naive_ranks(dense.double().numpy(), targets.tolist())
    assert expected[:2] == [8, 8]
    for chunk in (2, 9):
        got = chunked_target_ranks(users, targets, lambda r: table[r], 9, chunk=chunk)
        assert got.tolist() == expected
        history = [[1, 5], [0], [5]]
        got = chunked_target_ranks(users, targets, lambda r: table[r], 9, history, chunk=chunk)
        # excluded items, NaN or not, never count
        assert got.tolist() == naive_ranks(dense.double().numpy(), targets.tolist(), history)
        assert got.tolist()[:2] == [6, 7] and got[2] == expected[2] - 1


def test_padding_targets_get_rank_minus_one_and_never_read_a_column():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.1, 0.2, 0.3, 0.9]])
    # target -1 used to read the last column (0.9, the top score: rank 0)
    assert target_ranks(scores, torch.tensor([-1, 3])).tolist() == [-1, 0]
    table = torch.eye(4)
    got = chunked_target_ranks(torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2), torch.tensor([-1, 3]),
                               lambda r: table[r], 4, history=[[3], [-1, 0]], chunk=3)
    assert got.tolist() == [-1, 0]  # the padding history row -1 is ignored too
    m = full_ranking_metrics(scores, torch.tensor([-1, 2]), ks=(1, 2))
    assert m["recall@1"].tolist() == [0.0] and m["recall@2"].tolist() == [1.0]  # only the real user (rank 1)
    with pytest.raises(ValueError, match="negative rank"):
        metrics_from_ranks(torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="n_items"):
        target_ranks(scores, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="n_items"):
        chunked_target_ranks(scores, torch.tensor([0, 4]), lambda r: table[r], 4)


def test_dot_score_copies_a_few_ulps_off_tie_whatever_the_norms():
    # score=dot: the rounding error of h . v scales with |h| |v|, not with the score; long vectors
    # nearly orthogonal to the user have small scores and large rounding errors
    items, users, targets = _world_with_duplicates()
    items, users = items * 30.0, users * 20.0
    exact = users @ items.T  # float64; exact duplicates score exactly alike
    tol = TIE_RTOL * np.linalg.norm(users, axis=1) * np.linalg.norm(items[targets], axis=1)
    gaps = np.abs(exact - exact[np.arange(30), targets][:, None])
    assert ((gaps == 0) | (gaps > 40 * tol[:, None])).all()  # only the copies are within the tolerance
    table = torch.tensor(items, dtype=torch.float32)
    dup_rows = [i for i in range(103) if (items == items[i]).all(axis=1).sum() > 1]
    for n, i in enumerate(dup_rows):
        j = n % 16
        table[i, j] = torch.nextafter(table[i, j], torch.tensor(math.inf if n % 2 else -math.inf))
    got = chunked_target_ranks(torch.tensor(users, dtype=torch.float32), torch.tensor(targets),
                               lambda r: table[r], 103, chunk=7, score="dot")
    assert got.tolist() == naive_ranks(exact, targets.tolist())
