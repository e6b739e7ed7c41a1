"""The Ray Serve application: FastAPI ingress -> candidates -> ranker, plus the feedback writer.

Two topologies (``AppArgs.topology``), the same answers and the same HTTP API:

``graph`` (every arrow is a :class:`DeploymentHandle` call)::

    HTTP -> Ingress (FastAPI: auth, body limits, strict validation, pseudonymization)
              |-- /recommend -> CandidateDeployment --rank/explain--> RankerDeployment (@serve.batch)
              |-- /feedback  -> FeedbackDeployment (one writer: durable JSONL log, idempotent by event_id)
              |-- /version   -> CandidateDeployment
              `-- /healthz

``fused``: the Ingress replica holds the model version itself (candidates and the ranker, ranking
batched across its concurrent requests with ``@serve.batch``); only ``/feedback`` leaves it, for
the single writer. Each handle hop costs several ms of CPU on both sides, so on a small machine the
fused app answers at a fraction of the graph's CPU per request; the graph scales the stages apart
(more ranker replicas than candidate replicas) on a cluster. Replicas, rollout and faults work
the same way in both: scale the Ingress to scale a fused app.

- The ranker replica holds a :class:`Recommender` whose Ranker caches the item text embeddings once
  per model version; each request runs only the ranking head over its candidates. Concurrent
  requests are batched into one ``predict`` call (``@serve.batch``).
- The model version is the deployments' ``user_config`` (``{"model_dir": ..., "version": ...}``):
  a new one is loaded by ``reconfigure`` next to the old (in a thread: requests keep flowing on the
  old one) and swapped in atomically. Rank calls carry the candidate side's version id, and the ranker
  keeps the previous version too (or loads the requested one), so the two halves never mix versions
  while a rollout is half done.
- Raw user ids stop at the ingress: it pseudonymizes them with the data set's key; the other
  deployments, the feedback log and every log line see pseudonyms only.
- Client errors are :class:`ApiError` (4xx with a message); failures inside the graph answer 503.
"""

import asyncio
import gc
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, SecretStr
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from adrec.config import ServeConfig
from adrec.data.privacy import KEY_ENV, pseudonymize
from adrec.serving.schemas import ApiError, FeedbackRequest, RecommendRequest, decode_json, read_body, validate

log = logging.getLogger(__name__)

APP_NAME = "adrec"
API_KEY_HEADER = "x-api-key"
# Versions a ranker replica keeps loaded: the live one and the one before it (mid-rollout requests).
KEEP_VERSIONS = 2
# Ray failures worth retrying on another replica (a replica killed or restarting).
RETRYABLE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


