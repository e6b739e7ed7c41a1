"""What the feedback stream teaches beyond the ranker's weights: users, histories, seen items, ALS fold-in.

:class:`OnlineCatalog` tracks, from the feedback log, the users the served version never saw (they get
the next user indices, in order of first appearance), every user's recent clicks (the ``hist`` the
ranker reads, exactly as serving builds it), the items each user was shown or clicked (never proposed
again) and the clicks themselves. :func:`fold_in_sources` turns the clicks into candidate-source
updates on publication: new users (and known users with new clicks) get least-squares ALS user
factors against the fixed item factors, items that were clicked get their item factors re-solved
against the user factors (a cold catalog item gets its first informative factor here), and the
history-based sources (item-item, text neighbours) see the new clicks in their user rows.

New users are bounded per version (``max_new_per_version``, :meth:`OnlineCatalog.published` starts the
next version's allowance): beyond it a new user's events are still learned from (as a cold user) but
the user is not added and nothing is kept for them; each such event counts in ``refused_events`` and
each such user once in ``refused_users`` (ids of refused users are kept only up to the same bound).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


class OnlineCatalog:
    def __init__(self, user_pos: dict[str, int], base_history: list[np.ndarray], hist_len: int, n_items: int,
                 max_new_per_version: int | None = None):
        self.max_new = max_new_per_version
        self.version_start = 0  # len(new_users) when the last version was published
        self.refused_events = 0
        self.refused_users = 0
        self._refused: set[str] = set()
        self.user_pos = user_pos
        self.n_base_users = len(user_pos)
        self.base_history = base_history
        self.hist_len = int(hist_len)
        self.n_items = int(n_items)
        self.new_users: dict[str, int] = {}
        self.hist: dict[str, list[int]] = {}  # users whose history changed online: their last hist_len positives
        self.clicks: dict[str, list[int]] = {}  # every online click, per user, in log order
        self.seen: dict[str, set[int]] = {}  # items shown or clicked online, per user

    # ---- lookups ----------------------------------------------------------------------------------
    def index(self, user: str) -> int:
        """The user's index in the versions this learner publishes (base users first, then new ones)."""
        i = self.user_pos.get(user)
        if i is not None:
            return i
        return self.new_users.get(user, -1)

    def base_index(self, user: str) -> int:
        """The user's index in the served base version (what the ranker's id embedding knows), or -1."""
        return self.user_pos.get(user, -1)

    def history(self, user: str) -> tuple:
        h = self.hist.get(user)
        if h is not None:
            return tuple(h)
        i = self.user_pos.get(user)
        if i is None or i >= len(self.base_history) or self.hist_len == 0:
            return ()
        return tuple(int(x) for x in self.base_history[i][-self.hist_len:])

    @property
    def n_users(self) -> int:
        return self.n_base_users + len(self.new_users)

    # ---- updates ----------------------------------------------------------------------------------
    def _register(self, user: str) -> bool:
        """Whether the user is (now) known; False when the version's allowance of new users is used up."""
        if user in self.user_pos or user in self.new_users:
            return True
        if self.max_new is not None and len(self.new_users) - self.version_start >= self.max_new:
            self.refused_events += 1
            if user not in self._refused:
                self.refused_users += 1
                if len(self._refused) < max(self.max_new, 1):
                    self._refused.add(user)
            return False
        self.new_users[user] = self.n_base_users + len(self.new_users)
        return True

    def published(self) -> None:
        """A version holding every user so far was published: the next one may add its own allowance."""
        self.version_start = len(self.new_users)
        self._refused.clear()

    def impression(self, user: str, item: int) -> None:
        if not self._register(user):
            return
        self.seen.setdefault(user, set()).add(int(item))

    def click(self, user: str, item: int) -> None:
        if not self._register(user):
            return
        item = int(item)
        self.clicks.setdefault(user, []).append(item)
        self.seen.setdefault(user, set()).add(item)
        if self.hist_len:
            h = list(self.history(user)) + [item]
            self.hist[user] = h[-self.hist_len:]

    # ---- what a published version holds -----------------------------------------------------------
    def histories(self) -> list[np.ndarray]:
        """Per user index (base and new), the recent positives serving starts from."""
        out = [np.asarray(h, dtype=np.int64) for h in self.base_history]
        out += [np.empty(0, dtype=np.int64)] * (self.n_users - len(out))
        for user, h in self.hist.items():
            out[self.index(user)] = np.asarray(h, dtype=np.int64)
        return out

    def _matrix(self, per_user: dict[str, object]) -> sp.csr_matrix:
        rows, cols = [], []
        for user, items in per_user.items():
            items = np.fromiter(sorted(set(items)), dtype=np.int64)
            rows.append(np.full(len(items), self.index(user), dtype=np.int64))
            cols.append(items)
        if not rows:
            return sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32)
        r, c = np.concatenate(rows), np.concatenate(cols)
        m = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    def seen_matrix(self, base_seen: sp.csr_matrix) -> sp.csr_matrix:
        base = sp.csr_matrix(base_seen, dtype=np.float32, copy=True)
        base.resize((self.n_users, self.n_items))
        out = (base + self._matrix(self.seen)).tocsr()
        out.data[:] = 1.0
        out.sort_indices()
        return out

    def click_matrix(self) -> sp.csr_matrix:
        return self._matrix(self.clicks)

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"new_users": dict(self.new_users), "hist": {u: list(h) for u, h in self.hist.items()},
                "clicks": {u: list(c) for u, c in self.clicks.items()},
                "seen": {u: sorted(s) for u, s in self.seen.items()}, "version_start": self.version_start,
                "refused_events": self.refused_events, "refused_users": self.refused_users,
                "refused": sorted(self._refused)}

    def load_state_dict(self, st: dict) -> None:
        self.new_users = {str(u): int(i) for u, i in st["new_users"].items()}
        self.hist = {str(u): [int(x) for x in h] for u, h in st["hist"].items()}
        self.clicks = {str(u): [int(x) for x in c] for u, c in st["clicks"].items()}
        self.seen = {str(u): set(int(x) for x in s) for u, s in st["seen"].items()}
        self.version_start = int(st.get("version_start", 0))
        self.refused_events = int(st.get("refused_events", 0))
        self.refused_users = int(st.get("refused_users", 0))
        self._refused = set(st.get("refused", ()))


