"""Progressive validation: every example is scored before it is learned from.

:class:`Progressive` keeps, per scorer, constant-size running statistics from which AUC (ties count
half, up to ties inside one of the ``n_bins`` logit bins), logloss (natural log, probabilities clipped
to [1e-7, 1 - 1e-7] as in :mod:`adrec.metrics`) and calibration (mean predicted
probability / observed click rate) come out at any time. :class:`RecentWindow` holds the last N
(probability, label) pairs for exact metrics over a sliding window. :class:`RayGauges` exports the
numbers as Ray metrics (``ray.util.metrics.Gauge``).
"""

from __future__ import annotations

import logging
import math
from collections import deque

import numpy as np

log = logging.getLogger(__name__)

EPS = 1e-7
LOGIT_RANGE = 16.0


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _logloss_terms(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin positive/negative counts (bins in ascending score order; same bin = tie)."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


class Progressive:
    """Running AUC / logloss / calibration of one scorer."""

    def __init__(self, n_bins: int = 6400):
        self.n_bins = int(n_bins)
        self.pos = np.zeros(self.n_bins, dtype=np.int64)
        self.neg = np.zeros(self.n_bins, dtype=np.int64)
        self.n = 0
        self.clicks = 0
        self.sum_p = 0.0
        self.sum_loss = 0.0

    def _bins(self, p: np.ndarray) -> np.ndarray:
        z = _logit(p)
        b = np.floor((z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * self.n_bins).astype(np.int64)
        return np.clip(b, 0, self.n_bins - 1)

    def update(self, p: np.ndarray, y: np.ndarray) -> None:
        p = np.asarray(p, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if len(p) == 0:
            return
        b = self._bins(p)
        self.pos += np.bincount(b[y == 1], minlength=self.n_bins)
        self.neg += np.bincount(b[y == 0], minlength=self.n_bins)
        self.n += len(p)
        self.clicks += int(y.sum())
        self.sum_p += float(p.sum())
        self.sum_loss += float(_logloss_terms(p, y).sum())

    @property
    def auc(self) -> float:
        return auc_from_hist(self.pos, self.neg)

    @property
    def logloss(self) -> float:
        return self.sum_loss / self.n if self.n else math.nan

    @property
    def calibration(self) -> float:
        return (self.sum_p / self.n) / (self.clicks / self.n) if self.clicks else math.nan

    def summary(self) -> dict:
        return {"n": self.n, "clicks": self.clicks, "ctr": self.clicks / self.n if self.n else math.nan,
                "auc": self.auc, "logloss": self.logloss, "calibration": self.calibration}

    def state_dict(self) -> dict:
        return {"n_bins": self.n_bins, "pos": self.pos.copy(), "neg": self.neg.copy(), "n": self.n,
                "clicks": self.clicks, "sum_p": self.sum_p, "sum_loss": self.sum_loss}

    @classmethod
    def from_state(cls, s: dict) -> "Progressive":
        m = cls(s["n_bins"])
        m.pos, m.neg = np.asarray(s["pos"], np.int64).copy(), np.asarray(s["neg"], np.int64).copy()
        m.n, m.clicks, m.sum_p, m.sum_loss = int(s["n"]), int(s["clicks"]), float(s["sum_p"]), float(s["sum_loss"])
        return m


class RecentWindow:
    """The last ``size`` (probability, label) pairs: exact AUC/logloss/calibration over them."""

    def __init__(self, size: int):
        self.size = int(size)
        self.p: deque = deque(maxlen=self.size)
        self.y: deque = deque(maxlen=self.size)

    def update(self, p: np.ndarray, y: np.ndarray) -> None:
        self.p.extend(float(v) for v in p)
        self.y.extend(int(v) for v in y)

    def summary(self) -> dict:
        from adrec.metrics import auc, calibration, logloss

        if not self.p:
            return {"n": 0, "auc": math.nan, "logloss": math.nan, "calibration": math.nan}
        p, y = np.asarray(self.p), np.asarray(self.y)
        return {"n": len(p), "auc": float(auc(y, p)), "logloss": float(logloss(y, p)), "calibration": float(calibration(y, p))}

    def state_dict(self) -> dict:
        return {"size": self.size, "p": list(self.p), "y": list(self.y)}

    @classmethod
    def from_state(cls, s: dict) -> "RecentWindow":
        w = cls(s["size"])
        w.p.extend(s["p"])
        w.y.extend(s["y"])
        return w


class ScoreBoard:
    """Progressive metrics of several scorers (online, serving, frozen), overall, per event-time segment
    and over the recent window."""

    def __init__(self, scorers: list[str], segments_ts: list[float], recent: int):
        self.scorers = list(scorers)
        self.bounds = sorted(float(b) for b in segments_ts)
        self.total = {s: Progressive() for s in self.scorers}
        self.segments = [{s: Progressive() for s in self.scorers} for _ in range(len(self.bounds) + 1)]
        self.recent = {s: RecentWindow(recent) for s in self.scorers}

    def update(self, probs: dict[str, np.ndarray], y: np.ndarray, ts: np.ndarray) -> None:
        seg = np.searchsorted(np.asarray(self.bounds), np.asarray(ts, dtype=np.float64), side="right")
        for s, p in probs.items():
            if s not in self.total:
                continue
            self.total[s].update(p, y)
            self.recent[s].update(p, y)
            for k in np.unique(seg):
                m = seg == k
                self.segments[int(k)][s].update(p[m], y[m])

    def summary(self) -> dict:
        segs = []
        edges = [-math.inf, *self.bounds, math.inf]
        for k, seg in enumerate(self.segments):
            segs.append({"from_ts": edges[k], "to_ts": edges[k + 1], **{s: seg[s].summary() for s in self.scorers}})
        return {"total": {s: self.total[s].summary() for s in self.scorers},
                "recent": {s: self.recent[s].summary() for s in self.scorers}, "segments": segs}

    def pooled(self, segments: list[int]) -> dict:
        """Metrics over the union of some segments (the running statistics add up exactly)."""
        out = {}
        for s in self.scorers:
            m = Progressive(self.total[s].n_bins)
            for k in segments:
                part = self.segments[k][s]
                m.pos += part.pos
                m.neg += part.neg
                m.n += part.n
                m.clicks += part.clicks
                m.sum_p += part.sum_p
                m.sum_loss += part.sum_loss
            out[s] = m.summary()
        return out

    def state_dict(self) -> dict:
        return {"scorers": self.scorers, "bounds": self.bounds,
                "total": {s: m.state_dict() for s, m in self.total.items()},
                "segments": [{s: m.state_dict() for s, m in seg.items()} for seg in self.segments],
                "recent": {s: w.state_dict() for s, w in self.recent.items()}}

    def load_state_dict(self, st: dict) -> None:
        if list(st["scorers"]) != self.scorers or [float(b) for b in st["bounds"]] != self.bounds:
            raise ValueError(f"checkpointed metrics track {st['scorers']} over segments {st['bounds']}, "
                             f"the configuration asks for {self.scorers} over {self.bounds}")
        self.total = {s: Progressive.from_state(v) for s, v in st["total"].items()}
        self.segments = [{s: Progressive.from_state(v) for s, v in seg.items()} for seg in st["segments"]]
        self.recent = {s: RecentWindow.from_state(v) for s, v in st["recent"].items()}


class RayGauges:
    """``adrec_online_*`` gauges tagged by scorer (online / serving / frozen) and window (total / recent).

    Created only inside a Ray process; elsewhere :meth:`export` does nothing.
    """

    def __init__(self, learner: str = "default"):
        self.enabled = False
        try:
            import ray

            if not ray.is_initialized():
                return
            from ray.util.metrics import Gauge

            tags = ("learner", "model", "window")
            self.auc = Gauge("adrec_online_auc", "progressive AUC (scored before learning)", tag_keys=tags)
            self.logloss = Gauge("adrec_online_logloss", "progressive logloss (scored before learning)", tag_keys=tags)
            self.calibration = Gauge("adrec_online_calibration", "progressive mean prediction / click rate",
                                     tag_keys=tags)
            self.counters = Gauge("adrec_online_count", "online learner counters (events, examples, versions)",
                                  tag_keys=("learner", "what"))
            self.learner = learner
            self.enabled = True
        except Exception as err:  # metrics are an export, never a reason to stop learning
            log.warning("Ray metrics unavailable: %s", err)

    def export(self, summary: dict, counters: dict) -> None:
        if not self.enabled:
            return
        for window in ("total", "recent"):
            for model, m in summary.get(window, {}).items():
                tags = {"learner": self.learner, "model": model, "window": window}
                for gauge, key in ((self.auc, "auc"), (self.logloss, "logloss"), (self.calibration, "calibration")):
                    v = m.get(key)
                    if v is not None and math.isfinite(v):
                        gauge.set(float(v), tags=tags)
        for what, v in counters.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.counters.set(float(v), tags={"learner": self.learner, "what": what})
