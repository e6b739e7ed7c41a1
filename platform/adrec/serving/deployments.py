"""The deployments behind the ingress: the ranker and the candidates (graph topology), and the feedback writer.

- :class:`RankerDeployment` scores (user, candidates, context) with the version's ranker, batching
  concurrent requests (``@serve.batch``); it keeps the previous version too (or loads the requested
  one), so the two halves never mix versions while a rollout is half done.
- :class:`CandidateDeployment` runs the request algorithm (:class:`~adrec.serving.request.Recommendation`),
  the click probabilities and explanations coming from the ranker.
- :class:`FeedbackDeployment` writes the feedback log (:mod:`adrec.feedback`).
"""

import asyncio
import logging
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
from ray import serve
from ray.serve.handle import DeploymentHandle

from adrec.feedback import FeedbackWriteError, open_log
from adrec.model_version import VersionPaths, read_version
from adrec.serving.args import AppArgs
from adrec.serving.holder import VersionHolder, fixed_arms, load_state, settle_heap
from adrec.serving.recommender import Recommender
from adrec.serving.replica import call, single_threaded
from adrec.serving.request import Recommendation
from adrec.serving.responses import version_info
from adrec.serving.scoring import rank_grouped
from adrec.serving.strategy import Strategy

log = logging.getLogger(__name__)

# Versions a ranker replica keeps loaded: the live one and the one before it (mid-rollout requests).
KEEP_VERSIONS = 2
# How long a new feedback writer waits for the log's lock: a replica replacing one that is still shutting
# down (Serve's graceful shutdown: 20 s by default) takes over; a second writer beside a live one fails.
WRITER_HANDOVER_S = 30.0


@serve.deployment(name="RankerDeployment")
class RankerDeployment:
    """Scores (user, candidates, context) with the version's ranker; batches concurrent requests."""

    def __init__(self, settings: AppArgs):
        single_threaded()
        self.settings = settings
        self._models: OrderedDict[str, Recommender] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self.current: str | None = None
        self.target: str | None = None  # a version being switched to
        self.loader: asyncio.Task | None = None
        self.load_error: str | None = None
        self.pinned: set[str] = set()  # the versions of A/B arms with their own (serve.ab): never evicted
        self._rank_batch.set_max_batch_size(settings.max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def reconfigure(self, config: dict) -> None:
        # As in VersionHolder: the first version before the replica answers, later ones in the background
        # (rank calls for a version still loading wait for that load, see _get).
        load = self._switch(str(config.get("version") or ""), str(config["model_dir"]))
        if self.current is None:
            for arm in fixed_arms(self.settings):
                self.pinned.add((await self._get("", arm.model_dir)).version_id)
            await load
        else:
            self.loader = asyncio.create_task(load)

    async def _switch(self, version: str, model_dir: str) -> None:
        key = self.target = version or model_dir
        try:
            rec = await self._get(version, model_dir)
        except Exception as err:
            if self.current is None:
                raise
            if self.target == key:
                self.target, self.load_error = None, f"{model_dir}: {type(err).__name__}: {err}"
            log.error("ranker could not load %s (still serving %s): %s", model_dir, self.current, err)
            return
        if self.target != key:  # superseded while it loaded: the newer switch sets current
            return
        self.current, self.target, self.load_error = rec.version_id, None, None
        log.info("ranker serving version %s", self.current)

    def loaded(self) -> dict:
        return load_state(self.current, self.target is not None, self.load_error)

    async def prepare(self, version: str, model_dir: str) -> str:
        """Load ``version`` (if not yet) without serving it: the candidate side's check before it swaps."""
        return (await self._get(version, model_dir)).version_id

    async def _get(self, version: str, model_dir: str):
        if not version:
            version = str(read_version(model_dir)["version"])
        if version in self._models:
            self._models.move_to_end(version)
            return self._models[version]
        if version in self._loading:
            return await asyncio.shield(self._loading[version])
        fut = asyncio.get_running_loop().create_future()
        self._loading[version] = fut
        try:
            # Scoring only: the two-stage model (candidate order) stays with the candidate replicas.
            rec = await asyncio.to_thread(Recommender, model_dir, None, True, False)
            if rec.version_id != version:
                raise LookupError(f"{model_dir} holds version {rec.version_id}, not the requested {version}")
            self._models[version] = rec
            while len(self._models) > KEEP_VERSIONS + len(self.pinned):  # least recently used first, never
                # the live one nor an A/B arm's
                self._models.pop(next(v for v in self._models if v != self.current and v not in self.pinned))
            settle_heap()
            fut.set_result(rec)
            return rec
        except BaseException as err:
            fut.set_exception(err)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._loading.pop(version, None)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, versions: list, model_dirs: list, users: list, items: list, contexts: list) -> list:
        async def resolve(i: int):
            return await self._get(versions[i], model_dirs[i])

        return await rank_grouped(versions, resolve, users, items, contexts)

    async def rank(self, version: str, model_dir: str, user_idx: int, items: np.ndarray, context: dict) -> dict:
        if len(items) == 0:
            return {"scores": np.empty(0, np.float32)}
        return await self._rank_batch(version, model_dir, int(user_idx), items, context)

    async def explain(self, version: str, model_dir: str, user_idx: int, items: np.ndarray, context: dict) -> dict:
        rec = await self._get(version, model_dir)
        return await asyncio.to_thread(rec.explain, int(user_idx), np.asarray(items, np.int64), context,
                                       self.settings.explain_budget_ms, self.settings.explain_max_items)

    def versions(self) -> dict:
        return {"current": self.current, "loaded": list(self._models)}

    def check_health(self) -> None:
        if self.current is None or self.current not in self._models:
            raise RuntimeError("no model version loaded")


