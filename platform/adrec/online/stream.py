"""Feedback streams: impressions (with their clicks) as ``POST /feedback`` events, sent or logged.

- :func:`feedback_events` turns an impressions table (raw user id, item id, ts, click label, context
  columns) into API events: one ``impression`` per row and, for a clicked row, one ``click`` a short,
  deterministic delay later (inside the attribution window), in timestamp order; with ``conversion`` (a 0/1
  column), one ``conversion`` after each converted click, again inside the window.
- :func:`post_feedback` sends them to a running app over HTTP in batches (what clients do).
- :func:`write_feedback_log` appends them to a feedback log directly, exactly as the Serve app's
  feedback writer would (pseudonymized users): tests of the learner without Serve use it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def feedback_events(impressions: pd.DataFrame, *, user: str = "user_id", item: str = "ad_id", ts: str = "ts",
                    label: str = "clicked", context: list[str] | None = None, click_delay_s: tuple[float, float] = (2.0, 120.0),
                    seed: int = 0, prefix: str = "ev", conversion: str | None = None,
                    conversion_delay_s: tuple[float, float] = (1.0, 600.0)) -> list[dict]:
    """API events for ``impressions`` (ordered by time): impressions, clicks after clicked ones and, with
    ``conversion``, conversions after converted clicks (a conversion without a click is not emitted)."""
    rng = np.random.default_rng(seed)
    df = impressions.reset_index(drop=True)
    ctx_cols = list(context or [])
    n = len(df)
    delays = rng.uniform(click_delay_s[0], click_delay_s[1], n)
    out = []
    users = df[user].astype(str).to_numpy()
    items = df[item].astype(str).to_numpy()
    times = df[ts].to_numpy(dtype=np.float64)
    labels = df[label].to_numpy(dtype=np.int64)
    converted = df[conversion].to_numpy(dtype=np.int64) if conversion else np.zeros(n, dtype=np.int64)
    conv_delays = rng.uniform(conversion_delay_s[0], conversion_delay_s[1], n) if conversion else None
    ctx_values = {c: df[c].astype(str).to_numpy() for c in ctx_cols}
    for i in range(n):
        ctx = {c: ctx_values[c][i] for c in ctx_cols}
        out.append({"event_id": f"{prefix}-{i}-imp", "user_id": users[i], "item": items[i], "type": "impression",
                    "ts": float(times[i]), "context": ctx})
        if labels[i]:
            out.append({"event_id": f"{prefix}-{i}-clk", "user_id": users[i], "item": items[i], "type": "click",
                        "ts": float(times[i] + delays[i]), "context": ctx})
            if converted[i]:
                out.append({"event_id": f"{prefix}-{i}-cnv", "user_id": users[i], "item": items[i],
                            "type": "conversion", "ts": float(times[i] + delays[i] + conv_delays[i]), "context": ctx})
    out.sort(key=lambda e: (e["ts"], e["event_id"]))
    return out


def write_feedback_log(path: str | Path, events: list[dict], key: bytes, version: str | None = None,
                       batch: int | None = None) -> int:
    """Append ``events`` to the feedback log at ``path`` (a file or a URI: :func:`adrec.feedback.open_log`) as
    the app's feedback writer does, ``batch`` events per request (default: one request); returns how many."""
    from adrec.data.ids import normalize_id
    from adrec.data.privacy import pseudonymize
    from adrec.feedback import open_log

    fl = open_log(path).writer()
    try:
        now = time.time()
        records = [{"event_id": e["event_id"], "user": pseudonymize(normalize_id(e["user_id"]), key), "item": normalize_id(e["item"]),
                    "type": e["type"], "ts": e["ts"], "context": dict(e.get("context") or {}), "received_at": now,
                    "version": version} for e in events]
        step = batch or max(1, len(records))
        return sum(len(fl.append(records[i:i + step]).accepted) for i in range(0, len(records), step))
    finally:
        fl.close()


def post_feedback(base_url: str, events: list[dict], batch: int = 50, headers: dict | None = None,
                  rate_events_per_s: float | None = None, timeout_s: float = 30.0, stop=None) -> dict:
    """POST ``events`` to ``base_url/feedback`` in batches (retrying 503s); optional rate limit in events/s."""
    import httpx

    sent = accepted = duplicates = retries = 0
    latencies = []
    t0 = time.perf_counter()
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers or {}, timeout=timeout_s) as client:
        for start in range(0, len(events), batch):
            if stop is not None and stop.is_set():
                break
            chunk = events[start:start + batch]
            if rate_events_per_s:
                due = t0 + (start + len(chunk)) / rate_events_per_s
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            for attempt in range(6):
                t = time.perf_counter()
                r = client.post("/feedback", json={"events": chunk})
                latencies.append(time.perf_counter() - t)
                if r.status_code == 200:
                    body = r.json()
                    accepted += body["accepted"]
                    duplicates += body["duplicates"]
                    break
                if r.status_code != 503 or attempt == 5:
                    raise RuntimeError(f"POST /feedback answered {r.status_code}: {r.text[:300]}")
                retries += 1
                time.sleep(0.2 * (attempt + 1))
            sent += len(chunk)
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {"sent": sent, "accepted": accepted, "duplicates": duplicates, "retries": retries,
            "seconds": round(time.perf_counter() - t0, 3), "requests": len(latencies),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}
