"""Candidate sources: each against the shared contract (tests/support/candidate_contract.py), merging,
fold-in, cold items, the GPU backend (skipped unless implicit has CUDA) and a MovieLens-100k sanity check.

No Ray here; implicit is used for real (never mocked).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp

import implicit.gpu

from adrec.candidates import (
    PAD_SCORE,
    SOURCE_NAMES,
    ALSSource,
    BPRSource,
    CandidateSource,
    EASESource,
    ItemItemSource,
    MultiSource,
    PopularitySource,
    TextNeighbourSource,
    has_gpu,
    load_source,
    make_multi_source,
    make_source,
    merge_candidates,
    recall_at,
    ease_weights,
    resolve_use_gpu,
    topk,
)
from adrec.config import CandidateConfig
from tests.support.candidate_contract import (  # noqa: F401  (blocks: the contract's fixture)
    COLD_BLOCK,
    N_BLOCKS,
    N_ITEMS,
    N_WARM,
    USERS_PER_BLOCK,
    CandidateSourceContract,
    block_items,
    block_of,
    blocks,
    make_blocks,
    make_embeddings,
)

HAS_CUDA = bool(implicit.gpu.HAS_CUDA)
NO_CUDA_REASON = "implicit was built without CUDA (implicit.gpu.HAS_CUDA is False)"


class TestALSSource(CandidateSourceContract):
    dense = True

    def make(self):
        return ALSSource(factors=8, iterations=10, regularization=0.05, alpha=2.0, seed=1, use_gpu=False)

    def test_factors_are_numpy_on_cpu(self, fitted):
        assert fitted.backend == "cpu"
        assert isinstance(fitted.item_factors, np.ndarray) and fitted.item_factors.dtype == np.float32
        assert fitted.user_factors.shape == (N_BLOCKS * USERS_PER_BLOCK, 8)

    def test_saved_gpu_model_loads_without_gpu(self, fitted, blocks, tmp_path):
        """A model saved with use_gpu=True holds plain numpy factors: it serves on a CPU box."""
        fitted.use_gpu = True
        fitted.save(tmp_path / "als")
        loaded = ALSSource.load(tmp_path / "als")
        assert loaded.use_gpu is True and loaded.backend == "cpu"
        users = np.arange(4)
        np.testing.assert_array_equal(loaded.recommend(users, 5, blocks[:4])[0], fitted.recommend(users, 5, blocks[:4])[0])
        loaded.recommend_for_items([np.array([1, 2])], 5)  # fold-in runs on the CPU


class TestBPRSource(CandidateSourceContract):
    dense = True

    def make(self):
        return BPRSource(factors=8, iterations=30, seed=1, use_gpu=False)


class TestPopularitySource(CandidateSourceContract):
    def make(self):
        return PopularitySource()

    def test_never_proposes_items_nobody_touched(self, fitted, blocks):
        ids, _ = fitted.recommend(np.arange(blocks.shape[0]), N_ITEMS, blocks)
        assert not (set(ids.ravel().tolist()) & set(COLD_BLOCK))


class TestItemItemCosine(CandidateSourceContract):
    def make(self):
        return ItemItemSource(kind="cosine", K=10)


class TestItemItemBM25(CandidateSourceContract):
    def make(self):
        return ItemItemSource(kind="bm25", K=10)

    def test_named_by_kind(self):
        assert self.make().name == "bm25" and ItemItemSource().name == "itemitem"


class TestTextNeighbourSource(CandidateSourceContract):
    def make(self):
        return TextNeighbourSource(make_embeddings())


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
class TestALSSourceGPU(CandidateSourceContract):
    dense = True

    def make(self):
        return ALSSource(factors=8, iterations=10, seed=1, use_gpu=True)

    def test_gpu_factors_come_back_as_numpy(self, fitted, blocks, tmp_path):
        assert fitted.backend == "gpu"
        assert isinstance(fitted.item_factors, np.ndarray) and isinstance(fitted.user_factors, np.ndarray)
        cpu = ALSSource(factors=8, iterations=10, seed=1, use_gpu=False).fit(blocks)
        users = np.arange(blocks.shape[0])
        gpu_top = fitted.recommend(users, 3, blocks)[0]
        cpu_top = cpu.recommend(users, 3, blocks)[0]
        # different solvers, same structure: both stay inside each user's block
        for u in users:
            assert {block_of(int(i)) for i in gpu_top[u]} == {u // USERS_PER_BLOCK}
            assert {block_of(int(i)) for i in cpu_top[u]} == {u // USERS_PER_BLOCK}


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
class TestBPRSourceGPU(CandidateSourceContract):
    dense = True

    def make(self):
        return BPRSource(factors=8, iterations=30, seed=1, use_gpu=True)

    @pytest.mark.skip(reason="BPR's GPU SGD is not reproducible run to run")
    def test_deterministic_for_the_seed(self, blocks):  # pragma: no cover
        pass


# ----------------------------------------------------------------------------- EASE
def ease_by_hand(x: np.ndarray, l2: float) -> np.ndarray:
    """Steck (2019), eq. 8: B = I - P diagMat(1 / diag(P)), P = (X^T X + l2 I)^-1, written out."""
    g = x.T @ x + l2 * np.eye(x.shape[1])
    p = np.linalg.inv(g)
    b = np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))
    return b


def tiny_matrix() -> np.ndarray:
    rng = np.random.default_rng(5)
    x = (rng.random((9, 7)) < 0.4).astype(np.float64)
    x[0, :3] = 1.0
    x[:, 6] = 0.0  # an item nobody touched
    return x


def test_ease_weights_match_the_closed_form():
    x = tiny_matrix()
    for l2 in (0.5, 3.0, 50.0):
        expected = ease_by_hand(x, l2)
        got = ease_weights(sp.csr_matrix(x), l2)
        assert got.dtype == np.float32 and got.shape == (7, 7)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert np.all(np.diag(got) == 0.0)
        # the constraint-free ridge solution would differ: B is the constrained minimiser, so
        # each column's off-diagonal part solves the ridge system of the other items
        j = 2
        others = [i for i in range(7) if i != j]
        xo = x[:, others]
        ridge = np.linalg.solve(xo.T @ xo + l2 * np.eye(6), xo.T @ x[:, j])
        np.testing.assert_allclose(got[others, j], ridge, atol=1e-5)


def test_ease_source_scores_are_history_times_b():
    x = tiny_matrix()
    src = EASESource(l2=2.0).fit(sp.csr_matrix(x))
    b = ease_by_hand(x, 2.0)
    scores = x @ b
    ids, sc = src.recommend(np.arange(9), 7, sp.csr_matrix(x))
    for u in range(9):
        allowed = [i for i in range(7) if x[u, i] == 0]
        # expected order: score descending, ties -> lower index
        # every allowed item, in the by-hand scores' order (to float32 rounding: near-ties may swap)
        got = [int(i) for i in ids[u] if i >= 0]
        assert sorted(got) == allowed
        assert (np.diff(scores[u, got]) <= 1e-5).all(), (got, scores[u, got])
        np.testing.assert_allclose(sc[u, : len(got)], scores[u, got], atol=1e-5)
    # fold-in of a new user's clicks is the same product
    clicks = np.array([1, 1, 1, 0, 0, 0, 0], float)
    np.testing.assert_allclose(src.fold_in([np.array([0, 1, 2])])[0], clicks @ b, atol=1e-5)


def test_ease_rejects_bad_l2():
    with pytest.raises(ValueError, match="l2"):
        EASESource(l2=0.0)


class TestEASESource(CandidateSourceContract):
    dense = True  # every non-excluded item gets a finite linear score

    def make(self):
        return EASESource(l2=5.0)

    def test_loads_as_a_candidate_source(self, fitted, tmp_path):
        fitted.save(tmp_path / "ease")
        loaded = load_source(tmp_path / "ease")
        assert isinstance(loaded, EASESource) and loaded.l2 == 5.0
        np.testing.assert_array_equal(loaded.weights, fitted.weights)


def _subclasses(cls: type) -> set[type]:
    return {c for s in cls.__subclasses__() for c in {s} | _subclasses(s)}


def test_every_candidate_source_class_passes_the_contract():
    """Each concrete CandidateSource has a test class here that inherits the contract."""
    contract_classes = [c for c in globals().values()
                        if isinstance(c, type) and issubclass(c, CandidateSourceContract) and c is not CandidateSourceContract]
    covered = {type(c().make()) for c in contract_classes}
    concrete = {c for c in _subclasses(CandidateSource) if not c.__name__.startswith("_") and c.__module__.startswith("adrec.")}
    assert concrete, "no source class found"
    assert concrete <= covered, f"sources without a contract test: {sorted(c.__name__ for c in concrete - covered)}"


# ----------------------------------------------------------------------------- backend flag
def test_backend_follows_the_capability_flag():
    assert has_gpu() == HAS_CUDA
    assert resolve_use_gpu(None) == HAS_CUDA
    assert resolve_use_gpu(False) is False


@pytest.mark.skipif(HAS_CUDA, reason="implicit has CUDA here: use_gpu=True is valid")
def test_use_gpu_true_without_cuda_is_a_clear_error(blocks):
    with pytest.raises(ValueError, match="HAS_CUDA"):
        ALSSource(use_gpu=True).fit(blocks)


def test_auto_backend_fits(blocks):
    src = make_source("als", factors=4, iterations=2)
    assert src.use_gpu is None
    src.fit(blocks)
    assert src.backend == ("gpu" if HAS_CUDA else "cpu")


# ----------------------------------------------------------------------------- ranking helper
def test_topk_matches_a_brute_force_sort():
    rng = np.random.default_rng(0)
    for _ in range(60):
        b, m, n = int(rng.integers(1, 4)), int(rng.integers(1, 2500)), int(rng.integers(0, 40))
        s = rng.integers(0, 4, (b, m)).astype(np.float32)  # many ties
        s[rng.random((b, m)) < rng.random()] = -np.inf
        ids, sc = topk(s, n)
        for r in range(b):
            want = sorted(np.flatnonzero(np.isfinite(s[r])).tolist(), key=lambda j: (-s[r, j], j))[:n]
            assert ids[r][: len(want)].tolist() == want
            assert (ids[r][len(want):] == -1).all() and (sc[r][len(want):] == PAD_SCORE).all()


# ----------------------------------------------------------------------------- merging
def test_merge_quota_dedupe_and_fill_exact():
    pad = -1
    per_source = {
        "als": (np.array([[10, 11, 12, 13, 14, pad], [pad] * 6, [1, pad, pad, pad, pad, pad]]), None),
        "itemitem": (np.array([[11, 20, 21, 22, pad, pad], [5, 6, pad, pad, pad, pad], [pad] * 6]), None),
        "popularity": (np.array([[10, 20, 30, 31, 32, 33], [5, 7, 8, 9, 1, 2], [pad] * 6]), None),
        "text": (np.array([[40, 41], [3, pad], [pad, pad]]), None),  # no quota: fill only
    }
    quotas = {"als": 0.5, "itemitem": 0.25, "popularity": 0.125}  # n=8 -> 4, 2, 1 quota slots
    merged = merge_candidates(per_source, quotas, 8)
    assert len(merged) == 3

    ids0, src0 = merged[0]
    assert ids0.tolist() == [10, 11, 12, 13, 20, 21, 30, 40]
    assert src0 == [
        ["als", "popularity"], ["als", "itemitem"], ["als"], ["als"],
        ["itemitem", "popularity"], ["itemitem"], ["popularity"], ["text"],
    ]

    # als has nothing; the fill pass goes rank by rank across sources in quota order
    ids1, src1 = merged[1]
    assert ids1.tolist() == [5, 6, 7, 3, 8, 9, 1, 2]
    assert src1 == [["itemitem", "popularity"], ["itemitem"], ["popularity"], ["text"],
                    ["popularity"], ["popularity"], ["popularity"], ["popularity"]]

    ids2, src2 = merged[2]  # fewer candidates than slots: a short list
    assert ids2.tolist() == [1] and src2 == [["als"]]
    assert ids0.dtype == np.int64


def test_merge_quota_order_decides_who_fills_first():
    per_source = {"a": (np.array([[1, 2, 3]]), None), "b": (np.array([[4, 5, 6]]), None)}
    assert merge_candidates(per_source, {"b": 0.5, "a": 0.5}, 4)[0][0].tolist() == [4, 5, 1, 2]
    assert merge_candidates(per_source, {"a": 0.5, "b": 0.5}, 4)[0][0].tolist() == [1, 2, 4, 5]
    # no quota at all: pure rank-order interleave
    assert merge_candidates(per_source, {}, 4)[0][0].tolist() == [1, 4, 2, 5]
    with pytest.raises(ValueError):
        merge_candidates(per_source, {"a": -0.1}, 4)


# ----------------------------------------------------------------------------- cold start
@pytest.mark.parametrize(
    "source",
    [
        lambda: ALSSource(factors=8, iterations=15, seed=0, use_gpu=False),
        lambda: ItemItemSource(kind="cosine", K=10),
        lambda: ItemItemSource(kind="bm25", K=10),
        lambda: TextNeighbourSource(make_embeddings()),
    ],
    ids=["als", "cosine", "bm25", "text"],
)
def test_fold_in_gives_a_new_user_items_related_to_their_clicks(source, blocks):
    src = source().fit(blocks)
    clicks = [np.array([8, 9, 10]), np.array([16, 20])]  # block 1, block 2
    ids, _ = src.recommend_for_items(clicks, 4)
    for row, clicked, b in zip(ids, clicks, (1, 2)):
        assert (row >= 0).all()
        assert {block_of(int(i)) for i in row} == {b}, f"{src.name}: {row} not all in block {b}"
        assert not set(row.tolist()) & set(clicked.tolist())


def test_als_fold_in_uses_implicit_least_squares(blocks):
    src = ALSSource(factors=8, iterations=15, seed=0, use_gpu=False).fit(blocks)
    uf = src.fold_in_factors([np.array([0, 1, 2])])
    assert uf.shape == (1, 8)
    np.testing.assert_allclose(src.fold_in([np.array([0, 1, 2])]), uf @ src.item_factors.T, rtol=1e-5, atol=1e-6)


def test_als_explain_splits_the_fold_in_score_over_the_liked_items(blocks):
    src = ALSSource(factors=8, iterations=15, seed=0, use_gpu=False, alpha=2.0).fit(blocks)
    liked = np.array([0, 1, 2, 5])
    row = sp.csr_matrix((np.ones(len(liked), np.float32), (np.zeros(len(liked), int), liked)), shape=(1, src.n_items))
    items = [3, 7]
    top, every = src.explain(row, items, n=2), src.explain(row, items, n=len(liked))
    scores = src.fold_in([liked])[0]
    for item, two, full in zip(items, top, every):
        assert {i for i, _, _ in full} == set(liked.tolist())  # only liked items explain
        # implicit's explanation is exact: the liked items' contributions add up to the least-squares score
        assert sum(c for _, c, _ in full) == pytest.approx(float(scores[item]), rel=1e-3, abs=1e-5)
        assert two == sorted(full, key=lambda x: -x[1])[:2]
        # shares: signed, each contribution over the sum of |contributions| (the raw ones are tiny here: the
        # demo printed them as 0.000)
        total = sum(abs(c) for _, c, _ in full)
        assert sum(abs(s) for _, _, s in full) == pytest.approx(1.0, abs=1e-6)
        for _, c, s in full:
            assert s == pytest.approx(c / total, rel=1e-6) and np.sign(s) == np.sign(c)
        assert f"{two[0][2]:.3f}" != "0.000"  # the top item's share reads as what it is


def test_text_source_recommends_cold_items(blocks):
    warm_only = make_blocks(n_cols=N_WARM)  # the training matrix does not even have the cold columns
    text = TextNeighbourSource(make_embeddings()).fit(warm_only)
    assert text.n_items == N_ITEMS
    users = np.arange(warm_only.shape[0])
    ids, _ = text.recommend(users, 8, warm_only)
    for u in users:
        b = u // USERS_PER_BLOCK
        cold_of_block = {i for i, cb in COLD_BLOCK.items() if cb == b}
        same_block = (block_items(b) | cold_of_block) - set(warm_only[u].indices.tolist())
        # the user's own block comes first, its never-touched items included
        assert set(ids[u][: len(same_block)].tolist()) == same_block, f"user {u} (block {b}): {ids[u]}"
        assert cold_of_block <= set(ids[u].tolist())
    # a brand-new user who clicked one block-0 item gets the block-0 cold items too
    new_ids, _ = text.recommend_for_items([np.array([3])], 10)
    assert {24, 25} <= set(new_ids[0].tolist())
    # the collaborative sources cannot propose them: that is why this source exists
    pop_ids, _ = PopularitySource().fit(warm_only).recommend(users, 10, warm_only)
    assert pop_ids.max() < N_WARM


def test_text_source_without_history_proposes_nothing():
    m = sp.csr_matrix((2, N_ITEMS), dtype=np.float32)
    ids, _ = TextNeighbourSource(make_embeddings()).fit(m).recommend(np.arange(2), 3)
    assert (ids == -1).all()


# ----------------------------------------------------------------------------- popularity
def test_popularity_by_context():
    # item 0 is the most popular overall; in context 1, item 3 is
    user_items = sp.csr_matrix(
        (np.ones(9, np.float32), ([0, 1, 2, 3, 0, 1, 0, 2, 3], [0, 0, 0, 0, 1, 1, 3, 3, 2])), shape=(4, 5)
    )
    src = PopularitySource(context_smoothing=1.0).fit(user_items)
    ctx = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    items = np.array([0, 0, 0, 0, 3, 3, 3, 3, 1])
    src.fit_context(ctx, items, n_contexts=3)
    ids, _ = src.recommend(np.arange(2), 3)
    assert ids[0].tolist() == [0, 1, 3]  # counts 4, 2, 2 (tie -> lower index)
    ids, _ = src.recommend(np.arange(2), 3, context=1)
    assert ids[0].tolist()[:2] == [3, 1]
    ids, _ = src.recommend(np.arange(2), 3, context=np.array([1, 2]))  # context 2 has no data
    assert ids[0].tolist()[0] == 3 and ids[1].tolist() == [0, 1, 3]
    ids, _ = src.recommend(np.arange(1), 3, context=99)  # unknown code -> global
    assert ids[0].tolist() == [0, 1, 3]
    assert src.recommend_for_items([np.array([3])], 2, context=1)[0][0].tolist() == [1, 0]
    with pytest.raises(ValueError):
        src.fit_context(np.array([0]), np.array([7]))


def test_popularity_context_survives_save_load(tmp_path):
    user_items = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1]], np.float32))
    src = PopularitySource(weighted=True).fit(user_items).fit_context(np.array([0, 1]), np.array([2, 1]))
    src.save(tmp_path / "p")
    loaded = PopularitySource.load(tmp_path / "p")
    for c in (None, 0, 1):
        np.testing.assert_array_equal(src.recommend(np.arange(2), 3, context=c)[0], loaded.recommend(np.arange(2), 3, context=c)[0])


# ----------------------------------------------------------------------------- multi-source + factory
def test_make_source_names():
    assert set(SOURCE_NAMES) == {"als", "bpr", "popularity", "itemitem", "bm25", "text", "ease"}
    assert isinstance(make_source("als", use_gpu=False), ALSSource)
    assert isinstance(make_source("bpr"), BPRSource)
    assert isinstance(make_source("popularity"), PopularitySource)
    assert make_source("itemitem", K=5).kind == "cosine"
    assert make_source("bm25").kind == "bm25"
    assert isinstance(make_source("text", item_embeddings=make_embeddings()), TextNeighbourSource)
    with pytest.raises(ValueError, match="unknown candidate source"):
        make_source("svd")
    with pytest.raises(ValueError, match="item_embeddings"):
        make_source("text")


def test_multi_source_from_config_round_trip(blocks, tmp_path):
    cfg = CandidateConfig(factors=8, iterations=10, itemitem_k=10, use_gpu=False)
    multi = make_multi_source(cfg, item_embeddings=make_embeddings()).fit(blocks)
    assert multi.names == list(cfg.quotas)
    users = np.arange(blocks.shape[0])
    ids, scores, sources = multi.recommend(users, 10, blocks)
    assert ids.shape == (len(users), 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert len(sources) == len(users)
    for u in users:
        k = int((ids[u] >= 0).sum())
        assert len(sources[u]) == k
        assert not set(ids[u][:k].tolist()) & set(blocks[u].indices.tolist())
        assert all(s and set(s) <= set(cfg.quotas) for s in sources[u])
        assert (np.diff(scores[u][:k]) < 0).all()
    multi.save(tmp_path / "cands")
    manifest = json.loads((tmp_path / "cands" / "manifest.json").read_text())
    assert [e["name"] for e in manifest["sources"]] == list(cfg.quotas)
    loaded = MultiSource.load(tmp_path / "cands")
    again = loaded.recommend(users, 10, blocks)
    np.testing.assert_array_equal(ids, again[0])
    np.testing.assert_array_equal(scores, again[1])
    assert sources == again[2]
    # a new user: every fold-in-capable source joins the merge
    new_ids, _, new_src = loaded.recommend_for_items([np.array([8, 9, 10])], 6)
    assert (new_ids[0] >= 0).all() and not {8, 9, 10} & set(new_ids[0].tolist())
    assert {block_of(int(i)) for i, s in zip(new_ids[0], new_src[0]) if "popularity" not in s} == {1}


def test_multi_source_without_embeddings_skips_text(blocks, caplog):
    with caplog.at_level(logging.WARNING, logger="adrec.candidates"):
        multi = make_multi_source(CandidateConfig(use_gpu=False, factors=4, iterations=2))
    assert "text" not in multi.sources and "text" in caplog.text
    with pytest.raises(Exception, match="unknown"):
        make_multi_source(CandidateConfig(quotas={"nope": 1.0}))


def test_loading_the_wrong_class_is_refused(blocks, tmp_path):
    PopularitySource().fit(blocks).save(tmp_path / "p")
    with pytest.raises(TypeError, match="PopularitySource"):
        ALSSource.load(tmp_path / "p")
    with pytest.raises(FileNotFoundError):
        load_source(tmp_path / "missing")


def test_fit_rejects_negative_weights():
    with pytest.raises(ValueError, match="negative"):
        PopularitySource().fit(sp.csr_matrix(np.array([[1.0, -1.0]], np.float32)))


# ----------------------------------------------------------------------------- recall
def test_recall_at_by_hand():
    ids = np.array([[1, 2, 3, -1], [5, 6, 7, 8], [9, 9, 9, 9]])
    truth = [{1, 3, 4}, {8}, set()]  # the third user has no test positive: not evaluated
    r = recall_at(ids, truth, ks=(1, 2, 4, 10))
    assert r["recall@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert r["recall@2"] == pytest.approx((1 / 3 + 0) / 2)
    assert r["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["recall@10"] == pytest.approx(r["recall@4"])
    assert np.isnan(recall_at(ids[2:], truth[2:], ks=(5,))["recall@5"])


# ----------------------------------------------------------------------------- MovieLens-100k
def test_als_beats_popularity_on_movielens_100k(ml100k_dir):
    data = np.loadtxt(ml100k_dir / "u.data", dtype=np.int64, delimiter="\t")
    data = data[data[:, 2] >= 4]  # positives: rating >= 4
    users, items = data[:, 0] - 1, data[:, 1] - 1
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    held = np.random.default_rng(0).random(len(users)) < 0.2  # random 20% of positives
    train = sp.csr_matrix(
        (np.ones(int((~held).sum()), np.float32), (users[~held], items[~held])), shape=(n_users, n_items)
    )
    test = [set() for _ in range(n_users)]
    for u, i in zip(users[held], items[held]):
        test[u].add(int(i))
    everyone = np.arange(n_users)
    cfg = CandidateConfig()
    als = make_source("als", factors=cfg.factors, iterations=cfg.iterations, regularization=cfg.regularization,
                      alpha=cfg.alpha, seed=cfg.seed, use_gpu=False).fit(train)
    pop = PopularitySource().fit(train)
    r_als = recall_at(als.recommend(everyone, 100, train)[0], test, ks=(100,))["recall@100"]
    r_pop = recall_at(pop.recommend(everyone, 100, train)[0], test, ks=(100,))["recall@100"]
    assert r_als > r_pop + 0.05, f"ALS recall@100 {r_als:.3f} vs popularity {r_pop:.3f}"
