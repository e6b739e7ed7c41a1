"""The contract every candidate source passes, and the small world it is checked on.

A test class per source inherits :class:`CandidateSourceContract` and implements ``make``; its module
imports the ``blocks`` fixture with it (``from tests.support.candidate_contract import
CandidateSourceContract, blocks``). The world: three blocks of users, each interacting only with the items
of its block, plus cold items that only have text (embeddings pointing at their block).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from adrec.candidates import PAD_SCORE, CandidateSource, load_source

N_BLOCKS, USERS_PER_BLOCK, ITEMS_PER_BLOCK, N_COLD = 3, 12, 8, 4
N_WARM = N_BLOCKS * ITEMS_PER_BLOCK  # items 0..23 have interactions
N_ITEMS = N_WARM + N_COLD  # items 24..27 exist (have text) but nobody touched them
COLD_BLOCK = {24: 0, 25: 0, 26: 1, 27: 2}


def block_of(item: int) -> int:
    return COLD_BLOCK[item] if item >= N_WARM else item // ITEMS_PER_BLOCK


def block_items(b: int) -> set[int]:
    return set(range(b * ITEMS_PER_BLOCK, (b + 1) * ITEMS_PER_BLOCK))


def make_blocks(n_cols: int = N_ITEMS, seed: int = 7) -> sp.csr_matrix:
    """Users of block b interact only with items of block b (about 5 of its 8), weights 1..3."""
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for b in range(N_BLOCKS):
        for u in range(b * USERS_PER_BLOCK, (b + 1) * USERS_PER_BLOCK):
            items = rng.choice(sorted(block_items(b)), size=int(rng.integers(4, 7)), replace=False)
            rows += [u] * len(items)
            cols += items.tolist()
            vals += rng.integers(1, 4, len(items)).tolist()
    return sp.csr_matrix(
        (np.asarray(vals, np.float32), (rows, cols)), shape=(N_BLOCKS * USERS_PER_BLOCK, n_cols), dtype=np.float32
    )


def make_embeddings(seed: int = 3) -> np.ndarray:
    """One direction per block plus a little noise; cold items point at their block too."""
    rng = np.random.default_rng(seed)
    d = 6
    emb = np.zeros((N_ITEMS, d), np.float32)
    for j in range(N_ITEMS):
        emb[j, block_of(j)] = 1.0
    emb += 0.1 * rng.standard_normal(emb.shape).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def blocks() -> sp.csr_matrix:
    return make_blocks()


def assert_ranked_lists(ids: np.ndarray, scores: np.ndarray) -> None:
    """Valid ids form a prefix, scores descend, ties go to the lower item index, padding is -1/PAD."""
    for row_ids, row_sc in zip(ids, scores):
        valid = row_ids >= 0
        k = int(valid.sum())
        assert valid[:k].all(), f"padding before a real item: {row_ids}"
        assert (row_sc[k:] == PAD_SCORE).all()
        assert len(set(row_ids[:k].tolist())) == k, "an item was returned twice"
        s, i = row_sc[:k], row_ids[:k]
        assert (np.diff(s) <= 0).all(), f"scores not descending: {s}"
        same = np.diff(s) == 0
        assert (np.diff(i)[same] > 0).all(), "tie not broken toward the lower item index"


# ----------------------------------------------------------------------------- the contract
class CandidateSourceContract:
    """Every candidate source's test class inherits this and implements :meth:`make`."""

    #: every non-excluded item is always returnable (factor models); else only proposed ones
    dense = False
    n = 5

    def make(self) -> CandidateSource:
        raise NotImplementedError

    @pytest.fixture
    def fitted(self, blocks):
        return self.make().fit(blocks)

    def test_shape_and_dtypes(self, fitted, blocks):
        users = np.arange(blocks.shape[0])
        ids, scores = fitted.recommend(users, self.n, blocks)
        assert ids.shape == (blocks.shape[0], self.n) and ids.dtype == np.int64
        assert scores.shape == ids.shape and scores.dtype == np.float32
        assert ((ids >= -1) & (ids < fitted.n_items)).all()
        assert_ranked_lists(ids, scores)
        # a subset of users, in any order, gets those users' rows: the same items and, to float32
        # rounding, the same scores (BLAS may sum a smaller batch in another order on another CPU)
        sub = np.array([5, 0, 17])
        ids_sub, scores_sub = fitted.recommend(sub, self.n, blocks[sub])
        np.testing.assert_array_equal(ids_sub, ids[sub])
        np.testing.assert_allclose(scores_sub, scores[sub], rtol=1e-5, atol=1e-6)

    def test_never_returns_excluded(self, fitted, blocks):
        users = np.arange(blocks.shape[0])
        rng = np.random.default_rng(0)
        extra = sp.random(len(users), blocks.shape[1], density=0.3, random_state=rng, format="csr", dtype=np.float32)
        extra.data[:] = 1.0
        exclude = (blocks + extra).tocsr()
        ids, _ = fitted.recommend(users, N_ITEMS, exclude)
        for u in users:
            banned = set(exclude[u].indices.tolist())
            got = set(ids[u][ids[u] >= 0].tolist())
            assert not (got & banned), f"user {u} got excluded items {got & banned}"

    def test_pads_with_minus_one_when_too_few_items(self, fitted, blocks):
        users = np.arange(blocks.shape[0])
        n = fitted.n_items + 3
        ids, scores = fitted.recommend(users, n, blocks)
        assert ids.shape == (len(users), n)
        assert_ranked_lists(ids, scores)
        for u in users:
            available = fitted.n_items - blocks[u].nnz
            k = int((ids[u] >= 0).sum())
            assert k <= available
            assert (ids[u][available:] == -1).all()
            if self.dense:
                assert k == available

    def test_zero_n_and_empty_users(self, fitted, blocks):
        ids, scores = fitted.recommend(np.arange(3), 0, blocks[:3])
        assert ids.shape == (3, 0) and scores.shape == (3, 0)
        ids, scores = fitted.recommend(np.array([], dtype=np.int64), 4, blocks[:0])
        assert ids.shape == (0, 4)

    def test_deterministic_for_the_seed(self, blocks):
        users = np.arange(blocks.shape[0])
        a = self.make().fit(blocks).recommend(users, self.n, blocks)
        b = self.make().fit(blocks).recommend(users, self.n, blocks)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])

    def test_save_load_round_trip(self, fitted, blocks, tmp_path):
        users = np.arange(blocks.shape[0])
        before = fitted.recommend(users, self.n, blocks)
        fitted.save(tmp_path / "src")
        meta = json.loads((tmp_path / "src" / "source.json").read_text())
        assert meta["class"] == type(fitted).__name__ and meta["name"] == fitted.name
        for loaded in (type(fitted).load(tmp_path / "src"), load_source(tmp_path / "src")):
            assert type(loaded) is type(fitted) and loaded.name == fitted.name
            after = loaded.recommend(users, self.n, blocks)
            np.testing.assert_array_equal(before[0], after[0])
            np.testing.assert_array_equal(before[1], after[1])
            if fitted.supports_fold_in:
                lists = [np.array([0, 1]), np.array([9])]
                np.testing.assert_array_equal(fitted.fold_in(lists), loaded.fold_in(lists))

    def test_fold_in_new_users(self, fitted):
        lists = [np.array([8, 9, 10]), np.array([], dtype=np.int64), np.array([17, 1000])]  # 1000: unknown id
        if not fitted.supports_fold_in:
            with pytest.raises(NotImplementedError):
                fitted.fold_in(lists)
            return
        scores = fitted.fold_in(lists)
        assert scores.shape == (3, fitted.n_items) and scores.dtype == np.float32
        ids, sc = fitted.recommend_for_items(lists, self.n)
        assert ids.shape == (3, self.n)
        assert_ranked_lists(ids, sc)
        for row, clicked in zip(ids, lists):
            assert not (set(row.tolist()) & set(clicked.tolist())), "a clicked item was proposed back"

    def test_rejects_unknown_users_and_bad_exclude(self, fitted, blocks):
        with pytest.raises(IndexError, match="fold_in"):
            fitted.recommend(np.array([blocks.shape[0]]), 3)
        with pytest.raises(ValueError, match="rows"):
            fitted.recommend(np.arange(3), 3, blocks[:2])

    def test_unfitted_raises(self):
        with pytest.raises(RuntimeError, match="not fitted"):
            self.make().recommend(np.arange(2), 3)
