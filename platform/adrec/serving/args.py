"""What the Serve app is built from (:class:`AppArgs`): settings, the model folder, and where the secrets come from."""

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, SecretStr

from adrec.config import CandidateConfig, ServeConfig
from adrec.data.privacy import KEY_ENV

APP_NAME = "adrec"


class AppArgs(ServeConfig):
    """Everything the Serve app is built from (the ``args`` of ``serve_apps/config.yaml``).

    The :class:`ServeConfig` fields plus the model version folder, the candidate count and where the keys
    come from.
    Relative paths are resolved against ``$ADREC_HOME`` (default: the current directory).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model_dir: str = Field(min_length=1)
    # How many candidates a request ranks: the candidates stage's count (``candidates.n_candidates`` of the
    # run config, see from_config), so that serving ranks what the candidates stage measured.
    n_candidates: int = Field(default_factory=lambda: CandidateConfig().n_candidates, ge=1)
    # ``topology`` (a ServeConfig field, see adrec.serving.builder): the `deployments` of a Serve config
    # must name that topology's deployments (Serve rejects overrides of deployments the app does not have).
    # The key that pseudonymized the data set's user ids: literal, else this file, else $pseudonym_key_env,
    # else <model_dir>/../secrets/pseudonym.key (where `adrec prepare` keeps a generated key).
    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: str | None = None
    pseudonym_key_env: str = KEY_ENV
    # The API key (`x-api-key` header): api_key, else $api_key_env when set; none -> no authentication.
    api_key: SecretStr | None = None
    api_key_env: str = "ADREC_API_KEY"
    app_name: str = APP_NAME

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path, **overrides: Any) -> "AppArgs":
        """Args for a run folder (``<run>/model``) from an :class:`AdrecConfig`."""
        run = Path(run_dir).expanduser().resolve()
        fields = cfg.serve.model_dump()
        fields.update(model_dir=str(run / "model"), n_candidates=cfg.candidates.n_candidates)
        if cfg.data.pseudonym_key:
            fields["pseudonym_key"] = cfg.data.pseudonym_key
        if fields.get("feedback_log") is None:
            fields["feedback_log"] = str(run / "feedback" / "events.jsonl")
        fields.update(overrides)
        return cls.model_validate(fields)

    def resolved(self) -> "AppArgs":
        """Absolute paths, the default feedback log and key file filled in, env-provided secrets read."""
        home = Path(os.environ.get("ADREC_HOME", os.getcwd()))

        def absolute(p: str) -> str:
            q = Path(os.path.expandvars(p)).expanduser()
            return str(q if q.is_absolute() else (home / q).resolve())

        model_dir = absolute(self.model_dir)
        upd: dict[str, Any] = {"model_dir": model_dir}
        run = Path(model_dir).parent
        upd["feedback_log"] = absolute(self.feedback_log) if self.feedback_log else str(run / "feedback" / "events.jsonl")
        if self.pseudonym_key is None:
            if self.pseudonym_key_file:
                upd["pseudonym_key_file"] = absolute(self.pseudonym_key_file)
            elif os.environ.get(self.pseudonym_key_env):
                upd["pseudonym_key"] = SecretStr(os.environ[self.pseudonym_key_env])
            elif (run / "secrets" / "pseudonym.key").is_file():
                upd["pseudonym_key_file"] = str(run / "secrets" / "pseudonym.key")
        if self.api_key is None and os.environ.get(self.api_key_env):
            upd["api_key"] = SecretStr(os.environ[self.api_key_env])
        return self.model_copy(update=upd)

    def key_bytes(self) -> bytes:
        if self.pseudonym_key is not None:
            return self.pseudonym_key.get_secret_value().encode()
        if self.pseudonym_key_file:
            return Path(self.pseudonym_key_file).read_bytes().strip()
        if os.environ.get(self.pseudonym_key_env):
            return os.environ[self.pseudonym_key_env].encode()
        raise ValueError(f"no pseudonymization key for {self.model_dir}: set pseudonym_key, pseudonym_key_file or "
                         f"${self.pseudonym_key_env} (the key `adrec prepare` used)")

    def fingerprint(self) -> str:
        """Changes with any setting (secrets included, hashed) and with this package's serving code."""
        h = hashlib.sha256(self.model_dump_json(exclude={"model_dir"}).encode())
        for secret in (self.pseudonym_key, self.api_key):
            value = secret.get_secret_value() if secret is not None else ""
            h.update(hashlib.sha256(value.encode()).digest())
        for src in sorted(Path(__file__).parent.glob("*.py")):
            h.update(src.read_bytes())
        return h.hexdigest()[:16]
