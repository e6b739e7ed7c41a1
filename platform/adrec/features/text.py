"""Sentence embeddings of item texts with the configured (frozen) encoder.

Used where text must stand in for interactions: the cold-start candidate source and the
frozen-encoder peer. Mean pooling over non-padding tokens, L2-normalised.
"""

from __future__ import annotations

import logging

import numpy as np

from adrec.config import RankerConfig
from adrec.features.encoder import load_encoder, mean_pool

log = logging.getLogger(__name__)


def embed_texts(cfg: RankerConfig, texts: list[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    model, tok = load_encoder(cfg)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch_size), desc="embedding item texts", disable=not show_progress):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=cfg.max_text_len, return_tensors="pt")
            pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 1), np.float32)
