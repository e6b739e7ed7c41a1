"""The one small interface every candidate source implements.

A source is fitted on a user x item matrix of positive interaction weights and then
proposes, for a batch of known users, the ``n`` best items it has, never an item in the
users' ``exclude`` rows, ties broken toward the lower item index, short lists padded
with id ``-1`` (score :data:`PAD_SCORE`). ``fold_in`` scores users that were not in
the training matrix from the few items they clicked (the cold-user path).

Subclasses implement :meth:`CandidateSource.fit`, :meth:`CandidateSource._score_users`
(a dense score block for a batch of users, ``-inf`` meaning "not proposed") and the
``_get_state`` / ``_set_state`` pair that :meth:`save` / :meth:`load` use; ranking,
exclusion, padding, batching and persistence live here once.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from adrec.errors import UnsafeFileError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

logger = logging.getLogger(__name__)

#: Score written next to a ``-1`` padding id (the same convention as implicit's batch calls).
PAD_SCORE = np.float32(-np.finfo(np.float32).max)

FORMAT = "adrec.candidates.source"
FORMAT_VERSION = 1
STATE_JSON = "source.json"
STATE_NPZ = "arrays.npz"

# Dense score blocks are at most about this many cells (16 MiB of float32 scores; ranking
# one block peaks near 5x that with the negated copy and argpartition's int64 indices).
_BLOCK_CELLS = 4 * 1024 * 1024

_REGISTRY: dict[str, type[CandidateSource]] = {}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_name(name: str) -> str:
    """Source names double as folder names in a saved :class:`MultiSource`."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"source name {name!r} must be non-empty and use only letters, digits, '_', '-', '.'")
    return name


# --------------------------------------------------------------------------- matrices
def as_user_items(user_items: Any, what: str = "user_items") -> sp.csr_matrix:
    """Validate a training matrix: 2-D sparse, finite, positive weights; returns float32 CSR."""
    if not sp.issparse(user_items):
        raise TypeError(f"{what} must be a scipy.sparse matrix (users x items), got {type(user_items).__name__}")
    m = sp.csr_matrix(user_items, dtype=np.float32, copy=True)
    m.sum_duplicates()
    m.eliminate_zeros()
    if m.nnz and not np.isfinite(m.data).all():
        raise ValueError(f"{what} holds non-finite weights")
    if m.nnz and (m.data < 0).any():
        bad = int((m.data < 0).sum())
        raise ValueError(f"{what} holds {bad} negative weights; candidate sources need positive interaction weights")
    m.sort_indices()
    return m


def _fit_columns(m: sp.csr_matrix, n_items: int) -> sp.csr_matrix:
    """Drop columns >= n_items or pad with empty columns so that ``m`` has n_items columns."""
    if m.shape[1] == n_items:
        return m
    if m.shape[1] > n_items:
        return m[:, :n_items].tocsr()
    out = m.copy()
    out.resize((m.shape[0], n_items))
    return out


def lists_to_csr(item_lists: Sequence[np.ndarray], n_items: int, weights: Sequence[np.ndarray] | None = None) -> sp.csr_matrix:
    """One CSR row per list of item ids (weight 1 unless ``weights`` is given).

    Ids outside ``[0, n_items)`` are items this model does not know (e.g. ads added after
    fitting); they cannot inform the model and are left out (logged at debug level).
    Duplicate ids in one list are summed.
    """
    rows, cols, vals = [], [], []
    for r, items in enumerate(item_lists):
        ids = np.asarray(items, dtype=np.int64).ravel()
        w = np.ones(len(ids), np.float32) if weights is None else np.asarray(weights[r], np.float32).ravel()
        if len(w) != len(ids):
            raise ValueError(f"weights[{r}] has {len(w)} entries for {len(ids)} items")
        keep = (ids >= 0) & (ids < n_items)
        if not keep.all():
            logger.debug("fold-in list %d: %d unknown item ids ignored", r, int((~keep).sum()))
        rows.append(np.full(int(keep.sum()), r, np.int64))
        cols.append(ids[keep])
        vals.append(w[keep])
    if not item_lists:
        return sp.csr_matrix((0, n_items), dtype=np.float32)
    m = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(item_lists), n_items),
        dtype=np.float32,
    )
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    return m


