"""Pseudonymization of user ids with a keyed hash, applied at ingestion."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

KEY_ENV = "ADREC_PSEUDONYM_KEY"


def resolve_key(configured: str | None, run_dir: Path | None = None) -> bytes:
    """Key from config, else $ADREC_PSEUDONYM_KEY, else a random key kept in ``run/secrets`` (mode 0600).

    The key never goes into features, logs or model files: only the serving side needs it,
    to map an incoming raw id onto the same pseudonym.
    """
    key = configured or os.environ.get(KEY_ENV)
    if key:
        return key.encode()
    if run_dir is None:
        raise ValueError(f"no pseudonymization key: set data.pseudonym_key or ${KEY_ENV}")
    path = Path(run_dir) / "secrets" / "pseudonym.key"
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key_b = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_b)
    log.warning("no pseudonymization key configured: generated one in %s (set $%s to share one across runs)", path, KEY_ENV)
    return key_b


def pseudonymize(raw_id: str, key: bytes) -> str:
    return "u_" + hmac.new(key, str(raw_id).encode(), hashlib.sha256).hexdigest()[:20]


def pseudonymize_series(ids: pd.Series, key: bytes) -> pd.Series:
    # Hash each distinct id once: logs repeat users many times.
    uniq = pd.unique(ids.astype(str).to_numpy())
    mapping = {u: pseudonymize(u, key) for u in uniq}
    return ids.astype(str).map(mapping)


def pseudonym_map(raw_ids, key: bytes) -> dict[str, str]:
    """pseudonym -> raw id, for reports that must speak the data owner's ids."""
    return {pseudonymize(str(r), key): str(r) for r in np.unique(np.asarray(raw_ids).astype(str))}
