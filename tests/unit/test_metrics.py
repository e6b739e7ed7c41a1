"""Metrics checked against independent computations (brute-force loops, closed forms, hand values).

The CTR metrics call scikit-learn; their references here are written out (pair counting for AUC,
the cross-entropy formula), so the tests do not compare scikit-learn with itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adrec import metrics as metrics_mod
from adrec.metrics import (
    auc,
    calibration,
    ctr_metrics,
    logloss,
    rank_candidates,
    rank_topk,
    topk_metrics,
)


def ref_auc(y, p) -> float:
    """Share of (positive, negative) pairs ordered right, ties counting half."""
    y, p = np.asarray(y), np.asarray(p, float)
    pos, neg = p[y == 1][:, None], p[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def ref_logloss(y, p, eps=1e-7) -> float:
    y, p = np.asarray(y, float), np.clip(np.asarray(p, float), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

# ----------------------------------------------------------------- reference code


def ref_user_metrics(ranked: list[int], positives: set[int], k: int) -> dict[str, float]:
    """Protocol formulas, one user, written with explicit loops."""
    ranked = list(ranked)[:k]
    hits = []
    for r in range(1, k + 1):
        item = ranked[r - 1] if r - 1 < len(ranked) else -1
        hits.append(1 if (item != -1 and item in positives) else 0)
    n_hit = 0
    dcg = 0.0
    ap_sum = 0.0
    for r, h in enumerate(hits, start=1):
        if h:
            n_hit += 1
            dcg += 1.0 / math.log2(r + 1)
            ap_sum += n_hit / r
    ideal_n = min(k, len(positives))
    idcg = 0.0
    for r in range(1, ideal_n + 1):
        idcg += 1.0 / math.log2(r + 1)
    return {
        "precision": n_hit / k,
        "recall": n_hit / len(positives),
        "ndcg": dcg / idcg,
        "map": ap_sum / ideal_n,
        "hitrate": 1.0 if n_hit > 0 else 0.0,
    }


def ref_topk(lists, test_pos, n_catalog, k) -> dict[str, float]:
    per = [ref_user_metrics(lst, set(int(i) for i in t), k) for lst, t in zip(lists, test_pos)]
    out = {}
    for name in ("precision", "recall", "ndcg", "map", "hitrate"):
        out[f"topk.{name}@{k}"] = sum(p[name] for p in per) / len(per)
    seen = set()
    for lst in lists:
        for item in list(lst)[:k]:
            if item != -1:
                seen.add(int(item))
    out[f"topk.coverage@{k}"] = len(seen) / n_catalog
    return out


def ref_rank(scores_row, excluded, k) -> list[int]:
    items = [i for i in range(len(scores_row)) if i not in set(excluded)]
    items.sort(key=lambda i: (-float(scores_row[i]), i))
    top = items[:k]
    return top + [-1] * (k - len(top))


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


# ------------------------------------------------------------------------ CTR


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 500
    y = rng.integers(0, 2, n)
    p = np.round(rng.random(n) * 0.5 + 0.3 * y, 1)  # coarse rounding: many ties
    assert auc(y, p) == pytest.approx(ref_auc(y, p), abs=1e-12)
    # Continuous scores / logits work too.
    z = rng.normal(size=n) + y
    assert auc(y, z) == pytest.approx(ref_auc(y, z), abs=1e-12)


def test_auc_hand_values():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5  # tie counts half
    # pos scores {0.8, 0.4}, neg {0.4, 0.1}: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4 -> .5, 0.4>0.1)
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert auc(np.array([True, False]), [0.7, 0.2]) == 1.0


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))


@pytest.mark.parametrize("seed", range(3))
def test_logloss_matches_the_formula(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = rng.uniform(0.01, 0.99, 300)
    assert logloss(y, p) == pytest.approx(ref_logloss(y, p), rel=1e-12)
    p[:3] = [0.0, 1.0, 1e-9]  # clipped to [1e-7, 1 - 1e-7] as the protocol says
    assert logloss(y, p) == pytest.approx(ref_logloss(y, p), rel=1e-12)


def test_logloss_clips_and_hand_value():
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    eps = 1e-7
    assert logloss([1], [0.0]) == pytest.approx(-math.log(eps))
    assert logloss([0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert math.isfinite(logloss([1, 0], np.array([0.0, 1.0], dtype=np.float32)))


def test_calibration():
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)
    assert calibration([1, 0], [0.25, 0.25]) == pytest.approx(0.5)
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))


def test_ctr_metrics_keys_and_types():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    p = rng.uniform(0.05, 0.95, 100)
    m = ctr_metrics(y, p)
    assert set(m) == {"ctr.auc", "ctr.logloss", "ctr.calibration"}
    assert all(type(v) is float for v in m.values())
    assert m["ctr.auc"] == pytest.approx(ref_auc(y, p))
    assert m["ctr.logloss"] == pytest.approx(ref_logloss(y, p))
    assert m["ctr.calibration"] == pytest.approx(p.mean() / y.mean())


def test_ctr_input_validation():
    with pytest.raises(ValueError, match="lengths"):
        auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="probabilities"):
        logloss([0, 1], [0.1, 1.5])


# ---------------------------------------------------------------------- Top-K


def test_topk_hand_case():
    # User 0: T={2,5}, ranking [5,1,2] -> hits at ranks 1 and 3.
    # User 1: T={0,1,2,3,4} (|T| > K), ranking [0,9,1] -> hits at ranks 1 and 3.
    # User 2: T={7}, ranking [1,2,3] -> no hit.
    topk = np.array([[5, 1, 2], [0, 9, 1], [1, 2, 3]])
    test_pos = [{2, 5}, {0, 1, 2, 3, 4}, {7}]
    m = topk_metrics(topk, test_pos, n_catalog=20, k=3)

    d = [1.0, 1 / math.log2(3), 1 / math.log2(4)]  # 1, 0.6309..., 0.5
    u0 = dict(p=2 / 3, r=1.0, ndcg=(d[0] + d[2]) / (d[0] + d[1]), ap=(1 / 1 + 2 / 3) / 2, hr=1)
    u1 = dict(p=2 / 3, r=2 / 5, ndcg=(d[0] + d[2]) / (d[0] + d[1] + d[2]), ap=(1 + 2 / 3) / 3, hr=1)
    u2 = dict(p=0.0, r=0.0, ndcg=0.0, ap=0.0, hr=0)
    assert u0["ndcg"] == pytest.approx(0.91972, abs=1e-5)
    assert u0["ap"] == pytest.approx(5 / 6)
    assert u1["ap"] == pytest.approx(5 / 9)

    def mean(key):
        return (u0[key] + u1[key] + u2[key]) / 3

    assert m["topk.precision@3"] == pytest.approx(mean("p"))
    assert m["topk.recall@3"] == pytest.approx(mean("r"))
    assert m["topk.ndcg@3"] == pytest.approx(mean("ndcg"))
    assert m["topk.map@3"] == pytest.approx(mean("ap"))
    assert m["topk.hitrate@3"] == pytest.approx(2 / 3)
    # union {5,1,2,0,9,3} = 6 items of 20
    assert m["topk.coverage@3"] == pytest.approx(6 / 20)

    single = topk_metrics(topk[:1], test_pos[:1], n_catalog=20, k=3)
    assert single["topk.precision@3"] == pytest.approx(2 / 3)
    assert single["topk.recall@3"] == 1.0
    assert single["topk.ndcg@3"] == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))
    assert single["topk.map@3"] == pytest.approx(5 / 6)


def test_topk_keys():
    m = topk_metrics(np.array([[0]]), [{0}], n_catalog=5, k=10)
    assert set(m) == {
        "topk.precision@10",
        "topk.recall@10",
        "topk.ndcg@10",
        "topk.map@10",
        "topk.hitrate@10",
        "topk.coverage@10",
    }
    assert all(type(v) is float for v in m.values())
    c = topk_metrics(np.array([[0]]), [{0}], n_catalog=5, k=100, prefix="candidates")
    assert c["candidates.recall@100"] == 1.0


def test_topk_padding_counts_as_miss_with_k_denominator():
    # Only one candidate left for the user: [5, -1, -1], T={5}.
    m = topk_metrics(np.array([[5, -1, -1]]), [np.array([5])], n_catalog=10, k=3)
    assert m["topk.precision@3"] == pytest.approx(1 / 3)
    assert m["topk.recall@3"] == 1.0
    assert m["topk.ndcg@3"] == 1.0
    assert m["topk.map@3"] == 1.0
    assert m["topk.coverage@3"] == pytest.approx(1 / 10)  # -1 is not an item
    # Fewer columns than k behaves like -1 padding.
    m2 = topk_metrics(np.array([[5]]), [{5}], n_catalog=10, k=3)
    assert m2 == m


def test_topk_truncates_to_k():
    topk = np.array([[1, 2, 3, 4, 5]])
    m = topk_metrics(topk, [{4, 5}], n_catalog=6, k=2)
    assert m["topk.hitrate@2"] == 0.0
    assert m["topk.coverage@2"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("seed", range(8))
def test_topk_matches_bruteforce_random(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 40, 30
    k = int(rng.integers(1, 12))
    lists, test_pos = [], []
    for _ in range(n_users):
        length = int(rng.integers(0, k + 3))
        lst = list(rng.permutation(n_items)[:length])
        lst = (lst + [-1] * (k + 2))[: k + 2]  # wider than k, padded
        lists.append(lst)
        size = int(rng.integers(1, 15))
        t = rng.choice(n_items, size=size, replace=False)
        test_pos.append(set(t.tolist()) if rng.random() < 0.5 else t)
    got = topk_metrics(np.array(lists), test_pos, n_items, k)
    want = ref_topk(lists, test_pos, n_items, k)
    assert_metrics_close(got, want)


def test_topk_validation():
    with pytest.raises(ValueError, match="at least one test positive"):
        topk_metrics(np.array([[1, 2]]), [set()], n_catalog=5, k=2)
    with pytest.raises(ValueError, match="more than once"):
        topk_metrics(np.array([[1, 1]]), [{1}], n_catalog=5, k=2)
    with pytest.raises(ValueError, match="outside"):
        topk_metrics(np.array([[1, 7]]), [{1}], n_catalog=5, k=2)
    with pytest.raises(ValueError, match="outside"):
        topk_metrics(np.array([[1, 2]]), [{9}], n_catalog=5, k=2)
    with pytest.raises(ValueError, match="rows"):
        topk_metrics(np.array([[1, 2]]), [{1}, {2}], n_catalog=5, k=2)
    with pytest.raises(ValueError, match="positive integer"):
        topk_metrics(np.array([[1, 2]]), [{1}], n_catalog=5, k=0)
    # Several -1 pads are not duplicates.
    topk_metrics(np.array([[1, -1, -1]]), [{1}], n_catalog=5, k=3)


def test_topk_no_users():
    m = topk_metrics(np.zeros((0, 3), dtype=int), [], n_catalog=5, k=3)
    assert math.isnan(m["topk.recall@3"])
    assert m["topk.coverage@3"] == 0.0


# -------------------------------------------------------------------- ranking


def test_rank_topk_ties_go_to_lower_index():
    scores = np.array([[0.5, 0.9, 0.9, 0.1, 0.9]])
    assert rank_topk(scores, None, 4).tolist() == [[1, 2, 4, 0]]
    flat = np.zeros((1, 6))
    assert rank_topk(flat, None, 6).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_rank_topk_excludes_train_items_and_pads():
    scores = np.array([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    out = rank_topk(scores, [np.array([0, 2]), [3]], k=3)
    assert out.tolist() == [[1, 3, -1], [2, 1, 0]]
    assert out.dtype == np.int64
    # k larger than the catalog
    assert rank_topk(scores, [set(), {0, 1, 2, 3}], k=6).tolist() == [
        [0, 1, 2, 3, -1, -1],
        [-1] * 6,
    ]


def test_rank_topk_neg_inf_and_nan():
    scores = np.array([[-np.inf, np.nan, -np.inf, 1.0]])
    # Item 1 (nan) is excluded; -inf items are still ranked (ties -> lower index).
    assert rank_topk(scores, [[1]], 4).tolist() == [[3, 0, 2, -1]]
    with pytest.raises(ValueError, match="nan"):
        rank_topk(scores, None, 2)
    with pytest.raises(ValueError, match="outside"):
        rank_topk(scores, [[4]], 2)


@pytest.mark.parametrize("seed", range(5))
def test_rank_topk_matches_bruteforce(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 25, 40, 7
    scores = rng.integers(0, 5, size=(n_users, n_items)).astype(np.float32)  # many ties
    exclude = [rng.choice(n_items, size=int(rng.integers(0, 38)), replace=False)
               for _ in range(n_users)]
    want = [ref_rank(scores[u], set(exclude[u].tolist()), k) for u in range(n_users)]
    assert rank_topk(scores, exclude, k).tolist() == want
    # Same answer when processed in small row chunks.
    monkeypatch.setattr(metrics_mod, "_RANK_CHUNK_ELEMENTS", 3 * n_items)
    assert rank_topk(scores, exclude, k).tolist() == want


def test_rank_candidates_ties_go_to_lower_item_id_not_position():
    ids = np.array([[9, 4, 7, -1, 2]])
    scores = np.array([[0.5, 0.5, 0.8, np.nan, 0.5]])
    assert rank_candidates(ids, scores, 4).tolist() == [[7, 2, 4, 9]]
    assert rank_candidates(ids, scores, 6).tolist() == [[7, 2, 4, 9, -1, -1]]


def test_rank_candidates_duplicates_and_exclusion():
    ids = np.array([[3, 1, 3, 2], [5, -1, -1, -1]])
    scores = np.array([[0.1, 0.5, 0.9, 0.2], [1.0, 0.0, 0.0, 0.0]])
    # item 3 appears twice: kept once at its best score 0.9
    assert rank_candidates(ids, scores, 4).tolist() == [[3, 1, 2, -1], [5, -1, -1, -1]]
    out = rank_candidates(ids, scores, 3, exclude=[{3}, np.array([5, 100])])
    assert out.tolist() == [[1, 2, -1], [-1, -1, -1]]
    with pytest.raises(ValueError, match="nan"):
        rank_candidates(np.array([[1, 2]]), np.array([[0.1, np.nan]]), 2)
    with pytest.raises(ValueError, match="shape"):
        rank_candidates(np.array([[1, 2]]), np.array([[0.1]]), 2)


@pytest.mark.parametrize("seed", range(5))
def test_rank_candidates_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    n_users, n_cand, k = 30, 12, 5
    ids = np.full((n_users, n_cand), -1)
    scores = rng.integers(0, 4, size=(n_users, n_cand)).astype(float)
    want = []
    for u in range(n_users):
        m = int(rng.integers(0, n_cand + 1))
        row = rng.choice(50, size=m, replace=False)
        ids[u, rng.permutation(n_cand)[:m]] = row  # pads scattered anywhere
        best: dict[int, float] = {}
        for c in range(n_cand):
            item = int(ids[u, c])
            if item >= 0:
                best[item] = max(best.get(item, -math.inf), float(scores[u, c]))
        ranked = sorted(best, key=lambda i: (-best[i], i))[:k]
        want.append(ranked + [-1] * (k - len(ranked)))
    assert rank_candidates(ids, scores, k).tolist() == want


def test_rank_candidates_over_full_catalog_equals_rank_topk():
    rng = np.random.default_rng(3)
    n_users, n_items, k = 10, 15, 6
    scores = rng.integers(0, 3, size=(n_users, n_items)).astype(float)
    perm = np.stack([rng.permutation(n_items) for _ in range(n_users)])
    cand_scores = np.take_along_axis(scores, perm, axis=1)
    exclude = [rng.choice(n_items, size=3, replace=False) for _ in range(n_users)]
    assert (
        rank_candidates(perm, cand_scores, k, exclude=exclude).tolist()
        == rank_topk(scores, exclude, k).tolist()
    )


def test_end_to_end_protocol_small():
    """rank_topk + topk_metrics on a tiny log, compared with the reference loops."""
    rng = np.random.default_rng(11)
    n_users, n_items, k = 20, 25, 10
    scores = rng.normal(size=(n_users, n_items))
    train = [rng.choice(n_items, size=5, replace=False) for _ in range(n_users)]
    test_pos = []
    for u in range(n_users):
        rest = np.setdiff1d(np.arange(n_items), train[u])
        test_pos.append(set(rng.choice(rest, size=int(rng.integers(1, 6)), replace=False).tolist()))
    topk = rank_topk(scores, train, k)
    for u in range(n_users):
        assert not set(topk[u].tolist()) & set(train[u].tolist())
    want_lists = [ref_rank(scores[u], set(train[u].tolist()), k) for u in range(n_users)]
    assert_metrics_close(
        topk_metrics(topk, test_pos, n_items, k), ref_topk(want_lists, test_pos, n_items, k)
    )
