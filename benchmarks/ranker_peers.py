"""Peer click models for the ranker benchmark (issue 3), all on the same features and split.

Every peer follows the same protocol as adrec's ranker: fit on ``train``, choose its
hyperparameters / number of iterations on ``valid`` (AUC), then, when ``refit`` is on, fit again on
``train + valid`` with that choice and predict ``test``. Inputs are the prepare stage's ``f:``
code columns (ids, categoricals, numeric buckets and the spec's hashed pairwise crosses ``x:*``).

- ``constant``: the training click rate.
- ``logreg``: logistic regression on one-hot ids and categoricals (no crosses).
- ``logreg+crosses``: the same plus the hashed pairwise crosses.
- ``lightgbm``: LightGBM with every field as a categorical feature.
- ``deepfm``: DeepFM from deepctr-torch over every field (when the package is installed).
- ``frozen-text+logreg``: one-hot fields and crosses plus the frozen encoder's item text embedding
  and its product with the mean text embedding of the user's history (a linear model's way to see text).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.metrics import auc

log = logging.getLogger(__name__)

PEERS = ("constant", "logreg", "logreg+crosses", "lightgbm", "deepfm", "frozen-text+logreg")


@dataclass
class PeerResult:
    name: str
    test_pred: np.ndarray | None
    valid_auc: float = float("nan")
    choice: dict = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None  # why the peer did not run


@dataclass
class BenchData:
    """The three splits of one prepared data set (``Features`` rows) and its spec/items/users."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    spec: object
    items: pd.DataFrame
    users: pd.DataFrame

    @classmethod
    def from_features(cls, features) -> "BenchData":
        inter = features.interactions
        return cls(*(inter[inter["split"] == s].reset_index(drop=True) for s in ("train", "valid", "test")),
                   spec=features.spec, items=features.items, users=features.users)

    def fields(self, crosses: bool = True) -> list[str]:
        return [f for f in self.spec.fields if crosses or not f.startswith("x:")]

    def codes(self, rows: pd.DataFrame, fields: list[str]) -> np.ndarray:
        return np.stack([rows[f"f:{f}"].to_numpy(dtype=np.int64) for f in fields], axis=1)


def _labels(rows: pd.DataFrame) -> np.ndarray:
    return rows["label"].to_numpy().astype(np.int64)


def _one_hot(codes: np.ndarray, cards: list[int]) -> sp.csr_matrix:
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
    n, f = codes.shape
    cols = (np.clip(codes, 0, np.asarray(cards) - 1) + offsets).reshape(-1)
    rows = np.repeat(np.arange(n), f)
    return sp.csr_matrix((np.ones(n * f, dtype=np.float32), (rows, cols)), shape=(n, int(sum(cards))))


# ---- constant -----------------------------------------------------------------------------------
def constant_ctr(data: BenchData, seed: int, refit: bool = True, quick: bool = False) -> PeerResult:
    t0 = time.perf_counter()
    fit = pd.concat([data.train, data.valid]) if refit else data.train
    ctr = float(_labels(fit).mean())
    return PeerResult("constant", np.full(len(data.test), ctr), 0.5, {"ctr": ctr}, time.perf_counter() - t0)


# ---- logistic regression ------------------------------------------------------------------------------
def _logreg(name: str, data: BenchData, seed: int, refit: bool, quick: bool, features) -> PeerResult:
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    x_tr, x_va, x_te = features(data.train), features(data.valid), features(data.test)
    y_tr, y_va = _labels(data.train), _labels(data.valid)
    grid = [0.1, 1.0] if quick else [0.03, 0.1, 0.3, 1.0, 3.0]
    best = (-1.0, None)
    for c in grid:
        m = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        m.fit(x_tr, y_tr)
        a = auc(y_va, m.decision_function(x_va))
        if a > best[0]:
            best = (a, c, m)
    valid_auc, c, model = best
    if refit:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        model.fit(sp.vstack([x_tr, x_va]) if sp.issparse(x_tr) else np.vstack([x_tr, x_va]), np.r_[y_tr, y_va])
    pred = model.predict_proba(x_te)[:, 1]
    return PeerResult(name, pred, valid_auc, {"C": c}, time.perf_counter() - t0)


