"""LoRA of the ranker's text encoder (``ranker.finetune=lora``) with Hugging Face peft.

Training wraps the encoder (:func:`apply_lora`): only the low-rank factors of the target projections
train, on the batch's unique items as the other fine-tuning modes do (under ``ranker.dp``: each row on its own
candidate's text, inside its per-example gradient, :mod:`adrec.ranking.train.privacy`), and FGSM still perturbs the token
embeddings (the wrapped model takes ``inputs_embeds`` as the base one does). Saving writes the adapter
alone (``adapter/``, peft's ``save_pretrained``: the version keeps what was learned) and the encoder with
the adapter merged into its weights (``encoder/``, :func:`merged_copy`), so a loaded ranker is a plain
encoder: serving runs no adapter and costs what it did. peft and transformers are imported here only.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # in a saved ranker's folder


def apply_lora(encoder, settings: dict):
    """``encoder`` wrapped by peft with LoRA on ``settings["target_modules"]``; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(r=int(settings["rank"]), lora_alpha=float(settings["alpha"]),
                      lora_dropout=float(settings["dropout"]), target_modules=list(settings["target_modules"]),
                      bias="none")
    model = get_peft_model(encoder, conf)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA on %s (rank %d, alpha %g): %d of %d encoder parameters train", conf.target_modules, conf.r,
             conf.lora_alpha, n_train, n_all)
    return model


def is_lora(encoder) -> bool:
    from peft import PeftModel

    return isinstance(encoder, PeftModel)


def merged_copy(encoder):
    """A plain transformers model with the adapter's update folded into the base weights (``encoder`` is kept)."""
    return copy.deepcopy(encoder).merge_and_unload()


def read_adapter(folder: Path) -> dict[str, bytes]:
    """The adapter files of a saved ranker (empty when it has none), kept so a re-save writes them again."""
    d = Path(folder) / ADAPTER_DIR
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()} if d.is_dir() else {}


def save_encoder(encoder, folder: Path, adapter_files: dict[str, bytes] | None = None) -> None:
    """``folder/encoder``: the serving encoder (merged when ``encoder`` carries LoRA); ``folder/adapter``: the
    adapter (peft's own files), from ``encoder`` or, for a ranker loaded merged, the files it was loaded with."""
    folder = Path(folder)
    if is_lora(encoder):
        encoder.save_pretrained(folder / ADAPTER_DIR)
        merged_copy(encoder).save_pretrained(folder / "encoder")
        return
    encoder.save_pretrained(folder / "encoder")
    if adapter_files:
        (folder / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
        for name, data in adapter_files.items():
            (folder / ADAPTER_DIR / name).write_bytes(data)