def binary_matrix(rows: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    """(n_users, n_items) float32 CSR with a 1 for every (user, item) pair of a frame's ``user_idx`` /
    ``item_idx`` columns."""
    m = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows["user_idx"].to_numpy(np.int64), rows["item_idx"].to_numpy(np.int64))),
        shape=(n_users, n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def union_history(train_rows: sp.csr_matrix, extra_rows: sp.csr_matrix | None) -> sp.csr_matrix:
    """Training rows plus, with weight 1, any item of ``extra_rows`` the training rows lack."""
    if extra_rows is None or extra_rows.nnz == 0:
        return train_rows
    extra = _fit_columns(sp.csr_matrix(extra_rows, dtype=np.float32, copy=True), train_rows.shape[1])
    extra.data[:] = 1.0
    seen = train_rows.copy()
    seen.data[:] = 1.0
    only_extra = (extra - extra.multiply(seen)).tocsr()
    only_extra.eliminate_zeros()
    out = (train_rows + only_extra).tocsr()
    out.sort_indices()
    return out


def mask_rows(scores: np.ndarray, rows: sp.csr_matrix | None) -> None:
    """Set ``scores[r, j] = -inf`` for every stored entry (r, j) of ``rows`` (in place)."""
    if rows is None or rows.nnz == 0:
        return
    rows = sp.csr_matrix(rows)
    r = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    c = rows.indices.astype(np.int64)
    keep = (c >= 0) & (c < scores.shape[1])
    scores[r[keep], c[keep]] = -np.inf


def sparse_scores(m: sp.spmatrix, fill: float = -np.inf) -> np.ndarray:
    """Dense float32 copy of a sparse score block where only stored nonzeros are proposed."""
    m = sp.csr_matrix(m)
    m.eliminate_zeros()
    out = np.full(m.shape, fill, dtype=np.float32)
    r = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    out[r, m.indices] = m.data.astype(np.float32)
    return out


# --------------------------------------------------------------------------- top-k
def topk(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n`` columns per row: highest score first, ties toward the lower column.

    ``scores`` is a (rows, items) float array; ``-inf`` (and NaN) marks items that must
    not be returned. Returns ids (rows, n) int64 and scores (rows, n) float32, padded with
    ``-1`` / :data:`PAD_SCORE` where a row has fewer than ``n`` returnable items.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    scores = np.asarray(scores, dtype=np.float32)
    b, m = scores.shape
    out_ids = np.full((b, n), -1, dtype=np.int64)
    out_sc = np.full((b, n), PAD_SCORE, dtype=np.float32)
    k = min(n, m)
    if b == 0 or k == 0:
        return out_ids, out_sc
    neg = -scores  # ascending neg == descending score; exact for floats
    neg[np.isnan(neg)] = np.inf
    if k == m or m <= 1024:
        order = np.argsort(neg, axis=1, kind="stable")[:, :k]
    else:
        order = np.empty((b, k), dtype=np.int64)
        part = np.argpartition(neg, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(neg, part, axis=1).max(axis=1)
        n_within = (neg <= kth[:, None]).sum(axis=1)
        clean = n_within == k  # the partition holds exactly the top-k set
        if clean.any():
            p = part[clean]
            v = np.take_along_axis(neg[clean], p, axis=1)
            o = np.lexsort((p, v), axis=-1)
            order[clean] = np.take_along_axis(p, o, axis=1)
        for r in np.flatnonzero(~clean):
            row = neg[r]
            # Items strictly better than the k-th value are all in; the boundary value's ties
            # fill the remaining places lowest index first. (With fewer than k returnable
            # items the boundary is +inf: those places are padding, whichever ids fill them.)
            better = np.flatnonzero(row < kth[r])
            better = better[np.lexsort((better, row[better]))]
            ties = np.flatnonzero(row == kth[r])[: k - len(better)]
            order[r] = np.concatenate([better, ties])
    top = np.take_along_axis(scores, order, axis=1)
    valid = top > -np.inf  # False for -inf and NaN
    out_ids[:, :k] = np.where(valid, order, -1)
    out_sc[:, :k] = np.where(valid, top, PAD_SCORE)
    return out_ids, out_sc


# --------------------------------------------------------------------------- persistence
def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_format_json(path: Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """A JSON file that names its ``format`` and ``format_version`` (as the savers here write them),
    refused when it is missing, of another format, or newer than this code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not {what}")
    meta = json.loads(path.read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r}")
    if int(meta.get("format_version", 0)) > version:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this code ({version})")
    return meta


def pack_csr(prefix: str, m: sp.csr_matrix | None, arrays: dict[str, np.ndarray]) -> None:
    if m is None:
        return
    m = sp.csr_matrix(m)
    arrays[f"{prefix}.data"] = m.data
    arrays[f"{prefix}.indices"] = m.indices
    arrays[f"{prefix}.indptr"] = m.indptr
    arrays[f"{prefix}.shape"] = np.asarray(m.shape, dtype=np.int64)


def unpack_csr(prefix: str, arrays: dict[str, np.ndarray]) -> sp.csr_matrix | None:
    if f"{prefix}.data" not in arrays:
        return None
    shape = tuple(int(x) for x in arrays[f"{prefix}.shape"])
    return sp.csr_matrix((arrays[f"{prefix}.data"], arrays[f"{prefix}.indices"], arrays[f"{prefix}.indptr"]), shape=shape)


def load_source(directory: str | Path) -> CandidateSource:
    """Load whatever source :meth:`CandidateSource.save` wrote into ``directory``."""
    return CandidateSource.load(directory)


# --------------------------------------------------------------------------- the ABC
class CandidateSource(ABC):
    """One way of proposing candidate items for users.

    Attributes: ``name`` (a short id, also the folder name inside a saved
    :class:`~adrec.candidates.merge.MultiSource`), ``n_users`` / ``n_items`` after
    :meth:`fit`, and ``supports_fold_in`` (whether :meth:`fold_in` works).
    """

    name: str = "source"
    supports_fold_in: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # private helpers are not loadable classes
            _REGISTRY[cls.__name__] = cls

    def __init__(self, name: str | None = None) -> None:
        self.name = check_name(name if name is not None else type(self).name)
        self.n_users: int | None = None
        self.n_items: int | None = None

    def __repr__(self) -> str:
        fitted = f"{self.n_users}x{self.n_items}" if self.is_fitted else "unfitted"
        return f"{type(self).__name__}(name={self.name!r}, {fitted})"

    @property
    def is_fitted(self) -> bool:
        return self.n_items is not None

    # -- what subclasses implement ------------------------------------------------
    @abstractmethod
    def fit(self, user_items: sp.csr_matrix) -> CandidateSource:
        """Learn from a (n_users, n_items) matrix of positive float32 interaction weights."""

    @abstractmethod
    def _score_users(self, users: np.ndarray, history: sp.csr_matrix | None) -> np.ndarray:
        """Dense (len(users), n_items) float32 scores; ``-inf`` = not proposed.

        ``history`` holds the batch's ``exclude`` rows (items the users have seen), which
        history-based sources may use on top of the training rows; may be None.
        """

    @abstractmethod
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able constructor kwargs, fitted numpy arrays) for :meth:`save`."""

    @abstractmethod
    def _set_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the fitted arrays (n_users / n_items are already set)."""

    @classmethod
    def _from_params(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> CandidateSource:
        """A new, unfitted instance from the saved constructor kwargs (override when the
        constructor needs arrays too)."""
        return cls(**params)

    # -- shared behaviour ---------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} '{self.name}' is not fitted; call fit() or load() first")

    def _check_users(self, user_idx: Any) -> np.ndarray:
        self._check_fitted()
        users = np.asarray(user_idx)
        if users.ndim == 0:
            users = users.reshape(1)
        if users.ndim != 1:
            raise ValueError(f"user_idx must be 1-D, got shape {users.shape}")
        if users.size and not np.issubdtype(users.dtype, np.integer):
            raise TypeError(f"user_idx must hold integers, got {users.dtype}")
        users = users.astype(np.int64, copy=False)
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            bad = users[(users < 0) | (users >= self.n_users)]
            raise IndexError(
                f"{self.name}: user index {int(bad[0])} is outside the training matrix (0..{self.n_users - 1}); "
                "use fold_in/recommend_for_items for users that were not trained on"
            )
        return users

    @staticmethod
    def _check_exclude(exclude: Any, n_rows: int) -> sp.csr_matrix | None:
        if exclude is None:
            return None
        if not sp.issparse(exclude):
            raise TypeError(f"exclude must be a scipy.sparse CSR matrix or None, got {type(exclude).__name__}")
        exclude = sp.csr_matrix(exclude)
        if exclude.shape[0] != n_rows:
            raise ValueError(f"exclude has {exclude.shape[0]} rows for {n_rows} users (one row per user expected)")
        return exclude

    def _block_rows(self) -> int:
        return max(1, _BLOCK_CELLS // max(1, int(self.n_items)))

    def _rank(
        self,
        n_rows: int,
        n: int,
        exclude: sp.csr_matrix | None,
        score_block: Callable[[slice, sp.csr_matrix | None], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score rows in blocks, mask ``exclude``, keep the top ``n``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        ids = np.full((n_rows, n), -1, dtype=np.int64)
        scores = np.full((n_rows, n), PAD_SCORE, dtype=np.float32)
        step = self._block_rows()
        for start in range(0, n_rows, step):
            sl = slice(start, min(n_rows, start + step))
            ex = exclude[sl] if exclude is not None else None
            block = np.array(score_block(sl, ex), dtype=np.float32, copy=True)
            mask_rows(block, ex)
            ids[sl], scores[sl] = topk(block, n)
        return ids, scores

    def recommend(self, user_idx: np.ndarray, n: int, exclude: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` items for users of the training matrix.

        ``exclude``: one CSR row per user (the items they have seen); none of them is ever
        returned. Returns ids (len(user_idx), n) int64 padded with -1 and scores float32.
        """
        users = self._check_users(user_idx)
        exclude = self._check_exclude(exclude, len(users))
        return self._rank(len(users), n, exclude, lambda sl, ex: self._score_users(users[sl], ex))

    def fold_in(self, item_lists: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Scores (len(item_lists), n_items) float32 for users NOT in the training matrix,
        each given by the items they interacted with (``-inf`` = not proposed)."""
        raise NotImplementedError(f"{type(self).__name__} does not support fold-in of new users")

    def recommend_for_items(
        self,
        item_ids_seen: Sequence[np.ndarray],
        n: int,
        exclude: sp.csr_matrix | None = None,
        weights: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` for new users given only the items they clicked (see :meth:`fold_in`).

        The clicked items are never returned; ``exclude`` (optional, one row per list)
        removes more. Same output shapes as :meth:`recommend`.
        """
        self._check_fitted()
        lists = list(item_ids_seen)
        exclude = self._check_exclude(exclude, len(lists))
        seen = lists_to_csr(lists, self.n_items)

        def block(sl: slice, ex: sp.csr_matrix | None) -> np.ndarray:
            w = None if weights is None else list(weights)[sl]
            s = self.fold_in(lists[sl], weights=w)
            mask_rows(s, seen[sl])
            return s

        return self._rank(len(lists), n, exclude, block)

    # -- persistence ----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``source.json`` (class, name, parameters) and ``arrays.npz`` into ``directory``."""
        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        params, arrays = self._get_state()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "name": self.name,
            "n_users": int(self.n_users),
            "n_items": int(self.n_items),
            "params": {k: v for k, v in params.items() if k != "name"},
        }
        np.savez(d / STATE_NPZ, **arrays)
        write_json(d / STATE_JSON, meta)
        logger.debug("saved %r to %s", self, d)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> CandidateSource:
        """Read a source saved by :meth:`save`. ``CandidateSource.load`` picks the class from
        the folder; ``SomeSource.load`` also checks that the folder holds that class."""
        d = Path(directory)
        meta_path = d / STATE_JSON
        meta = read_format_json(meta_path, FORMAT, FORMAT_VERSION, "a saved candidate source")
        # Only a name is read from the file, looked up among the classes defined in code (the registry
        # that __init_subclass__ fills): no module named in a file is ever imported.
        name = meta.get("class")
        klass = _REGISTRY.get(name) if isinstance(name, str) else None
        if klass is None:
            raise UnsafeFileError(f"{meta_path}: unknown source class {name!r} (nothing was imported); "
                                  f"known: {sorted(_REGISTRY)}")
        if not issubclass(klass, cls):
            raise TypeError(f"{d} holds a {klass.__name__}, not a {cls.__name__}")
        with np.load(d / STATE_NPZ, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        params = dict(meta.get("params", {}))
        params["name"] = meta.get("name", klass.name)
        obj = klass._from_params(params, arrays)
        obj.n_users = int(meta["n_users"])
        obj.n_items = int(meta["n_items"])
        obj._set_state(arrays)
        logger.debug("loaded %r from %s", obj, d)
        return obj


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """None -> ``implicit.gpu.HAS_CUDA``; True without a CUDA build of implicit is an error."""
    import implicit.gpu

    if use_gpu is None:
        return bool(implicit.gpu.HAS_CUDA)
    if use_gpu and not implicit.gpu.HAS_CUDA:
        raise ValueError(
            "use_gpu=True but this implicit build has no CUDA support (implicit.gpu.HAS_CUDA is False); "
            "set use_gpu to None (auto) or False"
        )
    return bool(use_gpu)


def has_gpu() -> bool:
    """The capability flag that picks the GPU backend and drives the GPU test skips."""
    import implicit.gpu

    return bool(implicit.gpu.HAS_CUDA)