class AppArgs(ServeConfig):
    """Everything the Serve app is built from (the ``args`` of ``serve_apps/config.yaml``).

    The :class:`ServeConfig` fields plus the model version folder and where the keys come from.
    Relative paths are resolved against ``$ADREC_HOME`` (default: the current directory).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model_dir: str = Field(min_length=1)
    # ``topology`` (a ServeConfig field, see the module docstring): the `deployments` of a Serve config
    # must name that topology's deployments (Serve rejects overrides of deployments the app does not have).
    # The key that pseudonymized the data set's user ids: literal, else this file, else $pseudonym_key_env,
    # else <model_dir>/../secrets/pseudonym.key (where `adrec prepare` keeps a generated key).
    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: str | None = None
    pseudonym_key_env: str = KEY_ENV
    # The API key (`x-api-key` header): api_key, else $api_key_env when set; none -> no authentication.
    api_key: SecretStr | None = None
    api_key_env: str = "ADREC_API_KEY"
    app_name: str = APP_NAME

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path, **overrides: Any) -> "AppArgs":
        """Args for a run folder (``<run>/model``) from an :class:`AdrecConfig`."""
        run = Path(run_dir).expanduser().resolve()
        fields = cfg.serve.model_dump()
        fields.update(model_dir=str(run / "model"))
        if cfg.data.pseudonym_key:
            fields["pseudonym_key"] = cfg.data.pseudonym_key
        if fields.get("feedback_log") is None:
            fields["feedback_log"] = str(run / "feedback" / "events.jsonl")
        fields.update(overrides)
        return cls.model_validate(fields)

    def resolved(self) -> "AppArgs":
        """Absolute paths, the default feedback log and key file filled in, env-provided secrets read."""
        home = Path(os.environ.get("ADREC_HOME", os.getcwd()))

        def absolute(p: str) -> str:
            q = Path(os.path.expandvars(p)).expanduser()
            return str(q if q.is_absolute() else (home / q).resolve())

        model_dir = absolute(self.model_dir)
        upd: dict[str, Any] = {"model_dir": model_dir}
        run = Path(model_dir).parent
        upd["feedback_log"] = absolute(self.feedback_log) if self.feedback_log else str(run / "feedback" / "events.jsonl")
        if self.pseudonym_key is None:
            if self.pseudonym_key_file:
                upd["pseudonym_key_file"] = absolute(self.pseudonym_key_file)
            elif os.environ.get(self.pseudonym_key_env):
                upd["pseudonym_key"] = SecretStr(os.environ[self.pseudonym_key_env])
            elif (run / "secrets" / "pseudonym.key").is_file():
                upd["pseudonym_key_file"] = str(run / "secrets" / "pseudonym.key")
        if self.api_key is None and os.environ.get(self.api_key_env):
            upd["api_key"] = SecretStr(os.environ[self.api_key_env])
        return self.model_copy(update=upd)

    def key_bytes(self) -> bytes:
        if self.pseudonym_key is not None:
            return self.pseudonym_key.get_secret_value().encode()
        if self.pseudonym_key_file:
            return Path(self.pseudonym_key_file).read_bytes().strip()
        if os.environ.get(self.pseudonym_key_env):
            return os.environ[self.pseudonym_key_env].encode()
        raise ValueError(f"no pseudonymization key for {self.model_dir}: set pseudonym_key, pseudonym_key_file or "
                         f"${self.pseudonym_key_env} (the key `adrec prepare` used)")

    def fingerprint(self) -> str:
        """Changes with any setting (secrets included, hashed) and with this package's serving code."""
        h = hashlib.sha256(self.model_dump_json(exclude={"model_dir"}).encode())
        for secret in (self.pseudonym_key, self.api_key):
            value = secret.get_secret_value() if secret is not None else ""
            h.update(hashlib.sha256(value.encode()).digest())
        for src in sorted(Path(__file__).parent.glob("*.py")):
            h.update(src.read_bytes())
        return h.hexdigest()[:16]


def _model_config(model_dir: str) -> dict:
    from adrec.model_version import read_version

    return {"model_dir": str(model_dir), "version": str(read_version(Path(model_dir))["version"])}


def single_threaded() -> None:
    """One compute thread per replica process (torch, OpenMP and BLAS alike).

    Measured on 2 cores with the MovieLens-100k model: OpenBLAS' own threads next to torch's turned
    a 3 ms candidate lookup into 40 ms and a 7 ms ranking into 20 ms. Replicas scale out, not up.
    """
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # torch missing or already configured: not fatal for serving
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except Exception:  # threadpoolctl missing: BLAS keeps its default
        pass


async def _call(method, *args, attempts: int = 4):
    """A handle call, retried when the replica it went to died (Serve routes the retry elsewhere)."""
    for attempt in range(attempts):
        try:
            return await method.remote(*args)
        except RETRYABLE:
            if attempt == attempts - 1:
                raise
            log.warning("replica unavailable (attempt %d/%d): retrying", attempt + 1, attempts)
            await asyncio.sleep(0.05 * 3 ** attempt)