@serve.deployment(name="CandidateDeployment")
class CandidateDeployment:
    """Candidates for a (pseudonymized) user and context, ranked by the ranker, cut to the top k."""

    def __init__(self, settings: AppArgs, ranker: DeploymentHandle):
        single_threaded()
        self.settings = settings
        self.ranker = ranker
        self.holder = VersionHolder(settings, load_ranker=False, role="candidates", ready=self._ranker_ready)
        self.strategy = Strategy.from_settings(settings)

    async def reconfigure(self, config: dict) -> None:
        await self.holder.reconfigure(config)

    async def _ranker_ready(self, rec: Recommender, model_dir: str) -> None:
        """Swap only to a version a ranker replica could load: the two halves answer together or not at all."""
        await call(self.ranker.prepare, rec.version_id, model_dir)

    def loaded(self) -> dict:
        return self.holder.loaded()

    async def recommend(self, user: str, k: int, context: dict, explain: bool, arm: str | None = None) -> dict:
        rec, model_dir = self.holder.rec_for(arm)  # one version for the whole request (the arm's, with A/B)
        u = rec.pseudonym_index(user)

        async def rank(items: np.ndarray) -> tuple:
            ranked = await call(self.ranker.rank, rec.version_id, model_dir, u, items, context)
            if "error" in ranked:
                raise RuntimeError(ranked["error"])
            return ranked["scores"], ranked.get("ctcvr")

        async def explain_fn(items: np.ndarray) -> dict:
            return await call(self.ranker.explain, rec.version_id, model_dir, u, items, context)

        req = Recommendation(rec, u, k, context, self.settings.n_candidates, explain, self.strategy, arm)
        return await req.run_async(rank, explain_fn)

    def version(self) -> dict:
        return version_info(self.holder.rec)

    def check_health(self) -> None:
        if self.holder.rec is None:
            raise RuntimeError("no model version loaded")


