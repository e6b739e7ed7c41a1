"""How adrec starts Ray: the Serve ingress environment and its scoping (no Ray started)."""

from __future__ import annotations

import os

import pytest

from adrec.config import build_config

from adrec.errors import ConfigError
from adrec.runtime import _environ, haproxy_threads, serve_ingress_env


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
