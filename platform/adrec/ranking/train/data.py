"""What a training worker reads: the splits as plain arrays, per-row weights, batches on the device."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from adrec.config import RankerConfig
from adrec.features.split import TRAIN, VALID
from adrec.ranking.collab import training_features
from adrec.ranking.data import rows_to_arrays, take
from adrec.ranking.fusion import FusionRanker

# Arrays of a split that are not model inputs (the loop reads them itself).
_NOT_MODEL_INPUTS = {"label", "ts", "weight"}


def prepare_data(cfg: RankerConfig, features) -> dict:
    """Everything a training worker needs, as plain arrays (put once in the object store)."""
    spec = features.spec
    inter = features.interactions
    arch = FusionRanker.build_arch(cfg, spec)
    out = {"spec": spec, "items": features.items, "users": features.users, "arch": arch}
    dense = None
    if cfg.collab:  # leakage-free per split; the ranker keeps the scorer fitted on train + valid
        dense, out["collab"] = training_features(inter, spec.n_users, spec.n_items, cfg.collab, cfg.seed)
    for split in (TRAIN, VALID):
        rows = inter[inter["split"] == split]
        if len(rows) == 0:
            raise ValueError(f"no '{split}' rows in the features: the ranker trains on train and selects on valid")
        arrays = rows_to_arrays(rows, arch)
        if dense is not None:
            arrays["dense"] = dense[split]
        arrays["label"] = rows["label"].to_numpy(dtype=np.float32)
        arrays["ts"] = pd.to_numeric(rows["ts"], errors="coerce").to_numpy(dtype=np.float64) if "ts" in rows \
            else np.arange(len(rows), dtype=np.float64)
        out[split] = arrays
    return out


def recency_weights(user: np.ndarray, ts: np.ndarray, half_life: float | None) -> np.ndarray:
    """Per-row weights halving every ``half_life`` of the user's timeline back from their latest row (mean 1)."""
    n = len(user)
    if not half_life or n == 0:
        return np.ones(n, dtype=np.float32)
    order = np.lexsort((ts, user))
    u = user[order]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)
    span = np.maximum(np.repeat(counts, counts) - 1, 1)
    age = (np.repeat(counts, counts) - 1 - pos) / span
    w = np.empty(n, dtype=np.float64)
    w[order] = 0.5 ** (age / half_life)
    return (w / w.mean()).astype(np.float32)


def to_device(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    """The model inputs of a batch of arrays, as tensors on ``device``."""
    out = {}
    for k, v in arrays.items():
        if k not in _NOT_MODEL_INPUTS:
            v = np.ascontiguousarray(v)
            out[k] = torch.from_numpy(v if v.flags.writeable else v.copy()).to(device)
    return out


def predict_logits(model, arrays: dict[str, np.ndarray], device, batch_size: int = 1024) -> np.ndarray:
    """The model's logits for every row of ``arrays`` (eval mode, no gradients), float64."""
    model.eval()
    out = []
    n = len(arrays["item"])
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            b = to_device(take(arrays, slice(i, i + batch_size)), device)
            out.append(model(b).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