@serve.deployment(name="FeedbackDeployment", num_replicas=1)
class FeedbackDeployment:
    """A writer of the feedback log: for a file log the single one (one replica: one append order, one
    index of event ids; the log's lock refuses a second one, see :mod:`adrec.feedback.filelog`); for a
    segment log on a shared store one of several (each its own segments, see :mod:`adrec.feedback.segments`).

    ``/feedback`` does not depend on the model version: the version's item ids (which events may
    name) are read before the replica answers the first time, later in the background; a version
    whose item table cannot be read leaves the previous ids in force. If none could ever be read,
    events are logged without the item check (the learner counts unknown items).
    """

    def __init__(self, settings: AppArgs):
        self.log = open_log(settings.feedback_log).writer(dedup_max_ids=settings.feedback_dedup_max_ids,
                                                           dedup_window_s=settings.feedback_dedup_window_s,
                                                           handover_s=WRITER_HANDOVER_S)
        self.items: set[str] | None = None
        self.previous_items: set[str] = set()
        self.version: str | None = None
        self.settings = settings
        # A/B arms with a version of their own: arm -> version id (the `version` of their impressions), and
        # the items those versions may show.
        self.arm_versions: dict[str, str] = {}
        self.arm_items: set[str] = set()
        self.wanted: str | None = None
        self.load_error: str | None = None
        self.loader: asyncio.Task | None = None

    async def reconfigure(self, config: dict) -> None:
        # Serve holds requests back from a replica while reconfigure runs: never wait here for a version.
        self.wanted = str(config["model_dir"])
        if self.items is None and self.version is None and self.loader is None:
            await self._load_arms()
            self.loader = asyncio.create_task(self._load_items())
            await self.loader  # the first ids before the first request (failures are caught there)
        elif self.loader is None or self.loader.done():
            self.loader = asyncio.create_task(self._load_items())

    async def _load_arms(self) -> None:
        for arm in fixed_arms(self.settings):
            try:
                self.arm_versions[arm.name] = str((await asyncio.to_thread(read_version, arm.model_dir))["version"])
                items = await asyncio.to_thread(pd.read_parquet, VersionPaths(arm.model_dir).items, columns=["item"])
                self.arm_items |= set(items["item"].astype(str))
            except Exception as err:  # as for the live version: events are then checked against the others' items
                log.error("feedback: could not read the version of A/B arm %s (%s): %s", arm.name, arm.model_dir, err)

    async def _load_items(self) -> None:
        while self.wanted is not None:
            model_dir = self.wanted
            try:
                version = str((await asyncio.to_thread(read_version, model_dir))["version"])
                if version != self.version:
                    items = await asyncio.to_thread(pd.read_parquet, VersionPaths(model_dir).items, columns=["item"])
                    # Items of the version being replaced stay valid: clients may report on what they were shown.
                    self.previous_items, self.items = self.items or set(), set(items["item"].astype(str))
                    self.version = version
                self.load_error = None
            except Exception as err:
                self.load_error = f"{model_dir}: {type(err).__name__}: {err}"
                log.error("feedback: could not read the items of %s (keeps the items of %s): %s", model_dir,
                          self.version, err)
            if self.wanted == model_dir:
                self.wanted = None

    async def append(self, events: list[dict]) -> dict:
        if self.items is not None:
            bad = [i for i, e in enumerate(events) if e["item"] not in self.items and e["item"] not in self.previous_items
                   and e["item"] not in self.arm_items and not self.log.seen(e["event_id"])]
            if bad:
                shown = ", ".join(f"events.{i}.item" for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
                return {"status": 422, "detail": f"unknown item in {len(bad)} event(s): {shown}; nothing was written"}
        now = time.time()
        # An impression of an A/B arm with its own version names that version (it served the list).
        records = [{**e, "received_at": now, "version": self.arm_versions.get(e.get("arm"), self.version)}
                   for e in events]
        try:
            res = await self.log.append_async(records)
        except FeedbackWriteError as err:
            return {"status": 503, "detail": f"{err.strerror}: nothing of this batch was stored, retry later"}
        return {"status": 200, "accepted": len(res.accepted), "duplicates": len(res.duplicates),
                "duplicate_ids": res.duplicates}

    def count(self) -> int:
        return len(self.log)
