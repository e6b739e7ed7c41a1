"""Sentence embeddings of item texts with the configured (frozen) encoder.

Used where text must stand in for interactions: the cold-start candidate source and the
frozen-encoder peer. Mean pooling over non-padding tokens, L2-normalised.
"""

from __future__ import annotations

import logging

import numpy as np

from adrec.config import RankerConfig

log = logging.getLogger(__name__)


def embed_texts(cfg: RankerConfig, texts: list[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    from adrec.ranking.encoder import load_encoder

    model, tok = load_encoder(cfg)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch_size), desc="embedding item texts", disable=not show_progress):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=cfg.max_text_len, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 1), np.float32)