# ---- ranker ---------------------------------------------------------------------------------------
def _score(rec, users: list[int], items: list[np.ndarray], contexts: list[dict]) -> list[np.ndarray]:
    """One ``predict`` over the rows of several requests (each its own user and context); scores per request.

    Requests with the same context share one ``rows`` call (pandas costs ~1 ms a call whatever its
    size: per request, that was as much as the ranking itself).
    """
    import pandas as pd

    lens = [len(it) for it in items]
    groups: dict[tuple, list[int]] = {}
    for i, ctx in enumerate(contexts):
        groups.setdefault(tuple(sorted((ctx or {}).items())), []).append(i)
    frames, order = [], []
    for idx in groups.values():
        u = np.repeat(np.asarray([users[i] for i in idx], dtype=np.int64), [lens[i] for i in idx])
        it = np.concatenate([np.asarray(items[i], np.int64) for i in idx])
        frames.append(rec.rows(u, it, contexts[idx[0]]))
        order += idx
    rows = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    probs = np.asarray(rec.ranker.predict(rows), dtype=np.float32)
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(items)
    start = 0
    for i in order:
        out[i] = probs[start:start + lens[i]]
        start += lens[i]
    return out


async def _rank_grouped(keys: list, resolve, users: list, items: list, contexts: list) -> list:
    """The body of a ``@serve.batch`` ranking call: one ``predict`` per model version in the batch.

    ``keys[i]`` names request i's model version, ``await resolve(i)`` returns its :class:`Recommender`.
    """
    out: list[Any] = [None] * len(keys)
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        try:
            rec = await resolve(idx[0])
            scores = await asyncio.to_thread(_score, rec, [users[i] for i in idx], [items[i] for i in idx],
                                             [contexts[i] for i in idx])
            for i, sc in zip(idx, scores):
                out[i] = {"scores": sc}
        except Exception as err:  # one version failing must not fail the others in the batch
            log.error("ranking failed for version %s: %s", getattr(key, "version_id", key), err)
            for i in idx:
                out[i] = {"error": f"ranking failed: {type(err).__name__}"}
    return out


async def _recommend(rec, n_candidates: int, user: str, k: int, context: dict, explain: bool, rank, explain_fn) -> dict:
    """Candidates for a pseudonymized user, ranked, cut to the top ``k`` (both topologies).

    ``await rank(user_idx, items)`` returns the scores, ``await explain_fn(user_idx, items)`` the
    features of the chosen items; they run in this process (fused) or on the ranker (graph).
    """
    u = rec.pseudonym_index(user)
    cand = rec.candidates(u, max(n_candidates, k), context)
    result = {"version": rec.version_id, "known_user": u >= 0, "items": []}
    if len(cand.items) == 0:
        return result
    if cand.final is not None:
        # The two-stage re-ranker's order is final (as in Recommender.recommend): click probabilities
        # for the top k only, a tenth of the ranker rows at k=10 of 100 candidates.
        scores = np.full(len(cand.items), np.nan, np.float32)
        top = rec.top_order(cand, scores, k)
        scores[top] = await rank(u, cand.items[top])
    else:
        scores = await rank(u, cand.items)
    items = rec.top(cand, scores, k, explain)
    if explain and items:
        feats = await explain_fn(u, cand.items[rec.top_order(cand, scores, k)])
        for r, f in zip(items, feats):
            r["features"] = f
    result["items"] = items
    return result


def _load_candidate_side(model_dir: str, load_ranker: bool, settings: AppArgs):
    """A :class:`Recommender` that produces candidates, with its known users' two-stage lists
    precomputed (up to ``settings.precompute_max_users`` users): one batched pass per version load
    instead of a re-ranking per request."""
    from adrec.serving.recommender import Recommender

    rec = Recommender(model_dir, None, load_ranker)
    rec.precompute_lists(max(settings.n_candidates, settings.max_k), settings.precompute_max_users)
    return rec


