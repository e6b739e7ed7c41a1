"""Ranker input rows from user and item indices: the codes :meth:`FeatureSpec.encode_rows` gives, computed
with plain dictionary and numpy lookups.

``encode_rows`` builds a pandas frame and maps every context column through pandas: for the small row
counts of a served request (10-100 rows) or of the online learner's mini-batches that overhead was most
of the cost (3 context fields on the synthetic data: ~60% of a request's ranking CPU). :class:`RowEncoder`
computes the same codes over the same vocabularies, entity code tables and :func:`hash_pair` crosses;
``exact=True`` goes through ``encode_rows`` itself, and the unit tests check that both agree. It is what
:meth:`adrec.model_version.ModelVersion.rows` (serving) and the online learner call.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from adrec.features.spec import FeatureSpec, hash_pair


class RowEncoder:
    def __init__(self, spec: FeatureSpec, user_codes: pd.DataFrame, item_codes: pd.DataFrame, exact: bool = False):
        self.spec = spec
        self.user_codes = user_codes
        self.item_codes = item_codes
        self.exact = exact
        self.context = [(c, c.removeprefix("ctx."), spec.vocabs.get(c, {})) for c in spec.context]
        self.entity = []
        for kind, codes in (("user", user_codes), ("item", item_codes)):
            for f in codes.columns:
                if f in spec.multi_vocabs:
                    continue
                self.entity.append((kind, f, codes[f].to_numpy(dtype=np.int64)))

    def encode(self, user_idx: np.ndarray, item_idx: np.ndarray, contexts: list[dict] | dict | None,
               hists: list) -> pd.DataFrame:
        """Rows ``user_idx``, ``item_idx``, the ``f:*`` codes in the spec's field order, ``hist``.

        ``contexts``: one dict per row, or one dict (or None) for every row (a served request: its
        context is encoded once)."""
        u = np.asarray(user_idx, dtype=np.int64)
        it = np.asarray(item_idx, dtype=np.int64)
        n = len(u)
        per_row = isinstance(contexts, list)
        if self.exact:
            frame = pd.DataFrame({"user_idx": u, "item_idx": it})
            for c, key, _ in self.context:
                frame[c] = [str(ctx.get(key, "")) for ctx in contexts] if per_row else \
                    np.full(n, str((contexts or {}).get(key, "")), dtype=object)
            codes = self.spec.encode_rows(frame, self.user_codes, self.item_codes)
            out = pd.concat([frame[["user_idx", "item_idx"]], codes], axis=1)
        else:
            vals = {"user": np.where(u >= 0, u + 1, 0), "item": np.where(it >= 0, it + 1, 0)}
            for c, key, vocab in self.context:
                if per_row:
                    vals[c] = np.fromiter((vocab.get(str(ctx.get(key, "")), 0) for ctx in contexts), np.int64, n)
                else:
                    vals[c] = np.full(n, vocab.get(str((contexts or {}).get(key, "")), 0), np.int64)
            for kind, f, table in self.entity:
                idx = u if kind == "user" else it
                col = table[np.clip(idx, 0, None)] if len(table) else np.zeros(n, dtype=np.int64)
                vals[f] = np.where(idx >= 0, col, 0)
            for salt, c in enumerate(self.spec.crosses):
                vals[c["name"]] = hash_pair(vals[c["a"]], vals[c["b"]], c["hash_size"], salt + 1)
            # One int64 block (keys, then the codes in field order): a frame built column by column cost a
            # pandas array check per column, ~25 per row set.
            fields = self.spec.fields
            block = np.column_stack([u, it, *(vals[k] for k in fields)]) if n else \
                np.zeros((0, 2 + len(fields)), np.int64)
            out = pd.DataFrame(block.astype(np.int64, copy=False), columns=["user_idx", "item_idx",
                                                                            *(f"f:{k}" for k in fields)])
        out["hist"] = [np.asarray(h, dtype=np.int64) for h in hists]
        return out
