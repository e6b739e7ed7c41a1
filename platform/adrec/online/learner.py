"""The online learner: feedback log -> attributed examples -> progressive scores -> updates -> versions.

One :class:`OnlineLearner` owns a state folder (default ``<run>/online``)::

    checkpoint.pt     log position + model + optimizer + joiner + queue + catalog + metrics (one atomic file)
    versions/<id>/    published model versions (the newest ``keep_versions``)
    status.json       the latest status summary
    status.jsonl      one record per publication decision (published / refused), restart and flush

A decision is checkpointed first and then appended to ``status.jsonl``, once: a learner that replays
events after a crash reaches the same decision and finds its record there (or, restarting between the
two writes, appends the checkpointed decision it does not find). Published versions are committed to the
base version's registry (the run's ``versions/``, :class:`adrec.model_version.VersionRegistry`) and made
live once rolled out. Pruning keeps the newest ``keep_versions`` versions, the live one and its
predecessor, and whatever ``live_versions()`` names (the actor: a version being rolled out).

Per log record, in log order: the event goes through the :class:`AttributionJoiner`; labelled
impressions queue up; every full mini-batch is scored by the learner's model (before it learns from
it: progressive validation), by the serving version and by the frozen initial model, then the
learner takes one optimizer step on it. Every ``publish_every_events`` learned impressions (or
``publish_every_s`` seconds) the guard compares the learner's and the serving version's progressive
logloss on the events since the last decision and publishes a new version or refuses it.

Exactly once: the state after a record depends only on the state before it and the record, and the
reader's position in the log (:class:`adrec.feedback.Position`: a byte offset in a file log, per-writer
segment numbers in a segment log) is checkpointed with everything else, so a learner killed at any
point and restarted from its checkpoint re-reads exactly the records after it and, on a log that holds
the same records in the same order, ends in the state an uninterrupted run reaches. The learner sees the
log only through :mod:`adrec.feedback`'s interface (:func:`~adrec.feedback.open_log` picks the backend).
(Time-based publication and ``on_refuse="revert"`` together make the weights depend on wall time.)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from adrec.candidates.merge import MultiSource
from adrec.config import OnlineConfig
from adrec.features.row_encoder import RowEncoder
from adrec.feedback import CLICK, CONVERSION, IMPRESSION, Event, open_log
from adrec.model_version import VersionRegistry, load_version, materialize
from adrec.model_version.registry import LIVE, VERSIONS_DIR
from adrec.online.attribution import AttributionJoiner, Example
from adrec.online.catalog import OnlineCatalog
from adrec.online.checkpoint import load_checkpoint, local_state_dir, save_checkpoint
from adrec.online.metrics import EPS, RayGauges, ScoreBoard
from adrec.online.optim import make_optimizer, select_parameters
from adrec.online.publish import STATUS_CURRENT, STATUS_RECORDS, StatusLog, publish_version, version_id
from adrec.ranking.fgsm import EsmmTerms
from adrec.storage import resolve

log = logging.getLogger(__name__)

ONLINE, SERVING, FROZEN = "online", "serving", "frozen"


def _logloss_sum(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).sum())


class OnlineLearner:
    """Learns from the feedback log of a served model version; see the module documentation."""

    def __init__(self, cfg: OnlineConfig, base_model_dir: str | Path, feedback_log: str | Path,
                 state_dir: str | Path, on_publish: Callable[[str, dict], None] | None = None,
                 name: str = "default", export_metrics: bool = True,
                 live_versions: Callable[[], set[str]] | None = None):
        from adrec.ranking.base import load_ranker

        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.name = name
        base_loc = resolve(base_model_dir)
        self.base_dir = materialize(base_loc.uri)
        # The state may live on an object store (it then outlives the node): the checkpoint goes there
        # directly, the status files are kept in a local cache and copied there with every checkpoint.
        self.state_loc = resolve(state_dir)
        self.state_dir = local_state_dir(self.state_loc)
        if not self.state_loc.is_local:
            for name in (STATUS_RECORDS, STATUS_CURRENT):
                if (self.state_loc / name).is_file():
                    (self.state_loc / name).download(self.state_dir / name)
        # The learner's versions go where the base version's came from (the run's registry, on its store);
        # a loose base folder (not in a registry) gets one in the learner's state.
        parent = resolve(base_loc.uri.rsplit("/", 1)[0])
        in_registry = parent.name == VERSIONS_DIR and (parent / LIVE).is_file()
        self.registry = VersionRegistry(parent if in_registry else self.state_loc / VERSIONS_DIR)
        self.reader = open_log(feedback_log).reader()
        self.status_log = StatusLog(self.state_dir)
        self.on_publish = on_publish
        self.live_versions = live_versions

        # encodings, users, histories (the two-stage recommender is not updated online: not loaded)
        self.base = load_version(self.base_dir, load_ranker=False, load_topk=False)
        self.base_version = self.base.version_id
        self.spec = self.base.spec
        self.encoder = RowEncoder(self.spec, self.base.user_codes, self.base.item_codes)
        self.ranker = load_ranker(self.base_dir / "ranker")
        for attr in ("model", "batch", "calibration", "save"):
            if not hasattr(self.ranker, attr):
                raise TypeError(f"online learning needs a ranker with a torch model (.{attr}); "
                                f"{type(self.ranker).__name__} has none")
        self.model = self.ranker.model
        self.model.eval()  # no dropout online: the scores learned from are the scores served
        # A two-task (ESMM) ranker learns its CVR tower from the log's conversions too, with the very loss
        # (terms and weights) it was trained with offline (adrec.ranking.fgsm.EsmmTerms).
        self.esmm = EsmmTerms.of(self.ranker.cfg) if getattr(self.model, "has_cvr", False) else None
        self.params = select_parameters(self.model, list(cfg.train_layers))
        chosen = {id(p) for _, p in self.params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in chosen)
        self.opt = make_optimizer([p for _, p in self.params], cfg)
        self.serving = copy.deepcopy(self.ranker)  # the weights of the version Serve holds
        self.frozen = copy.deepcopy(self.ranker) if cfg.track_frozen else None  # the initial model, never updated
        for r in (self.serving, self.frozen):
            if r is not None:
                r.model.eval()
                for p in r.model.parameters():
                    p.requires_grad_(False)

        self.joiner = AttributionJoiner(cfg.attribution_window_s, cfg.lateness_s, cfg.max_ahead_s)
        self.catalog = OnlineCatalog(self.base.user_pos, self.base.history, self.spec.history_len, self.spec.n_items,
                                     cfg.max_new_users_per_version)
        scorers = [ONLINE, SERVING] + ([FROZEN] if cfg.track_frozen else [])
        self.board = ScoreBoard(scorers, list(cfg.segments_ts), cfg.recent_window)
        self.ready: deque[Example] = deque()
        self.position = self.reader.start()
        self.records = 0  # log records consumed (exactly once)
        self.counters = {"unknown_items": 0, "bad_records": 0, "steps": 0, "skipped_steps": 0, "nonfinite_scores": 0}
        self.examples_learned = 0
        self.serving_version = self.base_version
        self.published: list[dict] = []  # accepted versions, oldest first
        self.refused = 0
        self.guard = {"n": 0, "online": 0.0, "serving": 0.0}
        self.last_decision_examples = 0
        self.last_checkpoint_records = 0
        self.last_publish_time = time.monotonic()
        self.last_decision: dict | None = None
        self.started = time.time()
        self.learn_seconds = 0.0
        self.gauges = RayGauges(name) if export_metrics else None
        # healthy / error / failures / restarts: set by adrec.online.supervise, which restarts a failed learner
        self.health: dict = {"healthy": True, "error": None, "failures": 0, "restarts": 0}
        self.restored = self._restore()

    # ---- state --------------------------------------------------------------------------------------
    def _trainable(self, model) -> dict[str, torch.Tensor]:
        names = {n for n, _ in self.params}
        return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}

    def _load_trainable(self, model, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def state_dict(self) -> dict:
        return {"base_version": self.base_version, "position": self.position.state(), "records": self.records,
                "counters": dict(self.counters), "examples_learned": self.examples_learned,
                "model": self._trainable(self.model), "optimizer": self.opt.state_dict(),
                "optimizer_kind": self.cfg.optimizer, "train_layers": list(self.cfg.train_layers),
                "serving_model": self._trainable(self.serving.model), "serving_version": self.serving_version,
                "joiner": self.joiner.state_dict(), "ready": [e.to_tuple() for e in self.ready],
                "catalog": self.catalog.state_dict(), "board": self.board.state_dict(),
                "published": list(self.published), "refused": self.refused, "guard": dict(self.guard),
                "last_decision_examples": self.last_decision_examples, "last_decision": self.last_decision,
                "learn_seconds": self.learn_seconds}

    def checkpoint(self) -> None:
        save_checkpoint(self.state_loc, self.state_dict())
        self.last_checkpoint_records = self.records
        self.status_log.write(self.status())
        if not self.state_loc.is_local:
            for name in (STATUS_RECORDS, STATUS_CURRENT):
                if (self.state_dir / name).is_file():
                    (self.state_loc / name).upload(self.state_dir / name)

    def _restore(self) -> bool:
        st = load_checkpoint(self.state_loc)
        if st is None:
            return False
        if st["base_version"] != self.base_version:
            raise ValueError(f"{self.state_dir} holds the online state of base version {st['base_version']}, "
                             f"not of {self.base_version} ({self.base_dir}): use another state folder")
        # "offset": a checkpoint from before positions (a file log's byte offset)
        self.position = self.reader.position(st["position"] if "position" in st else st["offset"])
        self.records = int(st["records"])
        self.counters.update(st["counters"])
        self.examples_learned = int(st["examples_learned"])
        self._load_trainable(self.model, st["model"])
        self._load_trainable(self.serving.model, st["serving_model"])
        if st.get("optimizer_kind") == self.cfg.optimizer and st.get("train_layers") == list(self.cfg.train_layers):
            self.opt.load_state_dict(st["optimizer"])
        else:
            log.warning("the checkpoint's optimizer (%s on %s) is not the configured one (%s on %s): the weights "
                        "carry on, the optimizer state starts afresh", st.get("optimizer_kind"), st.get("train_layers"),
                        self.cfg.optimizer, list(self.cfg.train_layers))
        self.serving_version = st["serving_version"]
        self.joiner.load_state_dict(st["joiner"])
        self.ready = deque(Example.from_tuple(t) for t in st["ready"])
        self.catalog.load_state_dict(st["catalog"])
        try:
            self.board.load_state_dict(st["board"])
        except ValueError as err:  # the scorers or segments were reconfigured: new metrics from here on
            log.warning("progressive metrics start afresh: %s", err)
        self.published, self.refused = list(st["published"]), int(st["refused"])
        self.guard = dict(st["guard"])
        self.last_decision_examples = int(st["last_decision_examples"])
        self.last_decision = st.get("last_decision")
        self.learn_seconds = float(st.get("learn_seconds", 0.0))
        self.last_checkpoint_records = self.records
        log.info("online learner %s resumed at record %d (position %s): %d impressions learned, serving %s",
                 self.name, self.records, self.position.state(), self.examples_learned, self.serving_version)
        self.status_log.append({"event": "resumed", "records": self.records, "position": self.position.state(),
                                "examples_learned": self.examples_learned, "serving_version": self.serving_version})
        if self.last_decision is not None:  # stopped between the checkpoint and the record of its decision
            self.status_log.append_once(self.last_decision)
        return True

    # ---- rows ---------------------------------------------------------------------------------------
    def rows(self, examples: list[Example]) -> pd.DataFrame:
        """Ranker input rows, encoded as serving encodes them (per-row context, the user's history then)."""
        n = len(examples)
        return self.encoder.encode(np.fromiter((self.catalog.base_index(e.user) for e in examples), np.int64, n),
                                   np.fromiter((e.item_idx for e in examples), np.int64, n),
                                   [e.context for e in examples], [e.hist for e in examples])

    def _probs(self, logits: torch.Tensor, ranker) -> np.ndarray:
        a, b = ranker.calibration
        z = (a * logits.detach().double() + b).numpy()
        bad = ~np.isfinite(z)
        if bad.any():  # a diverged model: scored as uninformative (and counted); the guard will refuse it
            self.counters["nonfinite_scores"] += int(bad.sum())
            z = np.where(bad, 0.0, z)
        return np.clip(1.0 / (1.0 + np.exp(-np.clip(z, -50, 50))), EPS, 1 - EPS)

    # ---- learning -----------------------------------------------------------------------------------
    def _learn(self, batch: list[Example]) -> None:
        t0 = time.perf_counter()
        rows = self.rows(batch)
        b = self.ranker.batch(rows)
        y = np.fromiter((e.label for e in batch), np.float64, len(batch))
        ts = np.fromiter((e.ts for e in batch), np.float64, len(batch))
        probs = {}
        with torch.inference_mode():
            probs[SERVING] = self._probs(self.serving.model(dict(b)), self.serving)
            if self.frozen is not None:
                probs[FROZEN] = self._probs(self.frozen.model(dict(b)), self.frozen)
        a, c = self.ranker.calibration
        member_logits = getattr(self.model, "member_logits", None)
        if self.esmm is not None:  # clicks and conversions: ESMM's loss of each member's two towers
            ctr, cvr = self.model.member_task_logits(self.model.embed(dict(b)), dict(b))
            logits = ctr.mean(0)
            clicks = torch.as_tensor(y, dtype=torch.float32)
            conv = torch.as_tensor(np.fromiter((e.conversion for e in batch), np.float32, len(batch)))
            # pCTR and pCVR in the loss are the calibrated ones serving multiplies (FusionRanker.predict_tasks)
            a_v, c_v = self.ranker.cvr_calibration
            loss = torch.stack([self.esmm(a * ctr[i] + c, a_v * cvr[i] + c_v, clicks, conv)
                                for i in range(len(ctr))]).mean()
        elif member_logits is not None:  # a deep ensemble: each member learns on its own, the mean is served
            per_member = member_logits(self.model.embed(dict(b)), dict(b))
            logits = per_member.mean(0)
            target = torch.as_tensor(y, dtype=logits.dtype).expand_as(per_member)
            loss = F.binary_cross_entropy_with_logits(a * per_member + c, target)
        else:
            logits = self.model(dict(b))
            loss = F.binary_cross_entropy_with_logits(a * logits + c, torch.as_tensor(y, dtype=logits.dtype))
        probs[ONLINE] = self._probs(logits, self.ranker)  # scored before the update below
        self.opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            self.opt.step()
        else:  # never step on a non-finite loss (it would poison every weight it touches)
            self.counters["skipped_steps"] += 1
        self.board.update(probs, y, ts)
        self.guard["n"] += len(batch)
        self.guard["online"] += _logloss_sum(probs[ONLINE], y)
        self.guard["serving"] += _logloss_sum(probs[SERVING], y)
        self.examples_learned += len(batch)
        self.counters["steps"] += 1
        self.learn_seconds += time.perf_counter() - t0

    def _drain(self, partial: bool = False) -> None:
        bs = self.cfg.batch_size
        while len(self.ready) >= bs or (partial and self.ready):
            batch = [self.ready.popleft() for _ in range(min(bs, len(self.ready)))]
            self._learn(batch)
            self._maybe_publish()

    def _consume(self, ev: Event) -> None:
        item = self.base.item_pos.get(ev.item)
        if item is None:
            self.counters["unknown_items"] += 1
            return
        if ev.type == IMPRESSION:
            hist = self.catalog.history(ev.user)
            self.catalog.impression(ev.user, item)
            self.ready.extend(self.joiner.impression(ev.event_id, ev.user, item, ev.ts, ev.context, hist))
        elif ev.type == CLICK:
            self.catalog.click(ev.user, item)
            self.ready.extend(self.joiner.click(ev.user, item, ev.ts))
        elif ev.type == CONVERSION and self.esmm is not None:  # a click-only model learns nothing from it
            self.ready.extend(self.joiner.conversion(ev.user, item, ev.ts))

    def step(self, max_records: int | None = None) -> int:
        """Consume up to ``max_records`` new log records (what is there now); returns how many."""
        self._drain()  # a queue restored from a checkpoint is learned before anything new is read
        res = self.reader.read(self.position, max_records or self.cfg.read_batch_events)
        for ev, after in res.records:
            if ev is None:
                self.counters["bad_records"] += 1
            else:
                self._consume(ev)
            self.position = after
            self.records += 1
            self._drain()
        self.position = res.end
        if self.cfg.publish_every_s and time.monotonic() - self.last_publish_time >= self.cfg.publish_every_s:
            self.decide(reason="time")
        if self.records - self.last_checkpoint_records >= self.cfg.checkpoint_every_events:
            self.checkpoint()
        if res.records:
            self.export_metrics()
        return len(res.records)

    def run_until_caught_up(self, max_seconds: float | None = None) -> int:
        """Consume every record in the log now (for tests and batch use); returns how many."""
        total = 0
        deadline = time.monotonic() + max_seconds if max_seconds else None
        while True:
            n = self.step()
            total += n
            if n == 0 or (deadline and time.monotonic() > deadline):
                return total

    def flush(self) -> None:
        """End of stream: label every pending impression now, learn the rest (a last partial batch too)."""
        self.ready.extend(self.joiner.flush())
        self._drain(partial=True)
        self.status_log.append({"event": "flushed", "records": self.records, "examples_learned": self.examples_learned})
        self.checkpoint()
        self.export_metrics()

    # ---- publication ----------------------------------------------------------------------------------
    def _maybe_publish(self) -> None:
        every = self.cfg.publish_every_events
        if every and self.examples_learned - self.last_decision_examples >= every:
            self.decide(reason="events")

    def guard_view(self) -> dict:
        n = self.guard["n"]
        on = self.guard["online"] / n if n else math.nan
        srv = self.guard["serving"] / n if n else math.nan
        return {"events": n, "online_logloss": on, "serving_logloss": srv,
                "limit": srv * (1 + self.cfg.guard_margin) if n else math.nan}

    def decide(self, reason: str = "manual", force: bool = False) -> dict | None:
        """Publish the learner's weights as a new version, or refuse them (the guard); None: too few events."""
        g = self.guard_view()
        if self.examples_learned == self.last_decision_examples or g["events"] == 0 \
                or (g["events"] < self.cfg.guard_min_events and not force):
            return None
        vid = version_id(self.base_version, self.examples_learned)
        record = {"version": vid, "reason": reason, "records": self.records, "position": self.position.state(),
                  "examples_learned": self.examples_learned, "serving_version": self.serving_version,
                  "guard": g, "margin": self.cfg.guard_margin}
        if not (g["online_logloss"] <= g["limit"]):
            record["event"] = "refused"
            self.refused += 1
            log.warning("online learner %s refused version %s: progressive logloss %.5f is worse than the serving "
                        "version's %.5f by more than %.1f%% over the last %d events (keeps serving %s)",
                        self.name, vid, g["online_logloss"], g["serving_logloss"], 100 * self.cfg.guard_margin,
                        g["events"], self.serving_version)
            if self.cfg.on_refuse == "revert":
                self._load_trainable(self.model, self._trainable(self.serving.model))
                self.opt = make_optimizer([p for _, p in self.params], self.cfg)
                record["reverted_to"] = self.serving_version
        else:
            info = {"examples_learned": self.examples_learned, "records": self.records, "guard": g,
                    "parent_serving": self.serving_version, "learner": self.name}
            self.ranker.info = {**dict(self.ranker.info or {}), "online": info}
            entry, meta = publish_version(self.base_dir, self.registry, vid, self.ranker, self.catalog,
                                          self._sources() if self.cfg.fold_in else None, self.cfg.fold_in, info)
            path = entry.uri
            self._load_trainable(self.serving.model, self._trainable(self.model))
            self.serving_version = vid
            self.published.append({"version": vid, "path": str(path), "examples_learned": self.examples_learned,
                                   "records": self.records})
            self.catalog.published()
            # The base version stays too: fold-in and a restart of this learner read it.
            keep = {p["version"] for p in self.published[-self.cfg.keep_versions:]} | {self.base_version}
            self.registry.prune(self.cfg.keep_versions,
                                also_keep=keep | (self.live_versions() if self.live_versions else set()))
            record.update(event="published", path=str(path), fold_in=meta.get("online", {}).get("fold_in"))
            log.info("online learner %s published %s (progressive logloss %.5f vs serving %.5f over %d events)",
                     self.name, vid, g["online_logloss"], g["serving_logloss"], g["events"])
        self.guard = {"n": 0, "online": 0.0, "serving": 0.0}
        self.last_decision_examples = self.examples_learned
        self.last_publish_time = time.monotonic()
        self.last_decision = record
        self.checkpoint()  # the decision and the state it was made in are durable together
        self.status_log.append_once(record)
        if record["event"] == "published":
            try:
                if self.on_publish is not None:
                    self.on_publish(record["path"], record)
                self.registry.set_live(entry.number)  # served now (or, without a Serve app, what one would load)
            except Exception as err:  # a failed rollout must not stop learning; it is in the status
                log.error("rollout of %s failed: %s", vid, err)
                self.status_log.append({"event": "rollout_failed", "version": vid, "error": repr(err)})
        return record

    def _sources(self):
        return MultiSource.load(self.base.paths.candidates)  # a fresh copy: fold-in is applied from the base

    @property
    def latest_version_dir(self) -> str:
        """The newest published version's location (a path or URI), else the base version's folder."""
        return self.published[-1]["path"] if self.published else str(self.base_dir)

    # ---- reporting ------------------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"records": self.records, "position": self.position.state(), "examples_learned": self.examples_learned,
                "pending": self.joiner.n_pending, "queued": len(self.ready), "published": len(self.published),
                "refused": self.refused, "new_users": len(self.catalog.new_users),
                "refused_new_users": self.catalog.refused_users, "refused_new_user_events": self.catalog.refused_events,
                "log_bytes": self.reader.size(), **self.joiner.counts, **self.counters}

    def status(self) -> dict:
        return {"learner": self.name, **self.health, "base_version": self.base_version, "base_dir": str(self.base_dir),
                "serving_version": self.serving_version, "latest_version_dir": str(self.latest_version_dir),
                "counts": self.counts(), "metrics": self.board.summary(), "guard": self.guard_view(),
                "last_decision": self.last_decision, "published": self.published[-self.cfg.keep_versions:],
                "learn_seconds": round(self.learn_seconds, 3),
                "examples_per_learn_second": round(self.examples_learned / self.learn_seconds, 1)
                if self.learn_seconds else None}

    def export_metrics(self) -> None:
        if self.gauges is not None:
            self.gauges.export(self.board.summary(), self.counts())

    def model_state(self) -> dict[str, torch.Tensor]:
        """The learner's trainable weights (what the exactly-once check compares)."""
        return self._trainable(self.model)
