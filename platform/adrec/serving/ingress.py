"""HTTP in, JSON out: the FastAPI app (its OpenAPI docs at /docs and /openapi.json) and the Ingress deployment.

The ingress authenticates (``x-api-key``), reads bodies with a byte cap, validates them strictly
(:mod:`adrec.serving.schemas`) and pseudonymizes user ids: the other deployments, the feedback log and
every log line see pseudonyms only. Client errors are :class:`ApiError` (4xx with a message);
failures inside the app answer 503. In the fused topology the Ingress replica holds the model version
itself (a :class:`~adrec.serving.holder.VersionHolder`) and runs the request algorithm here, ranking
batched across its concurrent requests with ``@serve.batch``; in the graph it forwards to the
CandidateDeployment. ``/feedback`` goes to the FeedbackDeployment (one replica; several on a segment log),
or, in the fused topology on a segment log (``serve.feedback_writer``), is written by this replica itself.
"""

import asyncio
import hmac
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from adrec import __version__
from adrec.data.ids import normalize_id
from adrec.data.privacy import pseudonymize
from adrec.serving.abtest import assigner
from adrec.serving.args import AppArgs
from adrec.serving.deployments import FeedbackDeployment
from adrec.serving.holder import VersionHolder
from adrec.serving.replica import call, single_threaded
from adrec.serving.request import Recommendation
from adrec.serving.responses import (ErrorResponse, FeedbackResponse, HealthResponse, RecommendResponse,
                                     VersionResponse, version_info)
from adrec.errors import ApiError
from adrec.serving.schemas import SERVED_FIELDS, FeedbackRequest, RecommendRequest, decode_json, read_body, validate
from adrec.serving.scoring import rank_grouped
from adrec.serving.strategy import Strategy

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"

api = FastAPI(title="adrec", description="Ad recommendations: candidates, then a fine-tuned ranker. Every endpoint "
              "but /healthz wants the API key (x-api-key header) when the app has one.", version=__version__)
# The request bodies are parsed by hand (schemas.py: byte cap, strict JSON, strict models), not by
# FastAPI: their models are added to the docs here, by name.
_REQUEST_MODELS = (RecommendRequest, FeedbackRequest)


def _documented_body(model) -> dict:
    """The ``requestBody`` of an operation whose body is ``model`` (documented, parsed by hand)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": _ERROR_TEXT[s]} for s in statuses}


_ERROR_TEXT = {400: "The body is not valid JSON (or empty, or not UTF-8).", 401: "No API key.", 403: "Wrong API key.",
               413: "The body is over the size limit.", 422: "The body does not fit the request model.",
               503: "Not ready, overloaded or a part of the app is down: retry later."}


def _openapi() -> dict:
    """FastAPI's schema plus the request models (referenced by :func:`_documented_body`)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        _, defs = models_json_schema([(m, "validation") for m in _REQUEST_MODELS],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


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


# What /recommend answers beside user_id and items (the request algorithm's answer: adrec.serving.request).
ANSWER_FIELDS = ("version", "ranked_by", "objective", "policy", "request_id", "arm")


