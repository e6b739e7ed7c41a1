"""Secrets at rest and auth that fails closed, without Ray: fingerprints, secrets files, empty keys,
Serve's start-up checks (a non-loopback host is only a string here: nothing listens) and the CLI's exit."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest
import yaml

from adrec import cli
from adrec.config import build_config, load_config, save_config
from adrec.data.privacy import key_and_source
from adrec.errors import ConfigError
from adrec.keys import is_fingerprint, key_fingerprint, read_secret, store_secret
from adrec.serving.args import AppArgs, KeyMismatchError
from adrec.serving.deploy import preflight
from adrec.serving.exposure import is_loopback

PK, AK = "pk-secret-0123", "ak-secret-4567"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("ADREC_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("ADREC_API_KEY", raising=False)
    return monkeypatch


def _version(model: Path, key: str | None = None) -> Path:
    """A model folder with just its version.json (all the start-up checks read)."""
    model.mkdir(parents=True)
    info = {"version": "v-test"}
    if key is not None:
        info["pseudonym_key_fingerprint"] = key_fingerprint(key)
    (model / "version.json").write_text(json.dumps(info))
    return model


def test_fingerprint_is_an_hmac_prefix_not_the_key():
    fp = key_fingerprint(PK)
    assert is_fingerprint(fp) and fp.startswith("sha256:") and len(fp) == len("sha256:") + 16
    assert fp == key_fingerprint(PK.encode()) != key_fingerprint(PK + "x")
    assert PK not in fp and PK.encode().hex() not in fp
    assert not is_fingerprint(PK) and not is_fingerprint("sha256:xyz")


def test_saved_config_holds_fingerprints_and_the_keys_move_to_0600_files(tmp_path, no_env):
    cfg = build_config(overrides=[f"data.pseudonym_key={PK}", f"serve.api_key={AK}"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert PK not in text and AK not in text
    saved = yaml.safe_load(text)
    assert saved["data"]["pseudonym_key"] == key_fingerprint(PK)
    assert saved["serve"]["api_key"] == key_fingerprint(AK)
    for name, key in (("pseudonym.key", PK), ("api.key", AK)):
        path = tmp_path / "secrets" / name
        assert path.read_text() == key
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    assert cfg.to_dict()["data"]["pseudonym_key"] == key_fingerprint(PK)  # what manifests and Tune write

    # A later stage reads the saved config: the fingerprint names the key, found in the secrets file.
    again = load_config(tmp_path / "config.yaml")
    assert key_and_source(again.data.pseudonym_key, tmp_path) == (PK.encode(), str(tmp_path / "secrets" / "pseudonym.key"))
    no_env.setenv("ADREC_PSEUDONYM_KEY", "another-key")
    with pytest.raises(ConfigError, match=r"\$ADREC_PSEUDONYM_KEY .*not the one the run's config records"):
        key_and_source(again.data.pseudonym_key, tmp_path)


def test_store_secret_is_idempotent_and_replaces_whole(tmp_path):
    p = store_secret(tmp_path / "secrets" / "k", "one")
    assert store_secret(p, b"one") == p and read_secret(p) == b"one"
    store_secret(p, "two")
    assert read_secret(p) == b"two" and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [q.name for q in p.parent.iterdir()] == ["k"]  # no temporary left


@pytest.mark.parametrize("override", ['serve.api_key=""', "serve.api_key=", "serve.api_key='  '",
                                      'data.pseudonym_key=""', "data.pseudonym_key=", 'serve.api_key_file=""'])
def test_an_empty_key_is_a_config_error(override):
    with pytest.raises(ConfigError, match="empty"):
        build_config(overrides=[override])


def test_an_empty_key_in_yaml_env_or_file_is_a_config_error(tmp_path, no_env):
    (tmp_path / "c.yaml").write_text('serve:\n  api_key: ""\n')
    with pytest.raises(ConfigError, match="serve.api_key is empty"):
        load_config(tmp_path / "c.yaml")
    no_env.setenv("ADREC_API_KEY", "")
    with pytest.raises(ConfigError, match=r"\$ADREC_API_KEY is empty"):
        AppArgs(model_dir=str(tmp_path / "model")).resolved()
    no_env.delenv("ADREC_API_KEY")
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        AppArgs(model_dir=str(tmp_path / "model"), api_key_file=str(tmp_path / "empty.key")).api_key_bytes()
    with pytest.raises(ValueError, match="empty"):
        AppArgs(model_dir=str(tmp_path / "model"), api_key="")
    with pytest.raises(ValueError, match="a fingerprint, not a key"):
        AppArgs(model_dir=str(tmp_path / "model"), api_key=key_fingerprint(AK))


def test_app_args_from_a_saved_config_find_the_moved_keys(tmp_path, no_env):
    run = tmp_path / "run"
    save_config(build_config(overrides=[f"data.pseudonym_key={PK}", f"serve.api_key={AK}"]), run / "config.yaml")
    args = AppArgs.from_config(load_config(run / "config.yaml"), run)
    r = args.resolved()
    assert r.key_bytes() == PK.encode() and r.api_key_bytes() == AK.encode()
    assert PK not in args.model_dump_json() and AK not in args.model_dump_json()
    # Another API key in the environment than the one the run records: refused, saying which.
    no_env.setenv("ADREC_API_KEY", "not-the-one")
    with pytest.raises(ConfigError, match=r"api_key is sha256:\w+, but the key from \$ADREC_API_KEY is sha256:"):
        AppArgs.from_config(load_config(run / "config.yaml"), run)
    no_env.delenv("ADREC_API_KEY")
    (run / "secrets" / "api.key").unlink()
    with pytest.raises(ConfigError, match=r"api_key is sha256:\w+, but the key was found nowhere"):
        AppArgs.from_config(load_config(run / "config.yaml"), run)


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("0.0.0.0", False), ("", False), ("::", False),
                                       ("10.1.2.3", False), ("example.org", False)])
def test_loopback_hosts(host, loop):
    assert is_loopback(host) is loop


def test_no_key_beyond_loopback_refuses_unless_allowed(tmp_path, no_env, caplog):
    model = _version(tmp_path / "model")
    assert preflight(AppArgs(model_dir=str(model), host="127.0.0.1")).api_key_bytes() is None
    with pytest.raises(ConfigError, match=r"refusing to serve on 0.0.0.0:8000 without an API key.*allow_unauthenticated"):
        preflight(AppArgs(model_dir=str(model), host="0.0.0.0"))
    with caplog.at_level(logging.WARNING, logger="adrec.serving.exposure"):
        preflight(AppArgs(model_dir=str(model), host="0.0.0.0", allow_unauthenticated=True))
    assert "WITHOUT authentication" in caplog.text
    preflight(AppArgs(model_dir=str(model), host="0.0.0.0", api_key=AK))  # a key: any host
    no_env.setenv("ADREC_API_KEY", AK)
    preflight(AppArgs(model_dir=str(model), host="10.1.2.3"))


def test_a_version_built_with_another_key_is_refused(tmp_path, no_env):
    model = _version(tmp_path / "model", key=PK)
    preflight(AppArgs(model_dir=str(model), pseudonym_key=PK))
    with pytest.raises(KeyMismatchError) as err:
        preflight(AppArgs(model_dir=str(model), pseudonym_key="other"))
    msg = str(err.value)
    assert "keys differ" in msg and key_fingerprint(PK) in msg and key_fingerprint("other") in msg
    assert "version.json" in msg and "the app's pseudonym_key" in msg and PK not in msg
    no_env.setenv("ADREC_PSEUDONYM_KEY", "from-env")
    with pytest.raises(KeyMismatchError, match=r"from \$ADREC_PSEUDONYM_KEY"):
        preflight(AppArgs(model_dir=str(model)))
    preflight(AppArgs(model_dir=str(_version(tmp_path / "old"))))  # a version from before the field: served


def _cli_run(tmp_path: Path, key: str | None) -> Path:
    from adrec.model_version.registry import registry_of, staging_dir

    run = tmp_path / "run"
    reg = registry_of(run)
    folder = staging_dir(reg, "v1")
    _version(folder, key)
    reg.commit(folder)
    return run


def test_cli_serve_exits_2_beyond_loopback_without_a_key(tmp_path, no_env, capsys):
    run = _cli_run(tmp_path, None)
    assert cli.main(["serve", "--run", str(run), "--set", "serve.host=0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_cli_serve_exits_2_when_the_keys_differ(tmp_path, no_env, capsys):
    run = _cli_run(tmp_path, PK)
    no_env.setenv("ADREC_PSEUDONYM_KEY", "not-the-one")
    assert cli.main(["serve", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "keys differ" in err and "$ADREC_PSEUDONYM_KEY" in err and "not-the-one" not in err


def test_healthz_model_says_only_the_status():
    from adrec.serving.responses import HealthResponse

    assert set(HealthResponse.model_fields) == {"status"}


def test_ray_haproxy_still_has_no_bind_address_knob():
    """runtime.serve_ingress_env and the README say Ray binds HAProxy's stats and metrics listeners on every
    interface with no setting for the address; when this fails, Ray has one: bind them to loopback."""
    from ray.serve._private import haproxy_templates

    text = Path(haproxy_templates.__file__).read_text()
    assert "bind *:{{ config.stats_port }}" in text and "bind :{{ config.metrics_port }}" in text


def test_the_builder_refuses_beyond_loopback_without_a_key(tmp_path, no_env):
    """`serve deploy` never runs preflight: the builder checks the same rule on where Serve listens (here no
    Serve runs, so the app's host), before it reads the model version (there is none here)."""
    from adrec.serving.builder import build_app
    from adrec.serving.exposure import serve_http_address

    assert serve_http_address("0.0.0.0", 8123) == ("0.0.0.0", 8123)  # no Ray up: nothing else listens
    with pytest.raises(ConfigError, match=r"refusing to serve on 0.0.0.0:8123 without an API key"):
        build_app(AppArgs(model_dir=str(tmp_path / "missing"), host="0.0.0.0", port=8123))
    with pytest.raises(ConfigError, match="refusing"):
        build_app({"model_dir": str(tmp_path / "missing"), "host": "10.1.2.3"})  # as `serve deploy` passes args
    with pytest.raises(FileNotFoundError, match="not a model version"):  # a key: on to the (missing) version
        build_app(AppArgs(model_dir=str(tmp_path / "missing"), host="0.0.0.0", api_key=AK))