async def _swap_in(owner, config: dict, load_ranker: bool, role: str, ready=None) -> None:
    """Point ``owner`` (a replica with ``rec``, ``model_dir`` and ``settings``) at a ``user_config``'s version.

    The first version loads before the replica answers anything (Serve waits for ``reconfigure``). Later
    ones load in the background: ``reconfigure`` returns at once and the replica keeps answering on the
    live version until the one assignment that swaps (a request sees the old or the new, whole). Serve
    holds requests back from a replica while its ``reconfigure`` runs: with one replica, a load inside
    it stalled every request for the whole load (3.4 s measured). :func:`adrec.serving.deploy.rollout`
    waits for the swap through :func:`_load_state`; a version that fails to load is reported there and
    the replica goes on serving the live one. ``await ready(rec, model_dir)``, when given, must succeed
    before a later version is swapped in (the graph's candidates: a ranker replica has loaded it).
    """
    target = (str(config["model_dir"]), str(config.get("version") or ""))
    if owner.rec is not None and target[0] == owner.model_dir and target[1] in ("", owner.rec.version_id):
        owner.target = None  # back to the live version: a load in progress is dropped when it ends
        return
    owner.target = target
    if owner.rec is None:
        await _load_targets(owner, load_ranker, role, None, raise_errors=True)
    elif owner.loader is None or owner.loader.done():
        owner.loader = asyncio.create_task(_load_targets(owner, load_ranker, role, ready))


async def _load_targets(owner, load_ranker: bool, role: str, ready=None, raise_errors: bool = False) -> None:
    """Load ``owner.target`` until none is pending (a newer target set meanwhile is loaded next)."""
    while owner.target is not None:
        new_dir, want = owner.target
        try:
            rec = await asyncio.to_thread(_load_candidate_side, new_dir, load_ranker, owner.settings)
            if want and rec.version_id != want:
                raise ValueError(f"{new_dir} holds version {rec.version_id}, not {want}")
            if ready is not None:
                await ready(rec, new_dir)
        except Exception as err:
            if owner.target == (new_dir, want):
                owner.target = None
                owner.load_error = f"{new_dir}: {type(err).__name__}: {err}"
            log.error("%s could not load %s (still serving %s): %s", role, new_dir,
                      owner.rec.version_id if owner.rec is not None else "nothing", err)
            if raise_errors:
                raise
            continue
        if owner.target != (new_dir, want):  # superseded while it loaded
            continue
        owner.rec, owner.model_dir, owner.target, owner.load_error = rec, new_dir, None, None
        _settle_heap()
        log.info("%s serving version %s", role, rec.version_id)


def _load_state(version: str | None, loading: bool, error: str | None) -> dict:
    """What :meth:`loaded` answers: this replica, the version it serves, and a load in progress or failed."""
    ctx = serve.get_replica_context()
    return {"replica": ctx.replica_id.unique_id if ctx else None, "version": version, "loading": loading,
            "error": error}


def _holder_state(owner) -> dict:
    """:func:`_load_state` of a replica that swaps versions through :func:`_swap_in`."""
    return _load_state(owner.rec.version_id if owner.rec else None, owner.target is not None, owner.load_error)


