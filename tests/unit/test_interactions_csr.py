"""The interaction matrices of a sharded run from a streamed pass (issue 13, item 4) equal the in-process
ones exactly: the same (user, item) pairs, value 1, whatever the cut into shards and record batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adrec.candidates.interactions import streamed_matrix
from adrec.candidates.stage import positives_matrix, seen_matrix


def test_streamed_csr_equals_the_in_process_one(tmp_path):
    rng = np.random.default_rng(0)
    n, n_users, n_items = 5000, 97, 61
    rows = pd.DataFrame({"user_idx": rng.integers(0, n_users, n), "item_idx": rng.integers(0, n_items, n),
                         "label": (rng.random(n) < 0.3).astype(np.int64), "ts": rng.integers(0, 10**6, n)})
    dirs = []
    for i, part in enumerate(np.array_split(np.arange(n), 3)):  # three split folders, two shards each
        d = tmp_path / f"split{i}"
        d.mkdir()
        for j, half in enumerate(np.array_split(part, 2)):
            pq.write_table(pa.Table.from_pandas(rows.iloc[half], preserve_index=False), d / f"{j}.parquet")
        dirs.append(d)
    for positives, whole in ((True, positives_matrix), (False, seen_matrix)):
        # small record batches: pairs repeated across batches must count once
        got = streamed_matrix(dirs, n_users, n_items, positives_only=positives, batch_rows=700)
        want = whole(rows, n_users, n_items)
        assert got.shape == want.shape and got.dtype == np.float32 and got.indices.dtype == np.int32
        assert got.nnz == want.nnz > 0
        assert (got != want).nnz == 0
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)
