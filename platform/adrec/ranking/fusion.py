"""``FusionRanker``: the trained late-fusion model behind the :class:`Ranker` contract.

A saved fusion ranker is a self-describing folder::

    ranker.json      class, ranker config, architecture sizes, feature spec copy, calibration, training info
    model.pt         state dict of everything but the encoder
    encoder/         the (fine-tuned) encoder and its tokenizer, via save_pretrained (LoRA merged in)
    adapter/         finetune=lora only: the LoRA adapter, peft's save_pretrained (adrec.ranking.lora)
    collab/          ranker.collab only: the candidate sources behind its collaborative features
    items.parquet    the item table the model needs (index, id, text, item code columns)
    users.parquet    user multi-valued codes (only when the spec has user multi-valued fields)
    item_text.npy    cache of the pooled item text embeddings for this model version
    cache.json       fingerprint of the model files the cache was computed from

``FusionRanker.load(folder)`` rebuilds and predicts from that folder alone. Item text embeddings
are computed once per model version (at save time, or at the first load when the cache is missing
or stale), so predicting never runs the encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adrec import torchfile
from adrec.config import RankerConfig
from adrec.features.spec import FeatureSpec
from adrec.ranking.base import RANKER_JSON, Ranker
from adrec.ranking.data import EntityTables, architecture, rows_to_arrays
from adrec.features.encoder import load_encoder, load_saved_encoder, tokenize
from adrec.ranking.collab import COLLAB_DIR, CollabScorer, feature_names
from adrec.ranking.lora import read_adapter, save_encoder
from adrec.ranking.model import FusionModel

log = logging.getLogger(__name__)

FORMAT = 2
# A click-only ranker is still written as format 1 (any adrec reads it); a two-task (ESMM) one as 2, which an
# adrec without the CVR tower refuses by its format instead of failing on unexpected weights.
_FORMAT_CTR_ONLY = 1
_EPS = 1e-7
# State-dict prefixes of the encoder (``text.layers``: the same blocks again, in checkpoints written before the
# text tower stopped registering them twice): encoder/ holds those weights.
_ENCODER_KEYS = ("text.encoder.", "text.layers.")


def model_arch(cfg: RankerConfig, spec: FeatureSpec) -> dict:
    """Field layout of ``spec`` plus the network sizes of ``cfg`` (stored in ranker.json)."""
    arch = architecture(spec)
    arch.update(embed_dim=cfg.embed_dim, hidden=list(cfg.hidden), cross_layers=cfg.cross_layers,
                cross_rank=cfg.cross_rank, dropout=cfg.dropout, embed_dropout=cfg.embed_dropout,
                att_hidden=cfg.att_hidden, fm=cfg.fm, members=cfg.ensemble, mixed_members=cfg.ensemble_mixed,
                finetune=cfg.finetune, finetune_last_n=cfg.finetune_last_n,
                max_text_len=cfg.max_text_len, text_tower=cfg.text_tower,
                dense=feature_names(cfg.collab) if cfg.collab else [], tasks=list(cfg.tasks))
    return arch


def _sigmoid(z: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
    return np.clip(p, _EPS, 1 - _EPS)


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    files = [folder / "model.pt", *sorted((folder / "encoder").glob("*.safetensors")),
             *sorted((folder / "encoder").glob("*.bin")), folder / "items.parquet"]
    for p in files:
        if p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]


class FusionRanker(Ranker):
    name = "fusion"

    def __init__(self, model: FusionModel, cfg: RankerConfig, spec: dict, tables: EntityTables, tokenizer,
                 calibration: tuple[float, float] = (1.0, 0.0), info: dict | None = None):
        self.model = model
        self.cfg = cfg
        self.arch = model.arch
        self.spec = spec
        self.tables = tables
        self.tokenizer = tokenizer
        self.calibration = (float(calibration[0]), float(calibration[1]))
        # The ESMM head's pCVR calibration (Platt on the valid clicked rows' conversions; identity for a ranker
        # saved before it, whose pCVR was the tower's sigmoid)
        self.cvr_calibration = (1.0, 0.0)
        self.info = dict(info or {})
        self.adapter_files: dict[str, bytes] = {}  # a LoRA ranker loaded merged: its adapter, saved again as is
        self.collab: CollabScorer | None = None  # ranker.collab: the sources fitted on train + valid
        self.model.eval()

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def build_arch(cfg: RankerConfig, spec: FeatureSpec) -> dict:
        return model_arch(cfg, spec)

    @classmethod
    def build(cls, cfg: RankerConfig, spec: FeatureSpec, items: pd.DataFrame, users: pd.DataFrame | None,
              encoder=None, tokenizer=None, refresh: bool = True) -> "FusionRanker":
        """An untrained ranker for ``spec`` and these item/user tables (training starts from it).

        ``refresh``: compute the item text cache now (training computes it itself).
        """
        if encoder is None or tokenizer is None:
            encoder, tokenizer = load_encoder(cfg)
        arch = model_arch(cfg, spec)
        tables = EntityTables.from_frames(items, users, arch)
        lora = cfg.lora.model_dump() if cfg.finetune == "lora" else None
        model = _make_model(arch, cfg, tables, encoder, tokenizer, refresh=refresh, lora=lora)
        return cls(model, cfg, asdict(spec), tables, tokenizer)

    # ---- inference --------------------------------------------------------------------------------
    def batch(self, rows: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Model input tensors for ranker input rows."""
        arrays = rows_to_arrays(rows, self.arch)
        if self.arch.get("dense"):  # the collaborative features: one implementation for every caller
            if self.collab is None:
                raise ValueError("this ranker reads collaborative features but carries no fitted sources")
            hist = rows["hist"].to_numpy() if "hist" in rows.columns else [None] * len(rows)
            arrays["dense"] = self.collab.features(hist, rows["item_idx"].to_numpy())
        device = self.model.device
        return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}

    def logits(self, rows: pd.DataFrame, batch_size: int = 512) -> np.ndarray:
        """Raw (uncalibrated) logits."""
        # eval() walks every module, and so did checking each one's flag (~0.6 ms, a visible share of a
        # served request): the root's flag decides. Only train()/eval() of the whole model set it here (the
        # text tower's own eval()/train(was) around its encoding restores what it found).
        if self.model.training:
            self.model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                out.append(self.model(self.batch(rows.iloc[i:i + batch_size])).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0, dtype=np.float64)

    def predict(self, rows: pd.DataFrame, batch_size: int = 512) -> np.ndarray:
        a, b = self.calibration
        return _sigmoid(a * self.logits(rows, batch_size) + b)

    @property
    def tasks(self) -> list[str]:
        """What this ranker predicts: ``["ctr"]``, or ``["ctr", "cvr"]`` for the ESMM head (issue 17)."""
        return self.model.tasks

    def predict_tasks(self, rows: pd.DataFrame, batch_size: int = 512) -> dict[str, np.ndarray]:
        """``{"ctr", "cvr", "ctcvr"}`` per row: the calibrated pCTR (what :meth:`predict` gives), the calibrated
        pCVR (of a conversion given a click; ``cvr_calibration``, fitted on the valid clicked rows) and pCTCVR = pCTR x pCVR (a conversion per impression: what an
        advertiser paying per conversion earns from showing the item, bid x pCTCVR). Needs the CVR tower
        (``ranker.tasks=[ctr, cvr]``); a click-only ranker raises ValueError saying so."""
        if not self.model.has_cvr:
            raise ValueError("this ranker predicts clicks only (ranker.tasks: [ctr]): train it with "
                             "ranker.tasks=[ctr,cvr] on data with a conversion label for pCVR and pCTCVR")
        if any(m.training for m in self.model.modules()):
            self.model.eval()
        ctr, cvr = [], []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                z_ctr, z_cvr = self.model.task_logits(self.batch(rows.iloc[i:i + batch_size]))
                ctr.append(z_ctr.float().cpu().numpy())
                cvr.append(z_cvr.float().cpu().numpy())
        z_ctr = np.concatenate(ctr).astype(np.float64) if ctr else np.zeros(0)
        z_cvr = np.concatenate(cvr).astype(np.float64) if cvr else np.zeros(0)
        (a, b), (a_cvr, b_cvr) = self.calibration, self.cvr_calibration
        p_ctr, p_cvr = _sigmoid(a * z_ctr + b), _sigmoid(a_cvr * z_cvr + b_cvr)
        return {"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr}

    def item_embeddings(self) -> np.ndarray:
        """(n_items, d) L2-normalised pooled item text embeddings of the (fine-tuned) encoder.

        Row i is item index i; items with no text get the embedding of the empty text. These are the
        cached vectors the model reads, so they cost nothing after load.
        """
        emb = self.model.text.pooled[1:].detach().cpu().numpy().astype(np.float32)
        norm = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norm, 1e-12)

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        folder = Path(path)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(_ENCODER_KEYS)}
        torch.save(state, tmp / "model.pt")
        save_encoder(self.model.text.encoder, tmp, self.adapter_files)
        self.tokenizer.save_pretrained(tmp / "encoder")
        self.tables.items.to_parquet(tmp / "items.parquet", index=False)
        if self.tables.users is not None:
            self.tables.users.to_parquet(tmp / "users.parquet", index=False)
        if self.collab is not None:
            self.collab.save(tmp / COLLAB_DIR)
        meta = {
            "class": "FusionRanker",
            "name": self.name,
            "format": FORMAT if self.model.has_cvr else _FORMAT_CTR_ONLY,
            "config": json.loads(self.cfg.model_dump_json()),
            "arch": self.arch,
            "text_dim": self.model.text.hidden_size,
            "spec": self.spec,
            "calibration": {"a": self.calibration[0], "b": self.calibration[1]},
            **({"cvr_calibration": {"a": self.cvr_calibration[0], "b": self.cvr_calibration[1]}}
               if self.model.has_cvr else {}),
            "info": self.info,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / RANKER_JSON).write_text(json.dumps(meta, indent=1, default=str))
        np.save(tmp / "item_text.npy", self.model.text.pooled.detach().cpu().numpy())
        (tmp / "cache.json").write_text(json.dumps({"fingerprint": _fingerprint(tmp)}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
        log.info("fusion ranker saved to %s", folder)

    @classmethod
    def load(cls, path) -> "FusionRanker":
        folder = Path(path)
        meta = json.loads((folder / RANKER_JSON).read_text())
        if meta.get("format", 0) > FORMAT:
            raise ValueError(f"{folder} was written by a newer adrec (format {meta['format']} > {FORMAT})")
        cfg = RankerConfig.model_validate(meta["config"])
        encoder, tok = load_saved_encoder(folder / "encoder")
        items = pd.read_parquet(folder / "items.parquet")
        users = pd.read_parquet(folder / "users.parquet") if (folder / "users.parquet").is_file() else None
        arch = meta["arch"]
        tables = EntityTables.from_frames(items, users, arch)
        model = _make_model(arch, cfg, tables, encoder, tok, refresh=False)
        state = torchfile.load(folder / "model.pt", "a ranker's weights",
                               "train the ranker again (`adrec train --run R`)")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(_ENCODER_KEYS)]
        if missing or unexpected:
            raise ValueError(f"{folder}/model.pt does not fit its ranker.json: missing {missing}, unexpected {unexpected}")
        cal = meta.get("calibration", {})
        ranker = cls(model, cfg, meta["spec"], tables, tok, (cal.get("a", 1.0), cal.get("b", 0.0)), meta.get("info"))
        cvr_cal = meta.get("cvr_calibration", {})
        ranker.cvr_calibration = (float(cvr_cal.get("a", 1.0)), float(cvr_cal.get("b", 0.0)))
        ranker.adapter_files = read_adapter(folder)
        if (folder / COLLAB_DIR).is_dir():
            ranker.collab = CollabScorer.load(folder / COLLAB_DIR)
        ranker._load_text_cache(folder)
        return ranker

    def _load_text_cache(self, folder: Path) -> None:
        cache, info = folder / "item_text.npy", folder / "cache.json"
        fp = _fingerprint(folder)
        pooled = self.model.text.pooled
        if cache.is_file() and info.is_file():
            try:
                ok = json.loads(info.read_text()).get("fingerprint") == fp
                arr = np.load(cache) if ok else None
                if arr is not None and arr.shape == tuple(pooled.shape):
                    pooled.copy_(torch.from_numpy(arr))
                    return
            except (OSError, ValueError) as err:
                log.warning("item text cache in %s unreadable (%s); recomputing", folder, err)
        log.info("computing item text embeddings for %s (%d items)", folder, pooled.shape[0] - 1)
        self.model.text.refresh()
        try:
            np.save(cache, pooled.cpu().numpy())
            info.write_text(json.dumps({"fingerprint": fp}))
        except OSError as err:  # a read-only model folder still serves, it just recomputes next time
            log.warning("could not write the item text cache to %s: %s", folder, err)


def _make_model(arch: dict, cfg: RankerConfig, tables: EntityTables, encoder, tokenizer, refresh: bool = True,
                lora: dict | None = None) -> FusionModel:
    """``lora``: the LoRA settings to wrap a base encoder with (training); None for a saved, merged one."""
    ids, mask = tokenize(tokenizer, tables.text, cfg.max_text_len)
    model = FusionModel(arch, encoder, ids, mask, tables.item_attr, tables.multi, lora=lora)
    if refresh:
        model.text.refresh()
    return model
