"""Why the fusion ranker scores a row as it does: attention over the history and attributions by field.

- :meth:`Explainer.history_attention`: the target-attention weights of each row's candidate over the
  user's history (the softmax the user tower uses, averaged over the ensemble members that read the
  history), read by a forward hook on the attention MLP's output layer, so the network's code is not
  touched; weight i belongs to the history item at position i.
- :meth:`Explainer.attributions`: Integrated Gradients (captum) of each row's raw logit over the model's
  input embeddings (:meth:`~adrec.ranking.model.FusionModel.embed`), from an all-zero baseline (every
  embedding "removed"), summed by group: one group per ``f:`` field (user, item, context fields and the
  hashed crosses), one per pooled multi-valued field, and the item representation's parts: the
  candidate's ``item.id`` embedding, ``item.attributes`` and ``item.text``, and ``history`` (the id,
  attribute and text embeddings of the user's history items). By IG's completeness the groups sum to
  logit(input) - logit(baseline) (up to the integral's error).
- :meth:`Explainer.logits_without`: the logit with one group zeroed (its baseline), for the
  faithfulness check of the report.

Item-side embeddings are shared by the rows of a batch (one per unique item); to attribute per row,
each row gets its own copy of the batch's item table (``_uniq``/``_inv`` of the batch point each row at
its copy), so one forward pass covers every row and every integration step.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from adrec.ranking.fusion import _sigmoid

log = logging.getLogger(__name__)

__all__ = ["Explainer", "ITEM_GROUPS", "explainer_of"]

_ITEM_KEYS = {"item_id": "item.id", "item_attr": "item.attributes", "item_text": "item.text"}
ITEM_GROUPS = (*_ITEM_KEYS.values(), "history")


def _base_key(key: str) -> str:
    """"m2.fields" -> "fields" (ensemble member i > 0 keys its embeddings "m<i>.<name>")."""
    head, _, rest = key.partition(".")
    return rest if rest and head[:1] == "m" and head[1:].isdigit() else key


class Explainer:
    """Explanations of one :class:`~adrec.ranking.fusion.FusionRanker`'s scores (see the module)."""

    def __init__(self, ranker, n_steps: int = 16):
        self.ranker = ranker
        self.model = ranker.model
        self.n_steps = int(n_steps)
        arch = self.model.arch
        self.field_names = list(arch["fields"])
        self.multi_names = [m["name"] for m in arch["multi"]]
        self.groups = [*self.field_names, *self.multi_names, *ITEM_GROUPS]

    def probability(self, logits: np.ndarray) -> np.ndarray:
        """Click probabilities of raw logits (the ranker's calibration), as ``predict`` answers them."""
        a, b = self.ranker.calibration
        return _sigmoid(a * np.asarray(logits, np.float64) + b)

    # ---- (b) "because you liked": attention over the history ----------------------------------
    def history_attention(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(history item indices (B, L), -1 padding; their attention weights (B, L), rows sum to 1 or 0)."""
        b = self.ranker.batch(rows)
        hist = b["hist"]
        mask = hist > 0
        captured: list[torch.Tensor] = []
        users = [h for h in self.model.members if h.use_hist]
        hooks = [h.att[2].register_forward_hook(lambda _m, _i, out: captured.append(out.detach())) for h in users]
        try:
            with torch.inference_mode():
                self.model(b)
        finally:
            for hook in hooks:
                hook.remove()
        weights = torch.zeros(hist.shape, dtype=torch.float32)
        for scores in captured:
            s = scores.squeeze(-1).float().masked_fill(~mask, float("-inf"))
            weights += torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0) * mask
        weights /= max(1, len(captured))
        return (hist - 1).numpy(), weights.numpy()

    # ---- (c) Integrated Gradients by field ----------------------------------------------------
    def _inputs(self, b: dict[str, torch.Tensor]) -> tuple[list[str], tuple[torch.Tensor, ...]]:
        """The embeddings IG integrates over, item-side ones copied per row: (keys, tensors with the rows first)."""
        with torch.no_grad():
            e = self.model.embed(b)
        n = b["item"].shape[0]
        keys, tensors = [], []
        for k, v in e.items():
            base = _base_key(k)
            if base in ("fields", "multi"):
                tensors.append(v.detach().float())
            elif base in _ITEM_KEYS:
                tensors.append(v.detach().float().unsqueeze(0).expand(n, *v.shape).contiguous())
            else:  # token-level encoder inputs: only while training the encoder
                continue
            keys.append(k)
        return keys, tuple(tensors)

    def _forward(self, b: dict[str, torch.Tensor], keys: list[str]):
        """f(*embeddings) -> logits for inputs whose first dimension is a multiple of the batch's rows
        (captum stacks the integration steps step-major: input row r is batch row r % B)."""
        uniq, inv = self.model._index(b)
        n_rows, n_uniq = b["item"].shape[0], uniq.shape[0]

        def f(*tensors: torch.Tensor) -> torch.Tensor:
            n = tensors[0].shape[0]
            rep = n // n_rows
            bb = {k: (v.repeat(rep, *[1] * (v.dim() - 1)) if torch.is_tensor(v) and v.dim() and v.shape[0] == n_rows
                      else v) for k, v in b.items() if not k.startswith("_")}
            bb["_uniq"] = uniq.repeat(n)
            bb["_inv"] = inv.repeat(rep, 1) + (torch.arange(n) * n_uniq).unsqueeze(1)
            e = {}
            for k, t in zip(keys, tensors):
                e[k] = t.reshape(n * n_uniq, *t.shape[2:]) if _base_key(k) in _ITEM_KEYS else t
            return self.model.forward_from(e, bb).float()

        return f

    def _grouped(self, b: dict[str, torch.Tensor], keys: list[str], attrs) -> np.ndarray:
        """(B, groups) sums of per-input attributions (see the module for the groups)."""
        _, inv = self.model._index(b)
        n = b["item"].shape[0]
        out = np.zeros((n, len(self.groups)), np.float64)
        col = {g: i for i, g in enumerate(self.groups)}
        nf, nm = len(self.field_names), len(self.multi_names)
        cand = inv[:, 0].numpy()
        for k, a in zip(keys, attrs):
            a = a.detach().double()
            base = _base_key(k)
            if base == "fields":
                out[:, :nf] += a.sum(-1).numpy()
            elif base == "multi":
                out[:, nf:nf + nm] += a.sum(-1).numpy()
            else:
                per_slot = a.sum(-1).numpy()  # (B, U)
                own = per_slot[np.arange(n), cand]
                out[:, col[_ITEM_KEYS[base]]] += own
                out[:, col["history"]] += per_slot.sum(1) - own
        return out

    def attributions(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(attributions (B, groups) in logit units, in the order of :attr:`groups`; the baseline's logits (B,))."""
        from captum.attr import IntegratedGradients

        b = self.ranker.batch(rows)
        self.model.eval()
        keys, inputs = self._inputs(b)
        f = self._forward(b, keys)
        baselines = tuple(torch.zeros_like(t) for t in inputs)
        with torch.enable_grad():
            attrs = IntegratedGradients(f).attribute(inputs, baselines=baselines, n_steps=self.n_steps)
        with torch.no_grad():
            base = f(*baselines).numpy().astype(np.float64)
        return self._grouped(b, keys, attrs), base

    def logits_without(self, rows: pd.DataFrame, drop: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the logits of ``rows``; their logits with group ``drop[j]`` of row j zeroed)."""
        b = self.ranker.batch(rows)
        self.model.eval()
        keys, inputs = self._inputs(b)
        f = self._forward(b, keys)
        if any(g not in self.groups for g in drop):
            raise ValueError(f"unknown group(s) {sorted(set(drop) - set(self.groups))}; groups: {self.groups}")
        _, inv = self.model._index(b)
        zeroed = [t.clone() for t in inputs]
        for j, g in enumerate(drop):
            for k, t in zip(keys, zeroed):
                base = _base_key(k)
                if base == "fields" and g in self.field_names:
                    t[j, self.field_names.index(g)] = 0
                elif base == "multi" and g in self.multi_names:
                    t[j, self.multi_names.index(g)] = 0
                elif base in _ITEM_KEYS and g == _ITEM_KEYS[base]:
                    t[j, inv[j, 0]] = 0
                elif base in _ITEM_KEYS and g == "history":
                    c = t[j, inv[j, 0]].clone()
                    t[j] = 0
                    t[j, inv[j, 0]] = c
        with torch.no_grad():
            return f(*inputs).numpy().astype(np.float64), f(*zeroed).numpy().astype(np.float64)


def explainer_of(ranker) -> Explainer | None:
    """The ranker's :class:`Explainer` (built once and kept on it), or None for a ranker without input
    embeddings (only the fusion ranker has them)."""
    if not hasattr(getattr(ranker, "model", None), "embed"):
        return None
    ex = getattr(ranker, "_explainer", None)
    if ex is None:
        ex = ranker._explainer = Explainer(ranker)
    return ex