def logreg(data: BenchData, seed: int, refit: bool = True, quick: bool = False, crosses: bool = False) -> PeerResult:
    fields = data.fields(crosses)
    cards = [data.spec.cardinality(f) for f in fields]
    return _logreg("logreg+crosses" if crosses else "logreg", data, seed, refit, quick,
                   lambda rows: _one_hot(data.codes(rows, fields), cards))


def frozen_text_logreg(data: BenchData, seed: int, refit: bool = True, quick: bool = False,
                       encoder_cfg=None) -> PeerResult:
    """One-hot fields (with crosses) + frozen item text embedding + (history mean x item) text product."""
    from adrec.config import RankerConfig
    from adrec.features.text import embed_texts

    from adrec.ranking.data import hist_codes

    t0 = time.perf_counter()
    cfg = encoder_cfg or RankerConfig()
    items = data.items.sort_values("item_idx")
    emb = embed_texts(cfg, items["text"].fillna("").astype(str).tolist())
    emb = np.vstack([np.zeros((1, emb.shape[1]), np.float32), emb])  # row 0: unknown item
    fields = data.fields(True)
    cards = [data.spec.cardinality(f) for f in fields]
    n_items = len(items)

    def features(rows: pd.DataFrame):
        item = np.where(rows["item_idx"].to_numpy() >= 0, rows["item_idx"].to_numpy() + 1, 0)
        h = hist_codes(rows["hist"].to_numpy(), max(1, data.spec.history_len), n_items)
        m = (h > 0)[..., None]
        hist_mean = (emb[h] * m).sum(1) / np.maximum(m.sum(1), 1)
        dense = np.hstack([emb[item], hist_mean * emb[item]]).astype(np.float32)
        return sp.hstack([_one_hot(data.codes(rows, fields), cards), sp.csr_matrix(dense)]).tocsr()

    out = _logreg("frozen-text+logreg", data, seed, refit, quick, features)
    out.seconds = time.perf_counter() - t0
    return out


# ---- LightGBM -------------------------------------------------------------------------------------------
def lightgbm(data: BenchData, seed: int, refit: bool = True, quick: bool = False, threads: int = 2) -> PeerResult:
    if importlib.util.find_spec("lightgbm") is None:
        return PeerResult("lightgbm", None, skipped="lightgbm is not installed (pip install lightgbm)")
    import lightgbm as lgb

    t0 = time.perf_counter()
    fields = data.fields(True)
    x_tr, x_va, x_te = (data.codes(r, fields) for r in (data.train, data.valid, data.test))
    y_tr, y_va = _labels(data.train), _labels(data.valid)
    cat = list(range(len(fields)))
    base = dict(objective="binary", learning_rate=0.05, min_data_in_leaf=20, feature_fraction=0.8,
                bagging_fraction=0.8, bagging_freq=1, max_cat_to_onehot=4, verbose=-1, num_threads=threads,
                seed=seed, deterministic=True, force_row_wise=True)
    # LightGBM's own categorical defaults, and a lighter smoothing that suits many-valued id fields.
    grid = [dict(num_leaves=31, cat_l2=10.0, cat_smooth=10.0, min_data_per_group=100, max_cat_threshold=32),
            dict(num_leaves=31, cat_l2=1.0, cat_smooth=1.0, min_data_per_group=5, max_cat_threshold=256)]
    if quick:
        grid = grid[1:]
    dtr = lgb.Dataset(x_tr, y_tr, categorical_feature=cat, free_raw_data=False)
    dva = lgb.Dataset(x_va, y_va, categorical_feature=cat, reference=dtr)
    best = (-1.0, None, 0, None)
    for extra in grid:
        params = base | extra
        model = lgb.train(params, dtr, 300 if quick else 3000, valid_sets=[dva],
                          callbacks=[lgb.early_stopping(50, verbose=False)])
        rounds = max(1, model.best_iteration or model.current_iteration())
        a = auc(y_va, model.predict(x_va, num_iteration=rounds))
        if a > best[0]:
            best = (a, params, rounds, model)
    valid_auc, params, rounds, model = best
    if refit:
        dall = lgb.Dataset(np.vstack([x_tr, x_va]), np.r_[y_tr, y_va], categorical_feature=cat)
        model = lgb.train(params, dall, rounds)
        pred = model.predict(x_te)
    else:
        pred = model.predict(x_te, num_iteration=rounds)
    choice = {"rounds": rounds, **{k: params[k] for k in ("num_leaves", "cat_smooth", "min_data_per_group")}}
    return PeerResult("lightgbm", pred, valid_auc, choice, time.perf_counter() - t0)