def logged_event(e, user: str, arm_of) -> dict:
    """A validated /feedback event as the log holds it: the pseudonym for the raw id; an impression with its
    serving fields (position, propensity, policy, request_id, as the client reports them from the answer)
    and its A/B arm, decided here from the user (None without A/B): never taken from the client."""
    out = {"event_id": e.event_id, "user": user, "item": normalize_id(e.item), "type": e.type, "ts": e.ts,
           "context": {k: v for k, v in e.context.items()}}
    for f in SERVED_FIELDS:
        if getattr(e, f) is not None:
            out[f] = getattr(e, f)
    if e.type == "impression":
        out["arm"] = arm_of(user)
    return out


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP in, JSON out. ``candidates`` is None in the fused topology: the replica then holds the
    model version (its ``user_config``) and answers /recommend and /version itself."""

    def __init__(self, settings: AppArgs, candidates: DeploymentHandle | None, feedback: DeploymentHandle):
        self.settings = settings
        self.key = settings.key_bytes()
        self.api_key = settings.api_key_bytes()  # None: no authentication (loopback only, see deploy.preflight)
        self.candidates = candidates
        self.feedback = feedback
        # fused: the live Recommender (with its ranker) and its swaps
        self.holder = VersionHolder(settings, load_ranker=True, role="fused ingress")
        # A writer of the segment log of its own in this replica (serve.feedback_writer): /feedback then makes no
        # handle call, whose cost on both sides was most of the request's CPU. The same class as the
        # FeedbackDeployment's, so the same checks and records.
        self.writer = FeedbackDeployment.func_or_class(settings) \
            if candidates is None and settings.ingress_writes_feedback() else None
        self.strategy = Strategy.from_settings(settings)
        self.arm_of = assigner(settings.ab)  # pseudonym -> A/B arm (None without A/B), the same in every replica
        if candidates is None:
            single_threaded()
            self._rank_batch.set_max_batch_size(settings.max_batch_size)
            self._rank_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    # ---- fused topology: the model version lives in this replica --------------------------------------
    async def reconfigure(self, config: dict) -> None:
        if self.writer is not None:  # the items an event may name: the version's, as the writer replica reads them
            await self.writer.reconfigure(config)
        await self.holder.reconfigure(config)

    def loaded(self) -> dict:
        return self.holder.loaded()

    def app_settings(self) -> AppArgs:
        """The settings this app was deployed with (every topology has an Ingress): a rollout from another
        process (the learner's job) changes the version only, not what that process's own config says."""
        return self.settings

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, recs: list, users: list, items: list, contexts: list) -> list:
        async def resolve(i: int):
            return recs[i]

        return await rank_grouped(recs, resolve, users, items, contexts)

    async def _recommend_here(self, user: str, k: int, context: dict, explain: bool, arm: str | None) -> dict:
        rec, _ = self.holder.rec_for(arm)  # one version for the whole request, even if a rollout swaps it meanwhile
        u = rec.pseudonym_index(user)

        async def rank(items: np.ndarray) -> tuple:
            ranked = await self._rank_batch(rec, u, items, context)
            if "error" in ranked:
                raise RuntimeError(ranked["error"])
            return ranked["scores"], ranked.get("ctcvr")

        async def explain_fn(items: np.ndarray) -> dict:
            return await asyncio.to_thread(rec.explain, u, np.asarray(items, np.int64), context,
                                           self.settings.explain_budget_ms, self.settings.explain_max_items)

        req = Recommendation(rec, u, k, context, self.settings.n_candidates, explain, self.strategy, arm)
        return await req.run_async(rank, explain_fn)

    def check_health(self) -> None:
        if self.candidates is None and self.holder.rec is None:
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
        return await self._guarded(getattr(method, "_method_name", "call"), call(method, *args))

    @api.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse,
                                                                         "description": "Not ready."}})
    async def healthz(self) -> JSONResponse:
        # Healthy or not, nothing else: the probe needs no key, so it tells an anonymous caller no version,
        # no reason (GET /version has them, behind the key).
        if self.candidates is None:
            ok = self.holder.rec is not None
        else:
            try:
                await asyncio.wait_for(self.candidates.version.remote(), timeout=5)
                ok = True
            except Exception:
                ok = False
        return JSONResponse({"status": "ok"} if ok else {"status": "unavailable"}, status_code=200 if ok else 503)

    @api.get("/version", response_model=VersionResponse, responses=_errors(401, 403, 503))
    async def version(self, request: Request) -> dict:
        self._auth(request)
        if self.candidates is None:
            return version_info(self.holder.rec)
        return await self._graph(self.candidates.version)

    @api.post("/recommend", response_model=RecommendResponse, openapi_extra=_documented_body(RecommendRequest),
              responses=_errors(400, 401, 403, 413, 422, 503))
    async def recommend(self, request: Request) -> JSONResponse:
        req: RecommendRequest = await self._body(request, RecommendRequest, max_k=self.settings.max_k)
        context = {k: str(v) for k, v in req.context.items()}
        user = pseudonymize(normalize_id(req.user_id), self.key)
        arm = self.arm_of(user)
        if self.candidates is None:
            out = await self._guarded("recommend", self._recommend_here(user, req.k, context, req.explain, arm))
        else:
            out = await self._graph(self.candidates.recommend, user, req.k, context, req.explain, arm)
        # A plain JSONResponse: the answer is already JSON types, and FastAPI's encoder walk of it cost
        # a measurable share of a request's CPU.
        body = {"user_id": req.user_id, **{f: out[f] for f in ANSWER_FIELDS}, "items": out["items"]}
        if "explain_complete" in out:  # with explain: whether every item got its attributions
            body["explain_complete"] = out["explain_complete"]
        return JSONResponse(body)

    @api.post("/feedback", response_model=FeedbackResponse, openapi_extra=_documented_body(FeedbackRequest),
              responses=_errors(400, 401, 403, 413, 422, 503))
    async def feedback(self, request: Request) -> JSONResponse:
        s = self.settings
        req: FeedbackRequest = await self._body(request, FeedbackRequest, now=time.time(),
                                                max_ahead_s=s.feedback_max_ahead_s, max_behind_s=s.feedback_max_behind_s)
        events = [logged_event(e, pseudonymize(normalize_id(e.user_id), self.key), self.arm_of) for e in req.events]
        if self.writer is not None:
            out = await self._guarded("append", self.writer.append(events))
        else:
            out = await self._graph(self.feedback.append, events)
        status = out.pop("status")
        if status != 200:
            raise ApiError(status, out["detail"])
        return JSONResponse(out, status_code=200)