def _settle_heap() -> None:
    """After a model version was swapped in: put every live object out of the cyclic collector's reach.

    A version's objects (~460k on MovieLens-100k) live as long as it serves, and a full collection walking
    them took ~240 ms: a pause in the latency tail whenever one ran. Frozen, collections only walk what
    requests allocate. The previous version first goes back under the collector, so its cycles are freed,
    in one collection per swap, on top of the version load a rollout already costs.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _version_info(rec) -> dict:
    info = dict(rec.version)
    return {k: info[k] for k in ("version", "created", "run", "n_users", "n_items") if k in info}


@serve.deployment(name="RankerDeployment")
class RankerDeployment:
    """Scores (user, candidates, context) with the version's ranker; batches concurrent requests."""

    def __init__(self, settings: AppArgs):
        single_threaded()
        self.settings = settings
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self.current: str | None = None
        self.target: str | None = None  # a version being switched to
        self.loader: asyncio.Task | None = None
        self.load_error: str | None = None
        self._rank_batch.set_max_batch_size(settings.max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def reconfigure(self, config: dict) -> None:
        # As in _swap_in: the first version before the replica answers, later ones in the background
        # (rank calls for a version still loading wait for that load, see _get).
        load = self._switch(str(config.get("version") or ""), str(config["model_dir"]))
        if self.current is None:
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
        return _load_state(self.current, self.target is not None, self.load_error)

    async def prepare(self, version: str, model_dir: str) -> str:
        """Load ``version`` (if not yet) without serving it: the candidate side's check before it swaps."""
        return (await self._get(version, model_dir)).version_id

    async def _get(self, version: str, model_dir: str):
        from adrec.model_version import read_version
        from adrec.serving.recommender import Recommender

        if not version:
            version = str(read_version(Path(model_dir))["version"])
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
            while len(self._models) > KEEP_VERSIONS:  # least recently used first, never the live one
                self._models.pop(next(v for v in self._models if v != self.current))
            _settle_heap()
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

        return await _rank_grouped(versions, resolve, users, items, contexts)

    async def rank(self, version: str, model_dir: str, user_idx: int, items: np.ndarray, context: dict) -> dict:
        if len(items) == 0:
            return {"scores": np.empty(0, np.float32)}
        return await self._rank_batch(version, model_dir, int(user_idx), items, context)

    async def explain(self, version: str, model_dir: str, user_idx: int, items: np.ndarray, context: dict) -> list:
        rec = await self._get(version, model_dir)
        return await asyncio.to_thread(rec.explain, int(user_idx), np.asarray(items, np.int64), context)

    def versions(self) -> dict:
        return {"current": self.current, "loaded": list(self._models)}

    def check_health(self) -> None:
        if self.current is None or self.current not in self._models:
            raise RuntimeError("no model version loaded")


# ---- candidates ----------------------------------------------------------------------------------
@serve.deployment(name="CandidateDeployment")
class CandidateDeployment:
    """Candidates for a (pseudonymized) user and context, ranked by the ranker, cut to the top k."""

    def __init__(self, settings: AppArgs, ranker: DeploymentHandle):
        single_threaded()
        self.settings = settings
        self.ranker = ranker
        self.rec = None
        self.model_dir: str | None = None
        self.target: tuple[str, str] | None = None  # (model_dir, version) being loaded, see _swap_in
        self.loader: asyncio.Task | None = None
        self.load_error: str | None = None

    async def reconfigure(self, config: dict) -> None:
        await _swap_in(self, config, load_ranker=False, role="candidates", ready=self._ranker_ready)

    async def _ranker_ready(self, rec, model_dir: str) -> None:
        """Swap only to a version a ranker replica could load: the two halves answer together or not at all."""
        await _call(self.ranker.prepare, rec.version_id, model_dir)

    def loaded(self) -> dict:
        return _holder_state(self)

    async def recommend(self, user: str, k: int, context: dict, explain: bool) -> dict:
        rec, model_dir = self.rec, self.model_dir

        async def rank(u: int, items: np.ndarray) -> np.ndarray:
            ranked = await _call(self.ranker.rank, rec.version_id, model_dir, u, items, context)
            if "error" in ranked:
                raise RuntimeError(ranked["error"])
            return ranked["scores"]

        async def explain_fn(u: int, items: np.ndarray) -> list:
            return await _call(self.ranker.explain, rec.version_id, model_dir, u, items, context)

        return await _recommend(rec, self.settings.n_candidates, user, k, context, explain, rank, explain_fn)

    def version(self) -> dict:
        return _version_info(self.rec)

    def check_health(self) -> None:
        if self.rec is None:
            raise RuntimeError("no model version loaded")


# ---- feedback --------------------------------------------------------------------------------------
@serve.deployment(name="FeedbackDeployment", num_replicas=1)
class FeedbackDeployment:
    """The single writer of the feedback log (one replica: one append order, one index of event ids)."""

    def __init__(self, settings: AppArgs):
        from adrec.serving.feedback import FeedbackLog

        self.log = FeedbackLog(settings.feedback_log)
        self.items: set[str] = set()
        self.previous_items: set[str] = set()
        self.version: str | None = None

    async def reconfigure(self, config: dict) -> None:
        import pandas as pd

        from adrec.model_version import read_version

        model_dir = Path(config["model_dir"])
        version = str(read_version(model_dir)["version"])
        if version == self.version:
            return
        items = await asyncio.to_thread(pd.read_parquet, model_dir / "features" / "items.parquet", columns=["item"])
        # Items of the version being replaced stay valid: clients may report on what they were shown.
        self.previous_items, self.items = self.items, set(items["item"].astype(str))
        self.version = version

    async def append(self, events: list[dict]) -> dict:
        bad = [i for i, e in enumerate(events) if e["item"] not in self.items and e["item"] not in self.previous_items
               and e["event_id"] not in self.log.ids]
        if bad:
            shown = ", ".join(f"events.{i}.item" for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
            return {"status": 422, "detail": f"unknown item in {len(bad)} event(s): {shown}; nothing was written"}
        now = time.time()
        records = [{**e, "received_at": now, "version": self.version} for e in events]
        res = await asyncio.to_thread(self.log.append, records)
        return {"status": 200, "accepted": len(res.accepted), "duplicates": len(res.duplicates),
                "duplicate_ids": res.duplicates}

    def count(self) -> int:
        return len(self.log)


# ---- ingress -----------------------------------------------------------------------------------------
api = FastAPI(title="adrec", description="Ad recommendations: candidates, then a fine-tuned ranker.",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": "invalid request"}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(err.detail)}, status_code=err.status_code, headers=getattr(err, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.error("unexpected %s on %s", type(err).__name__, request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP in, JSON out. ``candidates`` is None in the fused topology: the replica then holds the
    model version (its ``user_config``) and answers /recommend and /version itself."""

    def __init__(self, settings: AppArgs, candidates: DeploymentHandle | None, feedback: DeploymentHandle):
        self.settings = settings
        self.key = settings.key_bytes()
        self.api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self.candidates = candidates
        self.feedback = feedback
        self.rec = None  # fused: the live Recommender (with its ranker)
        self.model_dir: str | None = None
        self.target: tuple[str, str] | None = None  # (model_dir, version) being loaded, see _swap_in
        self.loader: asyncio.Task | None = None
        self.load_error: str | None = None
        if candidates is None:
            single_threaded()
            self._rank_batch.set_max_batch_size(settings.max_batch_size)
            self._rank_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    # ---- fused topology: the model version lives in this replica --------------------------------------
    async def reconfigure(self, config: dict) -> None:
        await _swap_in(self, config, load_ranker=True, role="fused ingress")

    def loaded(self) -> dict:
        return _holder_state(self)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, recs: list, users: list, items: list, contexts: list) -> list:
        async def resolve(i: int):
            return recs[i]

        return await _rank_grouped(recs, resolve, users, items, contexts)

    async def _recommend_here(self, user: str, k: int, context: dict, explain: bool) -> dict:
        rec = self.rec  # one version for the whole request, even if a rollout swaps it meanwhile

        async def rank(u: int, items: np.ndarray) -> np.ndarray:
            ranked = await self._rank_batch(rec, u, items, context)
            if "error" in ranked:
                raise RuntimeError(ranked["error"])
            return ranked["scores"]

        async def explain_fn(u: int, items: np.ndarray) -> list:
            return await asyncio.to_thread(rec.explain, u, np.asarray(items, np.int64), context)

        return await _recommend(rec, self.settings.n_candidates, user, k, context, explain, rank, explain_fn)

    def check_health(self) -> None:
        if self.candidates is None and self.rec is None:
            raise RuntimeError("no model version loaded")

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER)
        if given is None:
            raise ApiError(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.api_key):
            raise ApiError(403, "invalid API key")

    async def _body(self, request: Request, model, **context):
        self._auth(request)
        body = await read_body(request, self.settings.max_body_bytes)
        return validate(model, decode_json(body), **context)

    async def _guarded(self, what: str, work) -> Any:
        """``await work`` with the request timeout; failures become 503 (the client did nothing wrong)."""
        try:
            return await asyncio.wait_for(work, timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, "timed out: the service is overloaded, retry later") from None
        except ApiError:
            raise
        except Exception as err:
            log.error("%s failed: %s", what, type(err).__name__)
            raise ApiError(503, "the service is temporarily unavailable, retry later") from None

    async def _graph(self, method, *args) -> Any:
        return await self._guarded(getattr(method, "_method_name", "call"), _call(method, *args))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        if self.candidates is None:
            if self.rec is None:
                raise ApiError(503, "not ready")
            return {"status": "ok", "version": self.rec.version_id}
        try:
            info = await asyncio.wait_for(self.candidates.version.remote(), timeout=5)
        except Exception:
            raise ApiError(503, "not ready") from None
        return {"status": "ok", "version": info.get("version")}

    @api.get("/version")
    async def version(self, request: Request) -> dict:
        self._auth(request)
        if self.candidates is None:
            return _version_info(self.rec)
        return await self._graph(self.candidates.version)

    @api.post("/recommend")
    async def recommend(self, request: Request) -> dict:
        req: RecommendRequest = await self._body(request, RecommendRequest, max_k=self.settings.max_k)
        context = {k: str(v) for k, v in req.context.items()}
        user = pseudonymize(req.user_id, self.key)
        if self.candidates is None:
            out = await self._guarded("recommend", self._recommend_here(user, req.k, context, req.explain))
        else:
            out = await self._graph(self.candidates.recommend, user, req.k, context, req.explain)
        # A plain JSONResponse: the answer is already JSON types, and FastAPI's encoder walk of it cost
        # a measurable share of a request's CPU.
        return JSONResponse({"user_id": req.user_id, "version": out["version"], "items": out["items"]})

    @api.post("/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        req: FeedbackRequest = await self._body(request, FeedbackRequest)
        events = [{"event_id": e.event_id, "user": pseudonymize(e.user_id, self.key), "item": e.item,
                   "type": e.type, "ts": e.ts, "context": {k: v for k, v in e.context.items()}} for e in req.events]
        out = await self._graph(self.feedback.append, events)
        status = out.pop("status")
        if status != 200:
            raise ApiError(status, out["detail"])
        return JSONResponse(out, status_code=200)


# ---- the builder ----------------------------------------------------------------------------------------
def _options(deployment, settings: AppArgs, version: str, user_config: dict | None, **extra):
    opts = dict(max_ongoing_requests=settings.max_ongoing_requests, ray_actor_options={"num_cpus": settings.num_cpus_per_replica},
                user_config=user_config, logging_config={"enable_access_log": settings.access_log}, **extra)
    try:  # a stable code version: a changed user_config is then a reconfigure in place, not new replicas
        return deployment.options(version=version, _internal=True, **opts)
    except TypeError:  # a Ray without the internal flag: rollouts restart replicas (rolling, still no drops)
        return deployment.options(**opts)


def build_app(args: AppArgs) -> serve.Application:
    """The application for ``serve.run`` / ``serve run`` / ``serve deploy`` (a typed builder)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    args = args.resolved()
    user_config = _model_config(args.model_dir)
    # The deployments get every setting except the model folder: that is the user_config, so pointing
    # the app at a new version changes nothing else, and Serve reconfigures the replicas in place.
    settings = args.model_copy(update={"model_dir": "(user_config)"})
    version = args.fingerprint()
    if args.ranker_max_replicas and args.ranker_max_replicas > args.ranker_replicas:
        scale = {"autoscaling_config": {"min_replicas": args.ranker_replicas, "max_replicas": args.ranker_max_replicas,
                                        "target_ongoing_requests": max(2, args.max_batch_size)}}
    else:
        scale = {"num_replicas": args.ranker_replicas}
    feedback = _options(FeedbackDeployment, args, version, user_config, num_replicas=1).bind(settings)
    if args.topology == "fused":
        # The ingress holds the model: it takes the ranker's scaling (and the model version as user_config).
        if "num_replicas" in scale:
            scale["num_replicas"] = max(args.ingress_replicas, args.ranker_replicas)
        return _options(Ingress, args, version, user_config, **scale).bind(settings, None, feedback)
    ranker = _options(RankerDeployment, args, version, user_config, **scale).bind(settings)
    candidates = _options(CandidateDeployment, args, version, user_config,
                          num_replicas=args.candidate_replicas).bind(settings, ranker)
    return _options(Ingress, args, version, None, num_replicas=args.ingress_replicas).bind(settings, candidates, feedback)
