"""Split protocol, encoding, crosses and history, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from adrec.config import FeatureConfig, build_config, load_config

from adrec.errors import ConfigError
from adrec.features.pipeline import history_lists
from adrec.features.spec import FeatureSpec, build_buckets, build_vocab, hash_pair, multi_width
from adrec.features.split import TEST, TRAIN, VALID, temporal_split


def _reference_split(users, ts, items):
    """Loop-by-loop reading of the protocol in docs/design.md."""
    out = {}
    df = pd.DataFrame({"u": users, "t": ts, "i": items, "row": range(len(users))})
    for _, g in df.groupby("u"):
        g = g.sort_values(["t", "i"])
        n = len(g)
        n_test = (n + 4) // 5 if n >= 5 else 0
        train_full = list(g["row"])[: n - n_test]
        m = len(train_full)
        n_valid = (m + 4) // 5 if m >= 5 else 0
        for r in list(g["row"])[n - n_test:]:
            out[r] = TEST
        for j, r in enumerate(train_full):
            out[r] = VALID if j >= m - n_valid else TRAIN
    return [out[r] for r in range(len(users))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.integers(0, 200, n)
    ts = rng.integers(0, 50, n)  # many ties on timestamp: item index breaks them
    items = rng.integers(0, 300, n)
    assert temporal_split(users, ts, items).tolist() == _reference_split(users, ts, items)


def test_split_small_users_stay_in_train():
    users = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    ts = np.array([1, 2, 3, 4, 1, 2, 3, 4, 5])
    items = np.arange(9)
    s = temporal_split(users, ts, items)
    assert list(s[:4]) == [TRAIN] * 4
    assert list(s[4:]) == [TRAIN, TRAIN, TRAIN, TRAIN, TEST]


def test_hash_pair_is_deterministic_bounded_and_spreads():
    a = np.repeat(np.arange(1, 51), 50)
    b = np.tile(np.arange(1, 51), 50)
    h = hash_pair(a, b, 1024, 1)
    assert (h == hash_pair(a, b, 1024, 1)).all()
    assert h.min() >= 1 and h.max() < 1024
    assert len(np.unique(h)) > 0.8 * 1023  # 2500 pairs fill most of 1023 buckets
    assert (hash_pair(np.array([0, 3]), np.array([5, 0]), 64, 1) == 0).all()
    assert not (hash_pair(a, b, 1024, 2) == h).all()  # salts separate crosses


def test_vocab_and_buckets():
    assert build_vocab(pd.Series(["b", "a", "b", ""])) == {"a": 1, "b": 2}
    assert build_vocab(pd.Series(["a|b", "b"]), sep="|") == {"a": 1, "b": 2}
    assert build_vocab(pd.Series(["a", "b", "b"]), min_count=2) == {"b": 1}
    edges = build_buckets(pd.Series(np.arange(100)), 4)
    assert len(edges) == 3
    spec = FeatureSpec(buckets={"user.age": edges}, history_len=FeatureConfig().history_len)
    codes = spec.encode_numeric("user.age", pd.Series([0, 30, 60, 99, np.nan]))
    assert codes.tolist() == [1, 2, 3, 4, 0]


def test_encode_rows_same_for_training_and_serving():
    spec = FeatureSpec(vocabs={"ctx.hour": {"1": 1, "2": 2}, "item.cat": {"x": 1, "y": 2}, "user.g": {"f": 1}},
                       crosses=[{"name": "x:ctx.hour*item.cat", "a": "ctx.hour", "b": "item.cat", "hash_size": 64}],
                       n_users=2, n_items=3, context=["ctx.hour"], history_len=FeatureConfig().history_len)
    users = pd.DataFrame({"user.g": ["f", "m"]})
    items = pd.DataFrame({"item.cat": ["x", "y", "x"]})
    ucodes, icodes = spec.encode_entity("user", users), spec.encode_entity("item", items)
    batch = pd.DataFrame({"user_idx": [0, 0, 1, -1], "item_idx": [0, 1, 2, 1], "ctx.hour": ["1", "2", "3", "1"]})
    full = spec.encode_rows(batch, ucodes, icodes)
    one_by_one = pd.concat([spec.encode_rows(batch.iloc[[i]], ucodes, icodes) for i in range(len(batch))])
    pd.testing.assert_frame_equal(full, one_by_one)
    assert full["f:user"].tolist() == [1, 1, 2, 0]
    assert full["f:ctx.hour"].tolist() == [1, 2, 0, 1]  # unseen context -> 0
    assert full["f:user.g"].tolist() == [1, 1, 0, 0]
    assert full["f:x:ctx.hour*item.cat"].iloc[2] == 0  # unknown hour crosses to 0


def test_history_never_uses_test_labels():
    # One user: 10 interactions, all positive; split: 6 train, 2 valid, 2 test.
    u = np.zeros(10, dtype=np.int64)
    items = np.arange(10)
    ts = np.arange(10)
    label = np.ones(10, dtype=np.int8)
    split = temporal_split(u, ts, items)
    assert split.tolist() == [TRAIN] * 6 + [VALID] * 2 + [TEST] * 2
    hist = history_lists(u, items, ts, label, split, length=3)
    assert hist[0].tolist() == [] and hist[3].tolist() == [0, 1, 2]
    assert hist[6].tolist() == [3, 4, 5] and hist[7].tolist() == [3, 4, 5]  # valid: train only
    assert hist[8].tolist() == [5, 6, 7] and hist[9].tolist() == [5, 6, 7]  # test: train+valid, no test


def _reference_history(user_idx, item_idx, ts, label, split, length):
    """The per-row loop the vectorized history replaced (a deque per user)."""
    from collections import deque

    out = [np.empty(0, dtype=np.int64)] * len(user_idx)
    cur, train_hist, full_hist = None, deque(maxlen=length), deque(maxlen=length)
    for r in np.lexsort((item_idx, ts, user_idx)):
        if user_idx[r] != cur:
            cur = user_idx[r]
            train_hist.clear()
            full_hist.clear()
        out[r] = np.array(train_hist if split[r] != TEST else full_hist, dtype=np.int64)
        if label[r] and split[r] != TEST:
            full_hist.append(item_idx[r])
            if split[r] == TRAIN:
                train_hist.append(item_idx[r])
    return out


@pytest.mark.parametrize("length", [0, 1, 3, 50])
def test_vectorized_history_equals_the_per_row_loop(length):
    rng = np.random.default_rng(length)
    n = 3000
    u = rng.integers(0, 80, n)
    items = rng.integers(0, 40, n)
    ts = rng.integers(0, 30, n)  # many ties in time: the order falls back to the item, then the row
    label = (rng.random(n) < 0.4).astype(np.int8)
    split = temporal_split(u, ts, items)
    got = history_lists(u, items, ts, label, split, length)
    want = _reference_history(u, items, ts, label, split, length)
    assert len(got) == n
    assert all(g.dtype == np.int64 and g.tolist() == w.tolist() for g, w in zip(got, want))


def test_config_rejects_unknown_keys_by_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'ranker.lerning_rate'"):
        build_config({"ranker": {"lerning_rate": 1.0}})
    with pytest.raises(ConfigError, match="ranker.epochs"):
        build_config(overrides=["ranker.epochs=0"])
    p = tmp_path / "c.yaml"
    p.write_text("ranker:\n  epochs: 2\n")
    assert load_config(p, ["ranker.lr=0.01"]).ranker.lr == 0.01
    assert load_config(p).ranker.epochs == 2


def test_history_len_has_one_default_the_configs():
    """A FeatureSpec takes history_len from whoever builds it (prepare passes the config's)."""
    with pytest.raises(TypeError, match="history_len"):
        FeatureSpec()
    assert build_config().features.history_len == FeatureConfig().history_len == 50


def test_every_encoder_takes_missing_values_as_code_zero():
    # A side row the table lacks arrives as NaN (pandas 3 str dtype) or None (object): never a crash,
    # never a value of its own ("nan", "None").
    spec = FeatureSpec(vocabs={"item.cat": {"a": 1, "b": 2}}, buckets={"item.price": [1.0, 2.0]},
                       multi_vocabs={"item.tags": {"x": 1, "y": 2}}, multi_max_len={"item.tags": 2}, history_len=0)
    for missing in (np.nan, None):
        cat = pd.Series(["b", missing, ""], dtype=str if missing is np.nan else object)
        assert spec.encode_categorical("item.cat", cat).tolist() == [2, 0, 0]
        tags = pd.Series(["y|x", missing, ""], dtype=str if missing is np.nan else object)
        assert spec.encode_multi("item.tags", tags).tolist() == [[2, 1], [0, 0], [0, 0]]
        price = pd.Series([1.5, missing, ""], dtype=object)
        assert spec.encode_numeric("item.price", price).tolist() == [2, 0, 0]
    assert build_vocab(pd.Series(["a", None, np.nan, "", "None"], dtype=object)) == {"None": 1, "a": 2}
    assert build_vocab(pd.Series(["x|y", np.nan, ""], dtype=str), sep="|") == {"x": 1, "y": 2}
    assert multi_width(pd.Series([np.nan, ""], dtype=str)) == 1
    assert multi_width(pd.Series(["a|b|c", np.nan], dtype=str)) == 3


def test_entity_frame_gives_missing_side_rows_empty_features():
    from adrec.features.pipeline import _entity_frame

    spec = FeatureSpec(vocabs={"item.cat": {"a": 1}}, buckets={"item.price": [1.0]},
                       multi_vocabs={"item.tags": {"x": 1}}, multi_max_len={"item.tags": 2}, history_len=0)
    table = pd.DataFrame({"item": ["i1"], "text": ["shoes"], "item.cat": ["a"], "item.tags": ["x"],
                          "item.price": [2.0]})
    frame = _entity_frame("item", ["i1", "i2"], table, "item", spec)
    assert frame["text"].tolist() == ["shoes", ""]
    assert frame["c:item.cat"].tolist() == [1, 0] and frame["c:item.price"].tolist() == [2, 0]
    assert [list(x) for x in frame["c:item.tags"]] == [[1, 0], [0, 0]]
    assert frame["item.cat"].tolist() == ["a", ""] and np.isnan(frame["item.price"].iloc[1])
