"""The fusion ranker's network: late fusion of a text tower, a user tower and a cross-feature tower.

- Item text tower: the encoder mean-pooled over each item's text, projected to ``embed_dim``.
  Pooled item texts live in a cache (``TextTower.pooled``) computed once per model version, so
  serving never runs the encoder per candidate. Training fine-tunes the encoder CPU-cheaply:
  ``frozen`` never runs it after the first pass; ``last_n`` computes the hidden states below the
  trainable top layers once, then runs only those top layers on (a sample of) the batch's unique
  candidate items, with the cache refreshed once per epoch for the rest; ``full`` runs the whole
  encoder on those items (a GPU setting); ``lora`` runs it too, with only peft's low-rank factors
  training (:mod:`adrec.ranking.lora`). ``text_tower`` off (the ablation): the cache stays zero.
- Item representation (candidate and history alike): [id embedding, attribute embeddings (the
  item's categorical and multi-valued codes), projected text].
- User tower: DIN-style target attention of the candidate over the user's recent positives
  (``hist``), a masked mean of them, and a history-length embedding.
- Cross-feature tower: embeddings of every ``f:`` field and the mean-pooled multi-valued fields,
  concatenated with the user tower and the candidate, through DCN-v2 cross layers (low rank) and an MLP,
  plus a first-order (wide) term over the fields -> one logit.

The forward pass is split into :meth:`FusionModel.embed` (every input embedding, as a dict of
tensors) and :meth:`FusionModel.forward_from` (everything after), so FGSM can perturb the input
embeddings (token-level encoder inputs and feature embeddings) in between.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from adrec.features.encoder import encoder_layers, layer_mask, mean_pool
from adrec.ranking.rows import RowEmbedding

log = logging.getLogger(__name__)

# Input embeddings FGSM may perturb; "tokens" are the token-level inputs of the trainable encoder part.
# (Member i > 0 of an ensemble has its feature embeddings under "m<i>.<key>".)
EMBED_KEYS = ("fields", "multi", "item_id", "item_attr", "item_text", "tokens")


# Pooled item texts of frozen encoders, by a fingerprint of the encoder's weights and the item tokens: a
# process that trains several rankers on one catalog (a benchmark, a tuning trial after another) runs a frozen
# encoder over the items once, not once per training (MiniLM over MovieLens' 1682 titles: ~19 s of CPU).
_FROZEN_POOLED: OrderedDict[str, torch.Tensor] = OrderedDict()
_FROZEN_POOLED_MAX = 4  # entries kept
_FROZEN_POOLED_MAX_BYTES = 256 << 20  # a larger cache is not kept (a huge catalog would pin its memory)


def _frozen_key(encoder: nn.Module, tok_ids: torch.Tensor, tok_mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in (tok_ids, tok_mask):
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TextTower(nn.Module):
    """An HF encoder, its item tokens and the cache of pooled item texts (row 0 = unknown item)."""

    def __init__(self, encoder: nn.Module, finetune: str, last_n: int, tok_ids: np.ndarray, tok_mask: np.ndarray,
                 lora: dict | None = None, enabled: bool = True):
        super().__init__()
        # A LoRA ranker loaded from its folder has the adapter merged into the encoder (lora None): nothing
        # trains in the encoder any more; without the text tower the encoder never runs at all.
        if not enabled or (finetune == "lora" and lora is None):
            finetune = "frozen"
        self.enabled = enabled
        self.encoder = encoder
        # A plain list, not a second registered path to the encoder's blocks: an alias made every state dict
        # carry the blocks twice (checkpoints and snapshots copied a frozen encoder's layers as if trainable)
        # and broke torch.func.functional_call, which restores an aliased parameter wrongly (DP-SGD's
        # per-example gradients left a LoRA adapter's weights as dead functorch tensors).
        layers = encoder_layers(encoder)
        self.layers = list(layers) if layers is not None else None
        if finetune == "last_n" and self.layers is None:
            log.warning("encoder %s exposes no layer list: fine-tuning it in full instead of its last %d layers",
                        type(encoder).__name__, last_n)
            finetune = "full"
        self.finetune = finetune
        n_layers = len(self.layers) if self.layers is not None else 0
        self.n_top = min(last_n, n_layers) if finetune == "last_n" else 0
        for p in encoder.parameters():
            p.requires_grad_(finetune == "full")
        if finetune == "lora":  # after the freeze: peft marks its own factors trainable
            from adrec.ranking.lora import apply_lora

            encoder = self.encoder = apply_lora(encoder, lora)
        pooler = getattr(encoder, "pooler", None)
        if pooler is not None:  # the model mean-pools the last hidden states; the pooler never runs
            for p in pooler.parameters():
                p.requires_grad_(False)
        if self.n_top:
            for layer in self.layers[n_layers - self.n_top:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        self.hidden_size = int(encoder.config.hidden_size)
        pad_ids = np.zeros((1, tok_ids.shape[1]), dtype=np.int64)
        self.register_buffer("tok_ids", torch.as_tensor(np.concatenate([pad_ids, tok_ids])), persistent=False)
        self.register_buffer("tok_mask", torch.as_tensor(np.concatenate([pad_ids, tok_mask])), persistent=False)
        self.register_buffer("pooled", torch.zeros(len(tok_ids) + 1, self.hidden_size), persistent=False)
        self.lower: torch.Tensor | None = None  # (n_items+1, T, H): hidden states below the trainable layers
        self.fresh_cache = False
        # True while DP-SGD computes per-example gradients (torch.func.vmap over the rows): token inputs of
        # the fixed padded length and masks built without a look at the data (vmap refuses data-dependent
        # shapes and branches).
        self.per_example = False

    @property
    def trainable(self) -> bool:
        return self.finetune != "frozen"

    def trainable_parameters(self):
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def _order(self, idx: torch.Tensor) -> torch.Tensor:
        # Length-sorted chunks pad less: about 2.5x faster on item titles.
        lens = self.tok_mask[idx].sum(1)
        return idx[torch.argsort(lens, stable=True)]

    @torch.no_grad()
    def refresh(self, batch_size: int = 128) -> None:
        """Recompute the pooled text of every item with the current encoder weights (no grad)."""
        if not self.enabled:  # no text tower: every item's text is the zero vector
            self.pooled.zero_()
            self.fresh_cache = True
            return
        key = None
        if not self.trainable:
            key = _frozen_key(self.encoder, self.tok_ids, self.tok_mask)
            if key in _FROZEN_POOLED:
                _FROZEN_POOLED.move_to_end(key)
                self.pooled.copy_(_FROZEN_POOLED[key])
                self.fresh_cache = True
                return
        was = self.encoder.training
        self.encoder.eval()
        idx = self._order(torch.arange(1, self.tok_ids.shape[0], device=self.tok_ids.device))
        for i in range(0, len(idx), batch_size):
            chunk = idx[i:i + batch_size]
            mask = self.tok_mask[chunk]
            t = int(mask.sum(1).max().clamp(min=1))
            mask = mask[:, :t]
            if self.lower is not None and self.n_top:
                hidden = self._top(self.lower[chunk, :t].float(), mask)
            else:
                hidden = self.encoder(input_ids=self.tok_ids[chunk, :t], attention_mask=mask).last_hidden_state
            self.pooled[chunk] = mean_pool(hidden, mask).to(self.pooled.dtype)
        self.pooled[0] = 0
        self.encoder.train(was)
        self.fresh_cache = True
        if key is not None and self.pooled.numel() * self.pooled.element_size() <= _FROZEN_POOLED_MAX_BYTES:
            _FROZEN_POOLED[key] = self.pooled.detach().cpu().clone()
            while len(_FROZEN_POOLED) > _FROZEN_POOLED_MAX:
                _FROZEN_POOLED.popitem(last=False)

    @torch.no_grad()
    def prepare_training(self, batch_size: int = 128) -> None:
        """``last_n``: cache the hidden states below the trainable layers once (the lower layers are frozen)."""
        if self.n_top:
            n_layers = len(self.layers)
            was = self.encoder.training
            self.encoder.eval()
            n, t_max = self.tok_ids.shape
            device = self.tok_ids.device
            lower = torch.zeros(n, t_max, self.hidden_size, device=device)
            idx = self._order(torch.arange(1, n, device=device))
            for i in range(0, len(idx), batch_size):
                chunk = idx[i:i + batch_size]
                mask = self.tok_mask[chunk]
                t = int(mask.sum(1).max().clamp(min=1))
                out = self.encoder(input_ids=self.tok_ids[chunk, :t], attention_mask=mask[:, :t], output_hidden_states=True)
                lower[chunk, :t] = out.hidden_states[n_layers - self.n_top]
            self.lower = lower
            self.encoder.train(was)
        self.refresh(batch_size)

    def release_training(self) -> None:
        self.lower = None

    def _top(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        am = layer_mask(self.encoder, hidden, mask)
        for layer in self.layers[len(self.layers) - self.n_top:]:
            out = layer(hidden, am)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def token_inputs(self, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level inputs of the trainable encoder part for items ``fresh`` (codes), and their mask."""
        mask = self.tok_mask[fresh]
        t = mask.shape[1] if self.per_example else int(mask.sum(1).max().clamp(min=1))
        mask = mask[:, :t]
        if self.n_top:
            if self.lower is None:
                raise RuntimeError("call prepare_training() before training the last encoder layers")
            return self.lower[fresh, :t].float(), mask
        return self.encoder.get_input_embeddings()(self.tok_ids[fresh, :t]), mask

    def encode_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.n_top:
            hidden = self._top(tokens, mask)
        else:
            am = layer_mask(self.encoder, tokens, mask, allow_skip=False) if self.per_example else mask
            hidden = self.encoder(inputs_embeds=tokens, attention_mask=am).last_hidden_state
        return mean_pool(hidden, mask)


