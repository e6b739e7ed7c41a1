"""How adrec starts Ray: the Serve ingress environment and its scoping (no Ray started)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adrec import runtime
from adrec.config import RayConfig, build_config
from adrec.errors import ConfigError
from adrec.runtime import (JOB_CONFIG_ENV, _environ, cluster_address, haproxy_threads, ray_init_options,
                           serve_ingress_env)

REPO = Path(__file__).resolve().parents[2]


def test_haproxy_ingress_env(monkeypatch):
    for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_NBTHREAD",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.delenv(var, raising=False)
    env = serve_ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Ports of their own (two local Rays must not both bind HAProxy's fixed 8404/9101), above Ray's workers.
    stats, metrics = int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert stats != metrics and min(stats, metrics) >= 20000
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    assert int(env["RAY_SERVE_HAPROXY_NBTHREAD"]) == max(1, min(4, (os.cpu_count() or 2) // 2))


def test_haproxy_ingress_env_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "28404")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_NBTHREAD", "3")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    env = serve_ingress_env("haproxy")
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "28404"
    assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == "3" and haproxy_threads() == 3
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def test_proxy_ingress_env_turns_both_switches_off():
    assert serve_ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}


def test_environ_is_scoped_to_the_block(monkeypatch):
    monkeypatch.setenv("ADREC_T_KEPT", "before")
    monkeypatch.delenv("ADREC_T_NEW", raising=False)
    with _environ({"ADREC_T_KEPT": "inside", "ADREC_T_NEW": "x"}):
        assert os.environ["ADREC_T_KEPT"] == "inside" and os.environ["ADREC_T_NEW"] == "x"
    assert os.environ["ADREC_T_KEPT"] == "before" and "ADREC_T_NEW" not in os.environ


def test_serve_ingress_is_a_checked_config_key():
    assert build_config().ray.serve_ingress == "haproxy"
    assert build_config(overrides=["ray.serve_ingress=proxy"]).ray.serve_ingress == "proxy"
    with pytest.raises(ConfigError, match="serve_ingress"):
        build_config(overrides=["ray.serve_ingress=nginx"])


# ---- joining a cluster: the address Ray gives, and the code shipped to the workers (no Ray started) ----

ADREC_DIR = Path(runtime.__file__).resolve().parent


def test_a_local_ray_binds_loopback_and_ships_nothing(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    opts, env = ray_init_options(RayConfig(num_cpus=2))
    assert opts["address"] is None and opts["_node_ip_address"] == "127.0.0.1" and opts["num_cpus"] == 2
    assert "runtime_env" not in opts and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_a_job_driver_joins_at_the_address_ray_gives_it(monkeypatch):
    """Inside a Ray job only $RAY_ADDRESS says where the cluster is: no forced 127.0.0.1, no num_cpus
    (Ray refuses it when joining), and the workers get this process's adrec."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.3.7:6379")
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    opts, env = ray_init_options(RayConfig(num_cpus=2))
    assert opts["address"] == "10.0.3.7:6379" == cluster_address(RayConfig())
    assert "_node_ip_address" not in opts and "num_cpus" not in opts and env == {}
    assert opts["runtime_env"] == {"py_modules": [str(ADREC_DIR)]}
    assert (ADREC_DIR / "runtime.py").is_file()
    # ray.address wins over the environment
    assert ray_init_options(RayConfig(address="ray://head:10001"))[0]["address"] == "ray://head:10001"


def test_the_jobs_own_py_modules_are_kept(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.3.7:6379")
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_a.zip", "py_modules": ["gcs://_ray_pkg_b.zip"]}}))
    opts, env = ray_init_options(RayConfig())
    assert opts["runtime_env"] == {"py_modules": ["gcs://_ray_pkg_b.zip", str(ADREC_DIR)]}
    # Ray refuses a field both name unless told that ray.init's wins (it holds the job's modules too)
    assert env == {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_a.zip"}}))
    assert ray_init_options(RayConfig())[1] == {}


def test_forwarders_import_the_checkouts_adrec_first(tmp_path):
    """`python pipelines/<step>.py` imports the adrec next to it, even with another one on PYTHONPATH
    (a node's install): what a job's driver runs is the code submitted with it."""
    (tmp_path / "pipelines").mkdir()
    shutil.copy(REPO / "pipelines" / "_checkout.py", tmp_path / "pipelines")
    (tmp_path / "platform" / "adrec").mkdir(parents=True)
    (tmp_path / "platform" / "adrec" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "probe.py").write_text("import _checkout\nimport adrec\nprint(adrec.__file__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "platform"), str(REPO)]))
    out = subprocess.run([sys.executable, str(tmp_path / "pipelines" / "probe.py")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "platform" / "adrec" / "__init__.py"
    forwarders = sorted(p for p in (REPO / "pipelines").glob("*.py") if p.stem != "_checkout")
    assert len(forwarders) >= 10
    missing = [p.name for p in forwarders if "\nimport _checkout" not in p.read_text()]
    assert not missing, f"forwarders that may import a node's adrec instead of the checkout's: {missing}"
