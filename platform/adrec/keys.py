"""Secrets (the pseudonymization key, the API key): where they are read, how they are kept, and the
fingerprint that stands for them in everything adrec writes.

A key is never written in clear outside a run's ``secrets/`` folder (files of mode 0600). Config files,
manifests, Tune's files and model versions record its fingerprint instead: enough to tell two keys apart
(and to say which one a run or a version was built with), useless to recompute a pseudonym or to call
the API.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from pathlib import Path

from adrec.errors import ConfigError

log = logging.getLogger(__name__)

SECRETS_DIR = "secrets"  # in a run folder
PSEUDONYM_KEY_FILE = "pseudonym.key"
API_KEY_FILE = "api.key"

FINGERPRINT_PREFIX = "sha256:"
# An HMAC of a fixed label keyed by the secret, not a plain hash of it: the fingerprint of a short or
# guessable key is no cheaper to invert than the HMAC-SHA256 that pseudonymizes user ids with it.
_LABEL = b"adrec key fingerprint v1"
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{16}$")


def key_fingerprint(key: bytes | str) -> str:
    """``sha256:`` and the first 16 hex digits of HMAC-SHA256(key, a fixed label)."""
    k = key.encode() if isinstance(key, str) else bytes(key)
    return FINGERPRINT_PREFIX + hmac.new(k, _LABEL, hashlib.sha256).hexdigest()[:16]


def is_fingerprint(value: object) -> bool:
    """A config value that names a key by its fingerprint (what adrec writes in place of a literal key)."""
    return isinstance(value, str) and bool(_FINGERPRINT_RE.match(value))


def check_not_empty(value: str | bytes | None, what: str) -> None:
    """An empty key is a configuration error, never "no key" (which would turn authentication off)."""
    if value is not None and not value.strip():
        raise ConfigError(f"{what} is empty: an empty key is a configuration error (it never turns a check off); "
                          "give a key or leave it unset")


def env_secret(name: str) -> str | None:
    """``$name`` (None when unset); set but empty is a :class:`ConfigError`."""
    value = os.environ.get(name)
    check_not_empty(value, f"${name}")
    return value


def read_secret(path: str | Path) -> bytes:
    """A secrets file's key (surrounding whitespace stripped); an empty file is a :class:`ConfigError`."""
    p = Path(path)
    try:
        data = p.read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"cannot read the key file {p}: {err.strerror}") from None
    check_not_empty(data, f"the key file {p}")
    if p.stat().st_mode & 0o077:
        log.warning("key file %s is readable by other users (mode %o): chmod 600 it", p, p.stat().st_mode & 0o777)
    return data


def store_secret(path: str | Path, key: bytes | str) -> Path:
    """Keep ``key`` in ``path`` (mode 0600, written whole or not at all); a no-op when it already holds it."""
    p = Path(path)
    k = key.encode() if isinstance(key, str) else bytes(key)
    check_not_empty(k, f"the key for {p}")
    if p.is_file():
        if hmac.compare_digest(p.read_bytes().strip(), k.strip()):
            return p
        log.warning("replacing the key in %s (%s) with the one given (%s)", p, key_fingerprint(p.read_bytes().strip()),
                    key_fingerprint(k))
    p.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(p.parent, 0o700)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(k)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(p)
    return p
