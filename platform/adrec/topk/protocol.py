"""The top-K protocol (docs/design.md) as data: which rows a model learns from, which items it must
not propose, and which positives it is scored on, for the validation and the test stage.

- ``valid`` stage (model selection): learn from the train split, exclude every train item
  (whatever its label), score on valid positives.
- ``test`` stage (the reported numbers): learn from train + valid, exclude every train + valid
  item, score on test positives.

Test rows are read only to build the ``test`` stage's truth; nothing here lets them reach a
model's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adrec.candidates.base import binary_matrix
from adrec.features.split import TEST, TRAIN, VALID, temporal_split

__all__ = ["STAGES", "Stage", "make_stage", "make_stage_from", "inner_stage"]

STAGES = ("valid", "test")


@dataclass
class Stage:
    """One protocol stage. ``known``: the interactions a model may learn from (all labels);
    ``positives``: their label-1 pairs as a matrix (what sources fit on); ``seen``: every known
    (user, item) pair (never proposed); ``users``: evaluated users (>= 1 target positive);
    ``truth``: their target positives; ``cutoff``: per user, the time of the last known
    interaction (-1 when none); ``target``: the target split's interactions whatever their label
    (user_idx, item_idx, label; the graded re-ranker labels read it: a target negative was still
    interacted with)."""

    name: str
    known: pd.DataFrame
    positives: sp.csr_matrix
    seen: sp.csr_matrix
    users: np.ndarray
    truth: list[np.ndarray]
    cutoff: np.ndarray
    n_users: int
    n_items: int
    n_catalog: int
    target: pd.DataFrame | None = None

    def exclude_lists(self, users: np.ndarray | None = None) -> list[np.ndarray]:
        users = self.users if users is None else users
        s = self.seen
        return [s.indices[s.indptr[u]: s.indptr[u + 1]] for u in users]


def _known_splits(stage: str) -> tuple[str, ...]:
    if stage == "valid":
        return (TRAIN,)
    if stage == "test":
        return (TRAIN, VALID)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def make_stage(interactions: pd.DataFrame, n_users: int, n_items: int, n_catalog: int, stage: str) -> Stage:
    """The :class:`Stage` named ``stage`` ("valid" or "test") of a prepared interactions frame
    (``Features.interactions``: user_idx, item_idx, ts, label, split)."""
    known_splits = _known_splits(stage)
    target_split = VALID if stage == "valid" else TEST
    return _stage(interactions, known_splits, target_split, n_users, n_items, n_catalog, stage)


def _stage(interactions: pd.DataFrame, known_splits: tuple[str, ...], target_split: str, n_users: int,
           n_items: int, n_catalog: int, name: str) -> Stage:
    cols = ["user_idx", "item_idx", "ts", "label", "split"]
    df = interactions[cols]
    split = df["split"].astype(str).to_numpy()
    known = pd.DataFrame({
        "user_idx": df["user_idx"].to_numpy(np.int64),
        "item_idx": df["item_idx"].to_numpy(np.int64),
        "ts": df["ts"].to_numpy(np.int64),
        "label": df["label"].to_numpy(np.int8),
    })[np.isin(split, known_splits)].reset_index(drop=True)
    in_target = split == target_split
    is_target = in_target & (df["label"].to_numpy() == 1)
    target = pd.DataFrame({"user_idx": df["user_idx"].to_numpy(np.int64)[in_target],
                           "item_idx": df["item_idx"].to_numpy(np.int64)[in_target],
                           "label": df["label"].to_numpy(np.int8)[in_target]})
    t_users = df["user_idx"].to_numpy(np.int64)[is_target]
    t_items = df["item_idx"].to_numpy(np.int64)[is_target]
    positives = binary_matrix(known[known["label"] == 1], n_users, n_items)
    seen = binary_matrix(known, n_users, n_items)
    users = np.unique(t_users)
    order = np.lexsort((t_items, t_users))
    t_users, t_items = t_users[order], t_items[order]
    starts = np.searchsorted(t_users, users)
    ends = np.searchsorted(t_users, users, side="right")
    truth = [np.unique(t_items[a:b]) for a, b in zip(starts, ends)]
    cutoff = np.full(n_users, -1, dtype=np.int64)
    if len(known):
        last = known.groupby("user_idx")["ts"].max()
        cutoff[last.index.to_numpy(np.int64)] = last.to_numpy(np.int64)
    return Stage(name, known, positives, seen, users, truth, cutoff, n_users, n_items, int(n_catalog), target)


def make_stage_from(name: str, known: pd.DataFrame, target: pd.DataFrame, n_users: int, n_items: int,
                    n_catalog: int) -> Stage:
    """A :class:`Stage` from explicit frames: ``known`` (what models learn from, all labels) and
    ``target`` (whose label-1 rows are the truth)."""
    frame = pd.concat([known.assign(split="known"), target.assign(split="target")], ignore_index=True)
    return _stage(frame, ("known",), "target", n_users, n_items, n_catalog, name)


def inner_stage(interactions: pd.DataFrame, n_users: int, n_items: int, n_catalog: int) -> Stage:
    """A stage carved from the train split alone, by the same tail rule as the protocol's split:
    per user, the last ``(n + 4) // 5`` train interactions (n >= 5) are the target, the rest is
    known. Extra training data for a learned re-ranker that touches neither valid nor test."""
    df = interactions[["user_idx", "item_idx", "ts", "label", "split"]]
    train = df[df["split"].astype(str).to_numpy() == TRAIN]
    sub = temporal_split(train["user_idx"].to_numpy(np.int64), train["ts"].to_numpy(np.int64),
                         train["item_idx"].to_numpy(np.int64))
    # temporal_split puts the tail in "test" (and a tail of the rest in "valid"): tail = target.
    is_tail = sub == TEST
    return make_stage_from("inner", train[~is_tail], train[is_tail], n_users, n_items, n_catalog)
