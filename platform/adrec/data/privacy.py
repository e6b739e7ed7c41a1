"""Pseudonymization of user ids with a keyed hash, applied at ingestion."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.errors import ConfigError
from adrec.keys import (PSEUDONYM_KEY_FILE, SECRETS_DIR, check_not_empty, env_secret, is_fingerprint, key_fingerprint,
                        read_secret, store_secret)

log = logging.getLogger(__name__)

KEY_ENV = "ADREC_PSEUDONYM_KEY"


def resolve_key(configured: str | None, run_dir: Path | None = None) -> bytes:
    """The pseudonymization key (see :func:`key_and_source`)."""
    return key_and_source(configured, run_dir)[0]


def key_and_source(configured: str | None, run_dir: Path | None = None) -> tuple[bytes, str]:
    """The key and where it came from: ``data.pseudonym_key`` when it is a literal key (then also kept in
    ``run/secrets/pseudonym.key``), else $ADREC_PSEUDONYM_KEY, else that file, else a random key written
    there (mode 0600). When ``configured`` is a fingerprint (a saved config's), the key found must have it.

    The key never goes into features, logs, config files or model files: only the serving side needs it,
    to map an incoming raw id onto the same pseudonym.
    """
    check_not_empty(configured, "data.pseudonym_key")
    expected = configured if is_fingerprint(configured) else None
    path = Path(run_dir) / SECRETS_DIR / PSEUDONYM_KEY_FILE if run_dir is not None else None
    env = env_secret(KEY_ENV)
    if configured and expected is None:
        key, source = configured.encode(), "data.pseudonym_key"
        if path is not None:
            store_secret(path, key)
    elif env:
        key, source = env.encode(), f"${KEY_ENV}"
    elif path is not None and path.exists():
        key, source = read_secret(path), str(path)
    elif expected is not None or path is None:
        raise ConfigError(f"no pseudonymization key{f' ({expected}, as the run config records)' if expected else ''}: "
                          f"set ${KEY_ENV}" + (f" or put it in {path}" if path is not None else " or data.pseudonym_key"))
    else:
        key, source = store_secret(path, secrets.token_hex(32)).read_bytes(), str(path)
        log.warning("no pseudonymization key configured: generated one in %s (set $%s to share one across runs)",
                    path, KEY_ENV)
    if expected is not None and key_fingerprint(key) != expected:
        raise ConfigError(f"the pseudonymization key from {source} ({key_fingerprint(key)}) is not the one the run's "
                          f"config records ({expected}): use the key the run was prepared with")
    return key, source


def pseudonymize(raw_id: str, key: bytes) -> str:
    return "u_" + hmac.new(key, str(raw_id).encode(), hashlib.sha256).hexdigest()[:20]


#: Pseudonyms this process computed, per key: a streamed prepare parses its log block by block in the same
#: few worker processes, and a user recurs in many blocks (at 16M impressions of 200k users, in nearly every
#: one), so each worker hashes a user once instead of once per block. Bounded: cleared past _MEMO_MAX ids.
_MEMO: dict[bytes, dict[str, str]] = {}
_MEMO_MAX = 4_000_000


def pseudonymize_series(ids: pd.Series, key: bytes) -> pd.Series:
    # Hash each distinct id once: logs repeat users many times.
    text = ids.astype(str)
    uniq = pd.unique(text.to_numpy())
    memo = _MEMO.setdefault(key, {})
    if len(memo) + len(uniq) > _MEMO_MAX:
        memo.clear()
    mapping = {}
    for u in uniq:
        p = memo.get(u)
        if p is None:
            p = memo[u] = pseudonymize(u, key)
        mapping[u] = p
    return text.map(mapping)


def pseudonym_map(raw_ids, key: bytes) -> dict[str, str]:
    """pseudonym -> raw id, for reports that must speak the data owner's ids."""
    return {pseudonymize(str(r), key): str(r) for r in np.unique(np.asarray(raw_ids).astype(str))}