class CrossNetV2(nn.Module):
    """DCN-v2 cross layers, low-rank: x_{l+1} = x0 * (U (V^T x_l) + b) + x_l."""

    def __init__(self, dim: int, layers: int, rank: int):
        super().__init__()
        rank = min(rank, dim)
        self.v = nn.ModuleList(nn.Linear(dim, rank, bias=False) for _ in range(layers))
        self.u = nn.ModuleList(nn.Linear(rank, dim) for _ in range(layers))
        for u in self.u:
            nn.init.zeros_(u.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for v, u in zip(self.v, self.u):
            x = x0 * u(v(x)) + x
        return x


def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class FusionHead(nn.Module):
    """One member: embeddings, item representation, target attention, cross tower and output."""

    def __init__(self, arch: dict, text_dim: int, n_emb: int):
        super().__init__()
        k = int(arch["embed_dim"])
        self.k = k
        self.hist_len = int(arch["hist_len"])
        n_fields, n_multi = len(arch["fields"]), len(arch["multi"])
        self.emb = RowEmbedding(n_emb, k)  # per-example gradients of its looked-up rows only (DP-SGD)
        nn.init.normal_(self.emb.weight, std=0.05)
        self.lin = nn.Embedding(n_emb, 1)
        nn.init.zeros_(self.lin.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        self.text_proj = nn.Linear(text_dim, k)
        d_item = 3 * k
        self.pos = nn.Parameter(torch.zeros(self.hist_len, d_item))
        att = int(arch.get("att_hidden", 64))
        self.att = nn.Sequential(nn.Linear(4 * d_item, att), nn.ReLU(), nn.Linear(att, 1))
        self.hist_n = nn.Embedding(self.hist_len + 1, k)
        nn.init.normal_(self.hist_n.weight, std=0.05)
        n_dense = len(arch.get("dense", []))  # collaborative scores (adrec.ranking.collab): into the cross tower
        d0 = (n_fields + n_multi) * k + k + 4 * d_item + k + (k if n_dense else 0)
        self.cross = CrossNetV2(d0, int(arch["cross_layers"]), int(arch.get("cross_rank", 64)))
        hidden = list(arch["hidden"])
        self.deep = mlp([d0, *hidden], float(arch["dropout"]))
        self.out = nn.Linear(hidden[-1] if hidden else d0, 1)
        self.emb_dropout = nn.Dropout(float(arch.get("embed_dropout", 0.0)))
        self.dense_proj = nn.Linear(n_dense, k) if n_dense else None
        self.dense_wide = nn.Linear(n_dense, 1) if n_dense else None
        if self.dense_wide is not None:
            nn.init.zeros_(self.dense_wide.weight)
            nn.init.zeros_(self.dense_wide.bias)
        self.fm = bool(arch.get("fm", False))
        self.use_hist = True
        # ESMM (issue 17): the CVR tower, the click output's twin: an MLP of its own over the shared cross-tower
        # output plus a first-order (wide) term of its own over the fields; its logit is pCVR's, and pCTCVR =
        # pCTR x pCVR is what the conversion labels of every impression train.
        self.cvr_deep = self.cvr_out = self.cvr_bias = self.cvr_lin = None
        if "cvr" in arch.get("tasks", ["ctr"]):
            self.cvr_deep = mlp([d0, *hidden], float(arch["dropout"]))
            self.cvr_out = nn.Linear(hidden[-1] if hidden else d0, 1)
            self.cvr_bias = nn.Parameter(torch.zeros(1))
            self.cvr_lin = nn.Embedding(n_emb, 1)
            nn.init.zeros_(self.cvr_lin.weight)


class FusionModel(nn.Module):
    """Late-fusion click model: ``arch["members"]`` heads (a deep ensemble, logits averaged) over one
    shared text tower. ``arch``: see :func:`adrec.ranking.data.architecture` plus the sizes.

    ``arch["tasks"] == ["ctr", "cvr"]``: every member also has a CVR tower (ESMM); :meth:`forward` and
    :meth:`member_logits` still give the click logits (what FGSM's attack, the explanations and the online
    learner read), :meth:`member_task_logits` and :meth:`task_logits` both."""

    def __init__(self, arch: dict, encoder: nn.Module, tok_ids: np.ndarray, tok_mask: np.ndarray,
                 item_attr: np.ndarray, multi: dict[str, np.ndarray], lora: dict | None = None):
        super().__init__()
        self.arch = arch
        self.k = int(arch["embed_dim"])
        self.n_fields = len(arch["fields"])
        self.hist_len = int(arch["hist_len"])
        cards = list(arch["cards"]) + [m["card"] for m in arch["multi"]]
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64)
        self.register_buffer("field_off", torch.as_tensor(offsets[: self.n_fields]), persistent=False)
        self.multi_names = [m["name"] for m in arch["multi"]]
        self.multi_kind = [m["kind"] for m in arch["multi"]]
        self.multi_off = [int(o) for o in offsets[self.n_fields:]]
        fields = arch["fields"]
        self.item_off = int(offsets[fields.index("item")]) if "item" in fields else None
        self.register_buffer("item_attr", torch.as_tensor(item_attr, dtype=torch.long), persistent=False)
        attr_off = [int(offsets[fields.index(f)]) for f in arch["item_fields"]]
        self.register_buffer("item_attr_off", torch.as_tensor(np.asarray(attr_off, dtype=np.int64)), persistent=False)
        for name, table in multi.items():
            self.register_buffer(self._mbuf(name), torch.as_tensor(table, dtype=torch.long), persistent=False)
        self.item_multi = [i for i, kind in enumerate(self.multi_kind) if kind == "item"]

        self.text = TextTower(encoder, arch["finetune"], int(arch["finetune_last_n"]), tok_ids, tok_mask,
                              lora=lora, enabled=bool(arch.get("text_tower", True)))
        n_members = max(1, int(arch.get("members", 1)))
        self.members = nn.ModuleList(FusionHead(arch, self.text.hidden_size, int(sum(cards)))
                                     for _ in range(n_members))
        if arch.get("mixed_members") and n_members > 1:
            # Diversity: members alternate the FM term and (every 4th from the 2nd) go without the history.
            for i, h in enumerate(self.members):
                h.fm = i % 2 == 1
                h.use_hist = i % 4 != 2

    @staticmethod
    def _mbuf(name: str) -> str:
        return "multi_" + "".join(c if c.isalnum() else "_" for c in name)

    @staticmethod
    def _key(i: int, name: str) -> str:
        return name if i == 0 else f"m{i}.{name}"

    @property
    def device(self) -> torch.device:
        return self.field_off.device

    @property
    def tasks(self) -> list[str]:
        return list(self.arch.get("tasks", ["ctr"]))

    @property
    def has_cvr(self) -> bool:
        return "cvr" in self.tasks

    @torch.no_grad()
    def init_bias(self, logit: float, cvr_logit: float | None = None) -> None:
        """Start every member's output at ``logit`` (the training click rate) and its CVR tower's at
        ``cvr_logit`` (the training conversion rate of clicks), when it has one."""
        for h in self.members:
            h.bias.fill_(logit)
            if h.cvr_bias is not None and cvr_logit is not None:
                h.cvr_bias.fill_(cvr_logit)

    # ---- inputs -----------------------------------------------------------------------------
    def _pool_multi(self, h: FusionHead, j: int, ent: torch.Tensor) -> torch.Tensor:
        codes = getattr(self, self._mbuf(self.multi_names[j]))[ent]  # (..., W)
        e = h.emb(codes + self.multi_off[j])
        m = (codes > 0).unsqueeze(-1).to(e.dtype)
        return (e * m).sum(-2) / m.sum(-2).clamp(min=1.0)

    def _attr(self, h: FusionHead, items: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.item_attr.shape[1]:
            codes = self.item_attr[items]
            e = h.emb(codes + self.item_attr_off)
            m = (codes > 0).unsqueeze(-1).to(e.dtype)
            parts.append((e * m).sum(-2))
            cnt = m.sum(-2)
        else:
            cnt = torch.zeros(*items.shape, 1, device=items.device)
        for j in self.item_multi:
            parts.append(self._pool_multi(h, j, items))
            first = getattr(self, self._mbuf(self.multi_names[j]))[items, 0]
            cnt = cnt + (first > 0).unsqueeze(-1).to(cnt.dtype)
        if not parts:
            return torch.zeros(*items.shape, self.k, device=items.device)
        return torch.stack(parts).sum(0) / cnt.clamp(min=1.0)

    def _id(self, h: FusionHead, items: torch.Tensor) -> torch.Tensor:
        if self.item_off is None:
            return torch.zeros(*items.shape, self.k, device=items.device)
        return h.emb(items + self.item_off)

    def embed(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every input embedding of a batch (FGSM perturbs these).

        Item-side inputs are per unique item of the batch (candidates and history items together):
        ``item_text`` (U, H) pooled text, ``item_id`` / ``item_attr`` (U, k); ``tokens`` are the
        token-level inputs of the trainable encoder part for the ``fresh`` items. Row-side inputs:
        ``fields`` (B, F, k), ``multi`` (B, M, k). Text inputs are shared by the ensemble members;
        member i > 0 has its own feature embeddings under "m<i>.<name>".
        """
        item = b["item"]
        uniq, _ = self._index(b)
        e: dict[str, torch.Tensor] = {"item_text": self.text.pooled[uniq]}
        if "fresh" in b and b["fresh"].numel():
            e["tokens"], b["fresh_mask"] = self.text.token_inputs(b["fresh"])
        for i, h in enumerate(self.members):
            key = lambda name: self._key(i, name)  # noqa: E731
            e[key("fields")] = h.emb_dropout(h.emb(b["fields"] + self.field_off))
            if self.multi_names:
                ents = [item if kind == "item" else b["user"] for kind in self.multi_kind]
                e[key("multi")] = torch.stack([self._pool_multi(h, j, ent) for j, ent in enumerate(ents)], dim=1)
            e[key("item_id")], e[key("item_attr")] = self._id(h, uniq), self._attr(h, uniq)
        return e

    @staticmethod
    def _index(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's unique items (sorted codes, U) and, per row, the index of its candidate and
        history items among them (B, 1 + L). Cached in ``b`` by :meth:`embed`; recomputed (the same
        result: ``torch.unique`` sorts) when a caller hands :meth:`member_logits` a copy of the batch
        that did not go through :meth:`embed`, as the online learner does."""
        if "_uniq" not in b or "_inv" not in b:
            b["_uniq"], b["_inv"] = torch.unique(torch.cat([b["item"].unsqueeze(1), b["hist"]], dim=1),
                                                 return_inverse=True)
        return b["_uniq"], b["_inv"]

    # ---- everything after the inputs ------------------------------------------------------------
    def _text(self, e: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        """(U, H) pooled text of the batch's unique items: cached, or fresh from the trainable layers."""
        text = e["item_text"]
        if "tokens" in e:
            fresh, (uniq, _) = b["fresh"], self._index(b)
            mask = b["fresh_mask"] if "fresh_mask" in b else self.text.token_inputs(fresh)[1]
            vec = self.text.encode_tokens(e["tokens"], mask).to(text.dtype)
            if self.text.per_example:  # no index_put into a shared table under vmap: match the items instead
                match = uniq.unsqueeze(1) == fresh.unsqueeze(0)  # (U, F)
                pick = vec[match.to(torch.long).argmax(1)]
                return torch.where(match.any(1, keepdim=True), pick, text)
            slot = torch.full((self.text.pooled.shape[0],), -1, dtype=torch.long, device=uniq.device)
            slot[fresh] = torch.arange(len(fresh), device=uniq.device)
            su = slot[uniq]
            text = torch.where((su >= 0).unsqueeze(-1), vec[su.clamp(min=0)], text)
        return text

    @staticmethod
    def _attention(h: FusionHead, vec: torch.Tensor, inv: torch.Tensor, cand: torch.Tensor,
                   hv: torch.Tensor) -> torch.Tensor:
        """DIN scores ``att([h, q, h*q, h-q])`` with the first layer split by input block, so the
        history-only and candidate-only parts run once per item / row instead of per (row, position)."""
        lin1, act, lin2 = h.att[0], h.att[1], h.att[2]
        w_h, w_q, w_p, w_d = lin1.weight.split(hv.shape[-1], dim=1)
        per_item = vec @ (w_h + w_d).t()  # (U, att)
        pos = h.pos @ (w_h + w_d).t()  # (L, att): the position part of h
        hid = per_item[inv[:, 1:]] + pos + (cand @ (w_q - w_d).t() + lin1.bias).unsqueeze(1) \
            + (hv * cand.unsqueeze(1)) @ w_p.t()
        return lin2(act(hid)).squeeze(-1)

    def _head(self, i: int, h: FusionHead, e: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
              text: torch.Tensor, cvr: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Member ``i``'s click logits (B,); with ``cvr``, (click logits, CVR logits)."""
        key = lambda name: self._key(i, name)  # noqa: E731
        uniq, inv = self._index(b)
        hist = b["hist"]
        known = (uniq > 0).unsqueeze(-1)
        t_u = h.text_proj(text) * known.to(text.dtype)
        vec = torch.cat([e[key("item_id")], e[key("item_attr")], t_u], dim=-1)  # (U, 3k)
        cand, t_c = vec[inv[:, 0]], t_u[inv[:, 0]]  # (B, 3k), (B, k)
        mask = hist > 0
        if not h.use_hist:
            mask = torch.zeros_like(mask)
        hv = vec[inv[:, 1:]] + h.pos  # (B, L, 3k)
        scores = self._attention(h, vec, inv, cand, hv)
        scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.softmax(scores, dim=-1)
        w = torch.nan_to_num(w, nan=0.0) * mask.to(w.dtype)
        interest = (w.unsqueeze(-1) * hv).sum(1)
        mf = mask.unsqueeze(-1).to(hv.dtype)
        hmean = (hv * mf).sum(1) / mf.sum(1).clamp(min=1.0)
        n_hist = h.hist_n(mask.sum(1))
        fields = e[key("fields")]
        parts = [fields.flatten(1)]
        if key("multi") in e:
            parts.append(e[key("multi")].flatten(1))
        parts += [t_c, cand, interest, interest * cand, hmean, n_hist]
        if h.dense_proj is not None:
            parts.append(h.dense_proj(b["dense"]))
        shared = h.cross(torch.cat(parts, dim=-1))
        x = h.deep(shared)
        wide = h.lin(b["fields"] + self.field_off).sum(dim=(1, 2))
        if h.dense_wide is not None:
            wide = wide + h.dense_wide(b["dense"]).squeeze(-1)
        logit = h.out(x).squeeze(-1) + wide + h.bias
        if h.fm:
            v = torch.cat([fields, e[key("multi")]], dim=1) if key("multi") in e else fields
            logit = logit + 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(-1) + (interest * cand).sum(-1)
        if cvr:
            cvr_wide = h.cvr_lin(b["fields"] + self.field_off).sum(dim=(1, 2))
            return logit, h.cvr_out(h.cvr_deep(shared)).squeeze(-1) + cvr_wide + h.cvr_bias
        return logit

    def member_logits(self, e: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        """(members, B) logits; training fits each member on its own (a deep ensemble)."""
        text = self._text(e, b)
        return torch.stack([self._head(i, h, e, b, text) for i, h in enumerate(self.members)])

    def member_task_logits(self, e: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(members, B) click logits and (members, B) CVR logits of a two-task (ESMM) model."""
        if not self.has_cvr:
            raise ValueError("this ranker has no CVR tower (ranker.tasks: [ctr]); train it with ranker.tasks=[ctr,cvr]")
        text = self._text(e, b)
        pairs = [self._head(i, h, e, b, text, cvr=True) for i, h in enumerate(self.members)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def task_logits(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Click and CVR logits, each (B,): the members' means (pCTCVR = sigmoid(ctr) * sigmoid(cvr))."""
        ctr, cvr = self.member_task_logits(self.embed(b), b)
        return ctr.mean(0), cvr.mean(0)

    def forward_from(self, e: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.member_logits(e, b).mean(0)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click logits, shape (B,): the mean of the members' logits."""
        return self.forward_from(self.embed(b), b)

    # ---- parameter groups -------------------------------------------------------------------------
    def cvr_tower_parameters(self) -> list[nn.Parameter]:
        """Every member's CVR tower (its MLP, output, bias and wide weights): what trains after the joint
        epochs with ``ranker.cvr_tower_epochs``; nothing else reads them, so pCTR does not depend on them."""
        if not self.has_cvr:
            raise ValueError("this ranker has no CVR tower (ranker.tasks: [ctr])")
        return [p for h in self.members for m in (h.cvr_deep, h.cvr_out, h.cvr_lin) for p in m.parameters()] \
            + [h.cvr_bias for h in self.members]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return self.text.trainable_parameters()

    def head_parameters(self) -> list[nn.Parameter]:
        enc = {id(p) for p in self.text.encoder.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in enc]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """State dict without the frozen encoder weights (those come from the base encoder)."""
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        return {n: t.detach().clone() for n, t in self.state_dict().items() if n not in frozen}
