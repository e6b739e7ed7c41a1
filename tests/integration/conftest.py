"""One real local Ray per test session, and one small trained run that every integration test shares."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from adrec.config import RayConfig, build_config
from adrec.run import RunDir

# A small synthetic log and a tiny random BERT: the whole flow in well under a minute on 2 cores.
TINY_OVERRIDES = [
    "data.dataset=synthetic",
    "data.synthetic.n_users=300",
    "data.synthetic.n_ads=120",
    "data.synthetic.n_impressions=12000",
    "data.pseudonym_key=test-key",
    "ranker.tiny_encoder=true",
    "ranker.epochs=1",
    "ray.num_cpus=2",
]


def pytest_collection_modifyitems(config, items):
    """``slow_on_graph``: the test runs on both topologies in ``make test-all`` and on the default one
    (fused) in ``make test`` (the graph's run of it repeats what the fused one checks, at the suite's
    heaviest cost per test)."""
    for item in items:
        spec = getattr(item, "callspec", None)
        if item.get_closest_marker("slow_on_graph") and spec is not None and spec.params.get("served") == "graph":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from adrec.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve never started in this session
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cfg():
    return build_config(overrides=TINY_OVERRIDES)


class SharedRun(RunDir):
    """The session's run, with ``model``: a loose copy of its first version (outside the run's registry), so
    learners started on it publish into their own state folder and never move the shared run's live version."""

    model: Path


@pytest.fixture(scope="session")
def tiny_run(ray_session, tiny_cfg, tmp_path_factory) -> SharedRun:
    """prepare -> candidates -> train -> publish on the tiny synthetic log (shared, read-only for tests)."""
    from adrec import flow
    from adrec.model_version import live_dir

    run = SharedRun(tmp_path_factory.mktemp("tiny-run"))
    flow.prepare(tiny_cfg, run)
    flow.candidates(tiny_cfg, run, show_progress=False)
    flow.train(tiny_cfg, run)
    run.model = tmp_path_factory.mktemp("tiny-model") / "model"
    shutil.copytree(live_dir(run), run.model)
    return run


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (a child process, stopped by PID), shared by the session's tests."""
    from tests.support.s3 import S3Server

    srv = S3Server().start(log_dir=tmp_path_factory.mktemp("moto"))
    yield srv
    srv.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's endpoint and credentials in os.environ (what a user sets), and no S3 client left
    over from another endpoint: ``s3://<s3_server.bucket>/...`` resolves to it."""
    from adrec import storage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_fs_cache", {})
    return s3_server
