"""What the Serve app is built from (:class:`AppArgs`): settings, the model folder, and where the secrets come from."""

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, field_validator

from adrec import storage
from adrec.config import CandidateConfig, ServeConfig
from adrec.data.privacy import KEY_ENV
from adrec.errors import ConfigError
from adrec.keys import (API_KEY_FILE, PSEUDONYM_KEY_FILE, SECRETS_DIR, check_not_empty, env_secret, is_fingerprint,
                        key_fingerprint, read_secret, store_secret)
from adrec.model_version.registry import VERSIONS_DIR, registry_of
from adrec.model_version.writer import PSEUDONYM_KEY_FINGERPRINT
from adrec.run import RunDir

APP_NAME = "adrec"
API_KEY_ENV = "ADREC_API_KEY"


def run_of_version(model_dir: str) -> str:
    """The run a version location belongs to: above ``versions/<n>``, else the folder above the version."""
    parent = model_dir.rstrip("/").rsplit("/", 1)[0]
    head, _, last = parent.rpartition("/")
    return head if last == VERSIONS_DIR and head else parent


def default_feedback_log(run_uri: str) -> str:
    """A run's feedback log: a JSON-lines file for a local run, a folder of segments on an object store."""
    return f"{run_uri}/feedback" if storage.is_remote(run_uri) else f"{run_uri}/feedback/events.jsonl"