# ---- DeepFM (deepctr-torch) --------------------------------------------------------------------------------
def deepfm_available() -> str | None:
    """None when deepctr-torch can run here, else why not."""
    if importlib.util.find_spec("deepctr_torch") is None:
        return "deepctr-torch is not installed (pip install deepctr-torch; it installs beside torch 2.13)"
    return None


def deepfm(data: BenchData, seed: int, refit: bool = True, quick: bool = False, threads: int = 2,
           embedding_dim: int = 16, max_epochs: int = 10, patience: int = 2) -> PeerResult:
    why = deepfm_available()
    if why:
        return PeerResult("deepfm", None, skipped=why)
    import torch
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    fields = data.fields(True)
    names = [f"f{i}" for i in range(len(fields))]
    feats = [SparseFeat(n, vocabulary_size=data.spec.cardinality(f), embedding_dim=embedding_dim)
             for n, f in zip(names, fields)]

    def x(rows):
        codes = data.codes(rows, fields)
        return {n: codes[:, i] for i, n in enumerate(names)}

    def build():
        torch.manual_seed(seed)
        np.random.seed(seed)
        m = DeepFM(feats, feats, task="binary", dnn_hidden_units=(256, 128), dnn_dropout=0.1,
                   l2_reg_embedding=1e-5, seed=seed, device="cpu")
        m.compile("adam", "binary_crossentropy")
        return m

    x_tr, x_va, x_te = x(data.train), x(data.valid), x(data.test)
    y_tr, y_va = _labels(data.train).astype(np.float32), _labels(data.valid)
    model = build()
    epochs = 2 if quick else max_epochs
    best = (-1.0, 0, None)
    for ep in range(1, epochs + 1):
        model.fit(x_tr, y_tr, batch_size=512, epochs=1, verbose=0, shuffle=True)
        pv = model.predict(x_va, batch_size=8192).reshape(-1)
        a = auc(y_va, pv)
        if a > best[0]:
            best = (a, ep, model.predict(x_te, batch_size=8192).reshape(-1))
        elif ep - best[1] >= patience:
            break
    valid_auc, n_epochs, pred = best
    if refit:
        model = build()
        x_all = {n: np.r_[x_tr[n], x_va[n]] for n in names}
        y_all = np.r_[y_tr, y_va.astype(np.float32)]
        model.fit(x_all, y_all, batch_size=512, epochs=n_epochs, verbose=0, shuffle=True)
        pred = model.predict(x_te, batch_size=8192).reshape(-1)
    return PeerResult("deepfm", np.asarray(pred, dtype=np.float64), valid_auc,
                      {"epochs": n_epochs, "embedding_dim": embedding_dim}, time.perf_counter() - t0)


RUNNERS = {
    "constant": constant_ctr,
    "logreg": lambda d, s, refit=True, quick=False: logreg(d, s, refit, quick, crosses=False),
    "logreg+crosses": lambda d, s, refit=True, quick=False: logreg(d, s, refit, quick, crosses=True),
    "lightgbm": lightgbm,
    "deepfm": deepfm,
    "frozen-text+logreg": frozen_text_logreg,
}


def run_peer(name: str, data: BenchData, seed: int, refit: bool = True, quick: bool = False) -> PeerResult:
    if name not in RUNNERS:
        raise ValueError(f"unknown peer '{name}' (known: {', '.join(RUNNERS)})")
    log.info("peer %s (seed %d)", name, seed)
    return RUNNERS[name](data, seed, refit=refit, quick=quick)
