"""``RowEmbedding``: an ``nn.Embedding`` whose lookups can be redirected to a small copy of some of its rows.

DP-SGD (:mod:`adrec.ranking.train.privacy`) needs each example's own gradient. One example's gradient of an
embedding table is zero outside the few rows it looks up, but ``vmap`` of ``grad`` materialises it whole:
one (rows x dim) tensor per example and per lookup, which on MovieLens (a 6.8k-row table) was 89% of a
DP-SGD step. Instead the example's lookups are first recorded (:func:`recording`), then answered from a copy
of just those rows (:func:`reading`), and that copy is what gets differentiated: (looked-up rows x dim) per
example, the same gradient with the zeros left out. Outside those two contexts it is a plain
``nn.Embedding`` (same weight, same state dict key).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["RowEmbedding", "reading", "recording"]


class RowEmbedding(nn.Embedding):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # None: a plain lookup; a list: record the indices looked up (and look them up as usual);
        # (index, rows): answer index i with the row of ``rows`` at i's first place in ``index`` (sorted).
        self.redirect: list | tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        r = self.redirect
        if r is None:
            return super().forward(idx)
        if isinstance(r, list):
            r.append(idx.reshape(-1))
            return super().forward(idx)
        index, rows = r
        return rows[torch.searchsorted(index, idx)]


@contextmanager
def recording(tables: dict[str, RowEmbedding]):
    """Within: every lookup of each table is recorded; yields {name: list of index tensors}."""
    seen: dict[str, list] = {name: [] for name in tables}
    for name, t in tables.items():
        t.redirect = seen[name]
    try:
        yield seen
    finally:
        for t in tables.values():
            t.redirect = None


@contextmanager
def reading(tables: dict[str, RowEmbedding], index: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]):
    """Within: table ``name`` answers index i with ``rows[name][j]``, j the first place of i in the sorted
    ``index[name]`` (every index looked up must be in it: record the lookups of the same computation first;
    a repeated index then reads, and gets the gradient in, its first copy only)."""
    for name, t in tables.items():
        t.redirect = (index[name], rows[name])
    try:
        yield
    finally:
        for t in tables.values():
            t.redirect = None
