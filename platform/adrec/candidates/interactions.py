"""The interaction matrices of a sharded run (``features.pipeline: streaming``), built by one streamed pass.

The shards are read a record batch at a time, only the columns a matrix needs (``user_idx``, ``item_idx``,
``label``); each batch becomes a deduplicated CSR that is added into the running one, so no frame of all
interactions is ever built. The result is what :func:`adrec.candidates.base.binary_matrix` gives on the
whole frame (the same pairs, value 1), as float32 CSR with int32 indices: 8 bytes per distinct pair
(4 index + 4 value) plus 4 per user of ``indptr`` (the issue's ~12 bytes also counts COO's row index),
which is what implicit takes (CPU, or GPU when
``implicit.gpu.HAS_CUDA``; :mod:`adrec.candidates.als`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

#: Rows per record batch of the streamed pass: bounds the pass's memory beside the matrix.
BATCH_ROWS = 1 << 20


def iter_columns(dirs: Sequence[Path], columns: Sequence[str], batch_rows: int = BATCH_ROWS,
                 ) -> Iterator[dict[str, np.ndarray]]:
    """The ``columns`` of every Parquet shard under ``dirs``, one record batch at a time, as numpy arrays."""
    import pyarrow.dataset as pads

    for d in dirs:
        for batch in pads.dataset(str(d), format="parquet").to_batches(columns=list(columns), batch_size=batch_rows):
            yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _binary(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(users), np.float32), (users.astype(np.int32), items.astype(np.int32))),
                      shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def streamed_matrix(dirs: Sequence[Path], n_users: int, n_items: int, positives_only: bool,
                    batch_rows: int = BATCH_ROWS) -> sp.csr_matrix:
    """(n_users, n_items) float32 CSR with a 1 for each (user, item) pair of the shards under ``dirs``
    (``positives_only``: of their label-1 rows), from one pass over them in record batches."""
    shape = (n_users, n_items)
    out = sp.csr_matrix(shape, dtype=np.float32)
    rows = 0
    cols = ["user_idx", "item_idx", *(["label"] if positives_only else [])]
    for b in iter_columns(dirs, cols, batch_rows):
        rows += len(b["user_idx"])
        keep = b["label"] == 1 if positives_only else slice(None)
        out = out + _binary(b["user_idx"][keep], b["item_idx"][keep], shape)
        out.data[:] = 1.0  # a pair in two batches is still one pair
    out.sort_indices()
    out.indices = out.indices.astype(np.int32, copy=False)
    out.indptr = out.indptr.astype(np.int32 if out.nnz < 2**31 else np.int64, copy=False)
    nbytes = out.data.nbytes + out.indices.nbytes + out.indptr.nbytes
    log.info("interaction matrix (%s) from a streamed pass over %d rows: %d pairs, %.1f MB (%.1f bytes per pair)",
             "positives" if positives_only else "seen", rows, out.nnz, nbytes / 1e6, nbytes / max(out.nnz, 1))
    return out