class AppArgs(ServeConfig):
    """Everything the Serve app is built from (the ``args`` of ``serve_apps/config.yaml``).

    The :class:`ServeConfig` fields plus the model version folder, the candidate count and where the keys
    come from.
    Relative paths are resolved against ``$ADREC_HOME`` (default: the current directory).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The model version to serve: a version folder or URI (``RUN/versions/<n>``; replicas on any node copy
    # a remote one into their cache, see adrec.model_version.materialize), or a run: its live version.
    model_dir: str = Field(min_length=1)
    # The run the version belongs to (path or URI): where the default feedback log and the secrets folder
    # are. Default: the folder above ``versions/`` (or, for a loose version folder, the one above it).
    run_dir: str | None = None
    # How many candidates a request ranks: the candidates stage's count (``candidates.n_candidates`` of the
    # run config, see from_config), so that serving ranks what the candidates stage measured.
    n_candidates: int = Field(default_factory=lambda: CandidateConfig().n_candidates, ge=1)
    # ``topology`` (a ServeConfig field, see adrec.serving.builder): the `deployments` of a Serve config
    # must name that topology's deployments (Serve rejects overrides of deployments the app does not have).
    # The key that pseudonymized the data set's user ids: literal, else this file, else $pseudonym_key_env,
    # else <run>/secrets/pseudonym.key (where `adrec prepare` keeps it).
    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: str | None = None
    pseudonym_key_env: str = KEY_ENV
    # The API key (`x-api-key` header): api_key, else api_key_file, else $api_key_env, else
    # <run>/secrets/api.key; none -> no authentication (loopback only, see adrec.serving.deploy).
    api_key: SecretStr | None = None
    api_key_env: str = API_KEY_ENV
    app_name: str = APP_NAME
    # Secrets that resolved() read from the environment: field -> variable (for messages saying where a key came from).
    _from_env: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("pseudonym_key", "api_key")
    @classmethod
    def _key_not_empty(cls, v: SecretStr | None, info) -> SecretStr | None:  # replaces ServeConfig's (a str there)
        if v is not None:
            check_not_empty(v.get_secret_value(), info.field_name)
            if is_fingerprint(v.get_secret_value()):
                raise ValueError(f"{info.field_name} is a fingerprint, not a key: give the key itself, its file "
                                 f"({info.field_name}_file) or its environment variable")
        return v

    @field_validator("pseudonym_key_file", "api_key_file")
    @classmethod
    def _file_not_empty(cls, v: str | None, info) -> str | None:
        check_not_empty(v, info.field_name)
        return v

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path | RunDir, **overrides: Any) -> "AppArgs":
        """Args for a run's live model version from an :class:`AdrecConfig`.

        A literal key in ``cfg`` is kept in the run's secrets folder (mode 0600) and the args name that
        file, so the key is in no Serve config; a fingerprint in ``cfg`` (a saved config's) must match the
        key found (a :class:`ConfigError` otherwise).
        """
        rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        run = rd.path  # local: the run folder; remote: its cache (the secrets folder never leaves the node)
        fields = cfg.serve.model_dump()
        registry = registry_of(rd.location)
        # The live version; a run not trained yet gets its versions folder, which every reader refuses
        # with "not a model version: run `adrec train` first".
        model_dir = registry.live().uri if registry.live_record() else registry.location.uri
        fields.update(model_dir=model_dir, run_dir=rd.uri, n_candidates=cfg.candidates.n_candidates)
        expected = {"pseudonym_key": cfg.data.pseudonym_key, "api_key": cfg.serve.api_key}
        fields["api_key"] = None
        for name, filename in cfg.literal_secrets().items():
            field = "pseudonym_key" if filename == PSEUDONYM_KEY_FILE else "api_key"
            fields[f"{field}_file"] = str(store_secret(run / SECRETS_DIR / filename, expected[field]))
        if fields.get("feedback_log") is None:
            fields["feedback_log"] = default_feedback_log(rd.uri)
        fields.update(overrides)
        args = cls.model_validate(fields)
        found = args.resolved()
        for field, want in expected.items():
            if is_fingerprint(want):
                key, source = found.pseudonym_key_source() if field == "pseudonym_key" else found.api_key_source()
                if key is None or key_fingerprint(key) != want:
                    raise ConfigError(f"the run config's {field} is {want}, but the key "
                                      + (f"from {source} is {key_fingerprint(key)}" if key is not None else
                                         "was found nowhere") + ": give the key the run was prepared with")
        return args

    def resolved(self) -> "AppArgs":
        """Absolute paths, the default feedback log and key files filled in, env-provided secrets read."""
        home = Path(os.environ.get("ADREC_HOME", os.getcwd()))

        def absolute(p: str) -> str:
            p = os.path.expandvars(p)
            if storage.is_remote(p):
                return storage.normalize(p)
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (home / q).resolve())

        def version_of(location: str) -> str:
            # A run instead of a version: its live version (what `adrec serve --run` serves).
            location = absolute(location)
            reg = registry_of(location)
            if not (storage.resolve(location) / "version.json").is_file() and reg.live_record():
                return reg.live().uri
            return location

        model_dir = version_of(self.model_dir) if self.model_dir != "(user_config)" else absolute(self.model_dir)
        run_dir = absolute(self.run_dir) if self.run_dir else run_of_version(model_dir)
        upd: dict[str, Any] = {"model_dir": model_dir, "run_dir": run_dir}
        if self.ab is not None:  # each arm's own version pinned now, as the app's (a run: its live version today)
            upd["ab"] = self.ab.model_copy(update={"arms": [
                a.model_copy(update={"model_dir": version_of(a.model_dir) if a.model_dir else None})
                for a in self.ab.arms]})
        secrets = RunDir(run_dir).path / SECRETS_DIR
        upd["feedback_log"] = absolute(self.feedback_log) if self.feedback_log else default_feedback_log(run_dir)
        from_env = dict(self._from_env)
        for field, env, filename in (("pseudonym_key", self.pseudonym_key_env, PSEUDONYM_KEY_FILE),
                                     ("api_key", self.api_key_env, API_KEY_FILE)):
            if getattr(self, field) is not None:
                continue
            if getattr(self, f"{field}_file"):
                upd[f"{field}_file"] = absolute(getattr(self, f"{field}_file"))
            elif env_secret(env):
                upd[field] = SecretStr(os.environ[env])
                from_env[field] = env
            elif (secrets / filename).is_file():
                upd[f"{field}_file"] = str(secrets / filename)
        out = self.model_copy(update=upd)
        out._from_env = from_env
        return out

    def pseudonym_key_source(self) -> tuple[bytes | None, str]:
        """The pseudonymization key of (resolved) args and where it came from (None: none found)."""
        return self._secret("pseudonym_key", self.pseudonym_key_env)

    def api_key_source(self) -> tuple[bytes | None, str]:
        """The API key of (resolved) args and where it came from (None: no authentication)."""
        return self._secret("api_key", self.api_key_env)

    def _secret(self, field: str, env: str) -> tuple[bytes | None, str]:
        literal, path = getattr(self, field), getattr(self, f"{field}_file")
        if literal is not None:
            return literal.get_secret_value().encode(), (f"${self._from_env[field]}" if field in self._from_env
                                                         else f"the app's {field}")
        if path:
            return read_secret(path), str(path)
        value = env_secret(env)
        return (value.encode() if value else None), f"${env}"

    def ingress_writes_feedback(self) -> bool:
        """Whether the fused Ingress replicas write /feedback's events themselves (``feedback_writer``)."""
        if self.feedback_writer == "auto":
            return self.topology == "fused" and storage.is_remote(self.feedback_log or "")
        return self.feedback_writer == "ingress"

    def key_bytes(self) -> bytes:
        key, _ = self.pseudonym_key_source()
        if key is None:
            raise ConfigError(f"no pseudonymization key for {self.model_dir}: set pseudonym_key, pseudonym_key_file "
                              f"or ${self.pseudonym_key_env} (the key `adrec prepare` used)")
        return key

    def api_key_bytes(self) -> bytes | None:
        return self.api_key_source()[0]

    def check_version_key(self, info: dict, model_dir: str | Path) -> None:
        """Refuse a model version whose users another key pseudonymized (every user would be a cold start).

        ``info``: the version's ``version.json``; a version without the field (written before it existed)
        passes.
        """
        want = info.get(PSEUDONYM_KEY_FINGERPRINT)
        if want is None:
            return
        key, source = self.pseudonym_key_source()
        have = key_fingerprint(key) if key is not None else None
        if have != want:
            raise KeyMismatchError(
                f"the pseudonymization keys differ: model version {info.get('version')} in {model_dir} was built "
                f"with key {want} (its version.json, recorded by `adrec prepare`), the app has "
                + (f"key {have} from {source}" if key is not None else "no key")
                + ": every user would be a cold start; serve with the key the run was prepared with")

    def fingerprint(self) -> str:
        """Changes with any setting (secrets included, as their fingerprints) and with this package's serving code."""
        h = hashlib.sha256(self.model_dump_json(exclude={"model_dir", "run_dir"}).encode())
        for secret in (self.pseudonym_key, self.api_key):
            h.update((key_fingerprint(secret.get_secret_value()) if secret is not None else "").encode())
        for src in sorted(Path(__file__).parent.glob("*.py")):
            h.update(src.read_bytes())
        return h.hexdigest()[:16]


class KeyMismatchError(ConfigError):
    """The app's pseudonymization key is not the one a model version was built with."""
