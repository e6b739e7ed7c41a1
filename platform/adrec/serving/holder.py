"""The version-swap state machine of a replica that holds a model version (its ``user_config``).

The first version loads before the replica answers anything (Serve waits for ``reconfigure``). Later
ones load in the background: ``reconfigure`` returns at once and the replica keeps answering on the
live version until the one assignment that swaps (a request sees the old or the new, whole). Serve
holds requests back from a replica while its ``reconfigure`` runs: with one replica, a load inside
it stalled every request for the whole load (3.4 s measured). :func:`adrec.serving.deploy.rollout`
waits for the swap through :meth:`VersionHolder.loaded`; a version that fails to load is reported
there and the replica goes on serving the live one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Awaitable, Callable

from ray import serve

from adrec.model_version import read_version
from adrec.serving.recommender import Recommender

log = logging.getLogger(__name__)


def model_config(model_dir: str) -> dict:
    """The ``user_config`` that points a version holder at the version in ``model_dir``."""
    return {"model_dir": str(model_dir), "version": str(read_version(model_dir)["version"])}


def fixed_arms(settings) -> list:
    """The A/B arms (``serve.ab``) that name a version of their own (the others serve the app's version)."""
    ab = getattr(settings, "ab", None)
    return [a for a in ab.arms if a.model_dir] if ab is not None else []


def load_state(version: str | None, loading: bool, error: str | None) -> dict:
    """What a replica's ``loaded()`` answers: this replica, the version it serves, and a load in progress or failed."""
    ctx = serve.get_replica_context()
    return {"replica": ctx.replica_id.unique_id if ctx else None, "version": version, "loading": loading,
            "error": error}


def settle_heap() -> None:
    """After a model version was swapped in: put every live object out of the cyclic collector's reach.

    A version's objects (~540k on the synthetic benchmark's versions) live as long as it serves; a full
    collection walking them took 240-670 ms, a pause of every request in the replica. Frozen, collections
    only walk what requests allocate. The swap itself runs no full collection either (it did, to free the
    previous version's cycles, and that pause was the latency tail of every rollout): a version is freed by
    reference counting when it is dropped. Measured on online versions, the only cyclic garbage a load
    leaves is ~130 small closures of ``ast.literal_eval`` (numpy's file headers), which a young-generation
    collection here usually takes and which otherwise stay frozen (about 20 kB per version).
    """
    gc.collect(1)
    gc.freeze()


def load_candidate_side(model_dir: str, load_ranker: bool, n_candidates: int, max_k: int,
                        precompute_max_users: int) -> Recommender:
    """A :class:`Recommender` that produces candidates, with its known users' two-stage lists at hand
    (up to ``precompute_max_users`` users): one batched pass per version load (or a read of the lists
    the version's writer stored) instead of a re-ranking per request."""
    rec = Recommender(model_dir, None, load_ranker)
    rec.precompute_lists(max(n_candidates, max_k), precompute_max_users)
    return rec


class VersionHolder:
    """The live :class:`Recommender` of a replica (``rec``) and the swap to the next one (see the module).

    ``await ready(rec, model_dir)``, when given, must succeed before a later version is swapped in (the
    graph's candidates: a ranker replica has loaded it).
    """

    def __init__(self, settings, load_ranker: bool, role: str,
                 ready: Callable[[Recommender, str], Awaitable[None]] | None = None):
        self.settings, self.load_ranker, self.role, self.ready = settings, load_ranker, role, ready
        self.rec: Recommender | None = None
        self.model_dir: str | None = None
        self.target: tuple[str, str] | None = None  # (model_dir, version) being loaded
        self.loader: asyncio.Task | None = None
        self.load_error: str | None = None
        # A/B arms with a version of their own (serve.ab: model_dir set): arm -> (Recommender, model_dir),
        # loaded with the first version and kept (rollouts move the app's own version, which the other arms serve).
        self.arms: dict[str, tuple[Recommender, str]] = {}

    def rec_for(self, arm: str | None) -> tuple[Recommender, str]:
        """The version (and its folder) that serves ``arm``: its own, or the live one."""
        return self.arms.get(arm) or (self.rec, self.model_dir)

    async def reconfigure(self, config: dict) -> None:
        """Point the holder at a ``user_config``'s version."""
        target = (str(config["model_dir"]), str(config.get("version") or ""))
        if self.rec is not None and target[0] == self.model_dir and target[1] in ("", self.rec.version_id):
            self.target = None  # back to the live version: a load in progress is dropped when it ends
            return
        self.target = target
        if self.rec is None:
            for arm in fixed_arms(self.settings):
                rec = await asyncio.to_thread(self._load, arm.model_dir)
                if self.ready is not None:
                    await self.ready(rec, arm.model_dir)
                self.arms[arm.name] = (rec, arm.model_dir)
                log.info("%s serving version %s for A/B arm %s", self.role, rec.version_id, arm.name)
            await self._load_targets(None, raise_errors=True)
        elif self.loader is None or self.loader.done():
            self.loader = asyncio.create_task(self._load_targets(self.ready))

    def _load(self, model_dir: str) -> Recommender:
        s = self.settings
        # A version another key pseudonymized is refused before it loads (the live one keeps serving).
        s.check_version_key(read_version(model_dir), model_dir)
        rec = load_candidate_side(model_dir, self.load_ranker, s.n_candidates, s.max_k, s.precompute_max_users)
        rec.check_objective(s.objective)  # expected_value on a version without bids: refused, like a bad key
        return rec

    async def _load_targets(self, ready, raise_errors: bool = False) -> None:
        """Load ``self.target`` until none is pending (a newer target set meanwhile is loaded next)."""
        while self.target is not None:
            new_dir, want = self.target
            try:
                rec = await asyncio.to_thread(self._load, new_dir)
                if want and rec.version_id != want:
                    raise ValueError(f"{new_dir} holds version {rec.version_id}, not {want}")
                if ready is not None:
                    await ready(rec, new_dir)
            except Exception as err:
                if self.target == (new_dir, want):
                    self.target = None
                    self.load_error = f"{new_dir}: {type(err).__name__}: {err}"
                log.error("%s could not load %s (still serving %s): %s", self.role, new_dir,
                          self.rec.version_id if self.rec is not None else "nothing", err)
                if raise_errors:
                    raise
                continue
            if self.target != (new_dir, want):  # superseded while it loaded
                continue
            self.rec, self.model_dir, self.target, self.load_error = rec, new_dir, None, None
            settle_heap()
            log.info("%s serving version %s", self.role, rec.version_id)

    def loaded(self) -> dict:
        return load_state(self.rec.version_id if self.rec else None, self.target is not None, self.load_error)