def _binary(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def fold_in_sources(multi, catalog: OnlineCatalog) -> dict:
    """Extend every source of ``multi`` (a loaded :class:`MultiSource`) to the catalog's users, in place.

    Returns counts of what was folded in. Sources without user state (popularity) only learn the new
    user count, so that every user index of the version is valid for every source.
    """
    n_users = catalog.n_users
    clicks = catalog.click_matrix()
    clicked_users = np.flatnonzero(np.diff(clicks.indptr))
    clicked_items = np.flatnonzero(np.asarray(clicks.sum(axis=0)).ravel())
    # The training positives, where a history-based source keeps them (item-item / text keep user_items).
    train_pos = None
    for src in multi.sources.values():
        ui = getattr(src, "user_items", None)
        if sp.issparse(ui):
            train_pos = _binary(ui)
            break
    if train_pos is not None:
        train_pos = train_pos.copy()
        train_pos.resize((n_users, catalog.n_items))
        positives = _binary(train_pos + clicks)
    else:
        positives = clicks
    info = {"users": int(n_users), "new_users": len(catalog.new_users), "users_refolded": 0, "items_refolded": 0,
            "sources": []}
    for name, src in multi.sources.items():
        old_users = int(src.n_users or 0)
        if hasattr(src, "user_factors") and getattr(src, "user_factors", None) is not None and hasattr(src, "fold_in_factors"):
            uf = np.asarray(src.user_factors, dtype=np.float32)
            if uf.shape[0] < n_users:
                uf = np.vstack([uf, np.zeros((n_users - uf.shape[0], uf.shape[1]), np.float32)])
            else:
                uf = uf.copy()
            # Users: known ones keep their trained factors unless they clicked online (then re-solved with all
            # their positives, when those are known); new users are solved from their online clicks.
            redo = clicked_users if train_pos is not None else clicked_users[clicked_users >= catalog.n_base_users]
            if len(redo):
                lists = [positives[u].indices for u in redo]
                uf[redo] = src.fold_in_factors(lists)
            src.user_factors = np.ascontiguousarray(uf)
            info["users_refolded"] = int(len(redo))
            # Items: re-solved against the (updated) user factors from every user who clicked them.
            items = clicked_items
            if train_pos is None:  # only items without any training interaction can be solved from clicks alone
                items = np.asarray([], dtype=np.int64)
            if hasattr(src, "_cpu_model"):
                src._cpu_model = None  # implicit caches X^T X: rebuild it around the new user factors
            model = _cpu_als(src) if len(items) else None
            if model is not None:
                item_users = positives.T.tocsr()[items]
                f = np.asarray(model.recalculate_item(items, item_users), dtype=np.float32).reshape(len(items), -1)
                itf = np.asarray(src.item_factors, dtype=np.float32).copy()
                itf[items] = f
                src.item_factors = np.ascontiguousarray(itf)
                info["items_refolded"] = int(len(items))
            if hasattr(src, "_cpu_model"):
                src._cpu_model = None  # rebuilt from the new factors on the next fold-in
        ui = getattr(src, "user_items", None)
        if sp.issparse(ui):
            base = _binary(ui)
            base.resize((n_users, base.shape[1]))
            extra = clicks
            if extra.shape[1] != base.shape[1]:
                extra = extra.copy()
                extra.resize((n_users, base.shape[1]))
            src.user_items = _binary(base + extra)
        src.n_users = n_users
        info["sources"].append({"name": name, "class": type(src).__name__, "users": [old_users, n_users]})
    return info


def _cpu_als(src):
    """implicit's CPU ALS model around an ALS source's factors (for recalculate_item), or None."""
    getter = getattr(src, "_cpu", None)
    if getter is None:
        return None
    try:
        model = getter()
    except Exception as err:  # a factor source without an implicit model behind it
        log.warning("source %s: no implicit model for item fold-in (%s)", getattr(src, "name", "?"), err)
        return None
    return model if hasattr(model, "recalculate_item") else None
