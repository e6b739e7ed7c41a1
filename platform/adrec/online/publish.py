"""Writing the learner's model versions, and the status records of every publication decision.

A published version is a complete model version folder (see :mod:`adrec.model_version`) that Serve
loads on its own: the base version's features and item table, the users it saw online appended to
the user table, updated histories and seen items, the candidate sources with the online users and
clicks folded in, and the ranker with the learner's weights (:meth:`FusionRanker.save`). The item text
cache stays valid (the encoder is not updated online), so loading a version never runs the encoder.

Versions are written by the one writer of :mod:`adrec.model_version` and committed to the base version's
registry (the run's ``versions/``, on whatever store the run lives: numbered, checksummed, never
rewritten). Their ids are deterministic (base version + learned-impression count), so a learner that
replays events after a crash and reaches the same decision finds the version it had already committed
and reuses it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.errors import RunError
from adrec.model_version import VersionEntry, VersionPaths, VersionRegistry, read_version, write_version
from adrec.model_version.registry import staging_dir
from adrec.online.catalog import fold_in_sources

log = logging.getLogger(__name__)


def version_id(base_version: str, examples: int) -> str:
    return f"{base_version}-o{examples:09d}"


def _append_users(users: pd.DataFrame, new_users: dict[str, int]) -> pd.DataFrame:
    """The base user table plus one row per new user (pseudonym only: every side feature unknown)."""
    if not new_users:
        return users
    ids = sorted(new_users, key=new_users.get)
    extra = {}
    for c in users.columns:
        if c == "user_idx":
            extra[c] = np.asarray([new_users[u] for u in ids], dtype=users[c].dtype)
        elif c == "user":
            extra[c] = ids
        elif c == "text":
            extra[c] = [""] * len(ids)
        elif c.startswith("c:"):
            sample = users[c].iloc[0] if len(users) else 0
            if isinstance(sample, (list, tuple, np.ndarray)):
                extra[c] = [np.zeros(0, dtype=np.int64)] * len(ids)
            else:
                extra[c] = np.zeros(len(ids), dtype=users[c].dtype)
        else:
            extra[c] = pd.Series([None] * len(ids), dtype=users[c].dtype if users[c].dtype != object else object)
    return pd.concat([users, pd.DataFrame(extra)], ignore_index=True)


def publish_version(base_dir: Path, registry: VersionRegistry, vid: str, ranker, catalog, sources=None,
                    fold_in: bool = True, info: dict | None = None) -> tuple[VersionEntry, dict]:
    """Commit the learner's version ``vid`` to ``registry`` (not live yet: the caller makes it live once it
    is rolled out); a version with that id already committed (a replay after a restart) is reused."""
    try:
        entry = registry.find(vid)
        log.info("version %s already committed as %s (replay after a restart): reusing it", vid, entry.uri)
        return entry, read_version(entry.uri)
    except RunError:
        pass
    base_paths = VersionPaths(base_dir)
    base = read_version(base_dir)
    base_seen = sp.load_npz(base_paths.seen).tocsr()
    fold = {"folded": False}
    seen = catalog.seen_matrix(base_seen)
    if fold_in and sources is not None:
        fold = {"folded": True, **fold_in_sources(sources, catalog)}
        candidates = sources
    else:
        # Without fold-in the sources know the base users only: new users take the cold-user path, so the
        # seen matrix keeps the base users' rows (their online impressions added).
        candidates = base_paths.candidates
        seen = seen[: base_seen.shape[0]]
    meta = {k: v for k, v in base.items() if k not in ("version", "created", "online")}
    meta.update(version=vid, parent=base.get("version"), n_users=int(catalog.n_users),
                online={**(info or {}), "new_users": len(catalog.new_users), "fold_in": fold})
    users = _append_users(pd.read_parquet(base_paths.users), catalog.new_users)
    # The two-stage top-K recommender is not updated online: it keeps ordering the base users' lists
    # (their online impressions excluded through seen.npz); new users take the fold-in path.
    path, meta = write_version(staging_dir(registry, vid), meta, features=base_paths.features, users=users,
                               history=catalog.histories(), seen=seen, candidates=candidates, ranker=ranker,
                               topk=base_paths.topk)
    entry = registry.commit(path, make_live=False)
    log.info("published version %s as %s (%d users, %d new)", vid, entry.uri, catalog.n_users, len(catalog.new_users))
    return entry, meta


STATUS_RECORDS, STATUS_CURRENT = "status.jsonl", "status.json"


class StatusLog:
    """``status.jsonl`` (one record per decision, appended) and ``status.json`` (the latest summary)."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.records = self.dir / STATUS_RECORDS
        self.current = self.dir / STATUS_CURRENT

    def append(self, record: dict) -> None:
        line = json.dumps({"time": time.time(), **record}, default=_json_default) + "\n"
        fd = os.open(self.records, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def append_once(self, record: dict, tail_bytes: int = 1 << 20) -> bool:
        """Append a decision record unless the log's tail already holds it (same event, version and
        learned count: a replay after a crash); returns whether it was appended."""
        key = (record.get("event"), record.get("version"), record.get("examples_learned"))
        if self.records.is_file():
            with open(self.records, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
                for line in f.read().splitlines():
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(r, dict) and (r.get("event"), r.get("version"), r.get("examples_learned")) == key:
                        return False
        self.append(record)
        return True

    def write(self, summary: dict) -> None:
        tmp = self.current.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=_json_default))
        tmp.replace(self.current)

    def read_current(self) -> dict:
        try:
            out = json.loads(self.current.read_text())
        except (OSError, ValueError):
            return {}
        return out if isinstance(out, dict) else {}

    def read(self) -> list[dict]:
        if not self.records.is_file():
            return []
        out = []
        for line in self.records.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
