"""cluster.yaml passes Ray's own cluster-config validation (what `ray up` runs first), offline.

`ray up` has no dry run; `prepare_config` (merge with the provider's defaults, the step `ray up`
does) and `validate_config` (Ray's JSON schema plus its cross-field checks) are the same code
`ray up` calls before it touches the cloud. They live in a private module, so a Ray upgrade that moves
them fails this test loudly rather than silently skipping it.
"""

from __future__ import annotations

import copy
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation(raw):
    prepared = _validate(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_and_gpu_worker_group(raw):
    prepared = _validate(raw)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    gpu = [v for v in workers.values() if v.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "a GPU worker group is required"
    assert all(v["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5")) for v in gpu)
    assert all(v["max_workers"] >= 1 for v in gpu)
    assert head.get("resources", {}).get("GPU", 0) == 0
    assert sum(v.get("min_workers", 0) for v in types.values()) <= prepared["max_workers"]


def test_setup_installs_this_package(raw):
    prepared = _validate(raw)
    mounts = prepared["file_mounts"]
    remote = [r for r, local in mounts.items() if Path(local).resolve() == ROOT or local == "."]
    assert remote, "the working tree must be mounted on the nodes"
    setup = "\n".join(prepared["setup_commands"])
    assert "pip install" in setup and "-e" in setup and remote[0] in setup
    # the head starts Ray with the dashboard (job API, serve deploy) on localhost only
    assert any("--dashboard-host=127.0.0.1" in c for c in prepared["head_start_ray_commands"])


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(max_workrs=3), "max_workrs"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="two"), "two"),
    (lambda c: c.update(max_workers=0) or c["available_node_types"]["gpu_worker"].update(min_workers=2), "max_workers"),
    (lambda c: c["docker"].update(head_imge="rayproject/ray:2.60.0-py311-cpu"), "head_imge"),
    (lambda c: c["docker"].update(pull_before_run="yes"), "yes"),
])
def test_validation_catches_mistakes(raw, mutate, match):
    """The validation is real: typical mistakes in this file are rejected."""
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(Exception, match=match):
        _validate(bad)


def test_every_node_starts_ray_with_the_haproxy_ingress(raw):
    """The cluster serves the way `adrec serve` does locally: the same Serve variables on every node."""
    from adrec.runtime import HAPROXY_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c)
        assert all(f"{var}={value}" in start.split() for var, value in HAPROXY_ENV.items()), (key, start)


IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<kind>cpu|gpu)$")


def image_pins(image: str) -> tuple[str, str, str]:
    """(Ray version, Python as "3.11", "cpu"/"gpu") of a pinned Ray image tag; an unpinned one fails."""
    m = IMAGE.match(image)
    assert m, f"{image}: not a pinned rayproject/ray:<version>-py3XX-<cpu|gpu> image"
    return m["ray"], f"{m['py'][0]}.{m['py'][1:]}", m["kind"]


def test_nodes_run_a_pinned_ray_image_that_matches_this_package(raw):
    """The image's Ray is the one installed here (what the tests ran on) and within pyproject's range;
    its Python is this interpreter's and satisfies requires-python; CPU head, CUDA workers."""
    import ray

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_spec = next(SpecifierSet(d.split("]", 1)[1]) for d in project["dependencies"] if d.startswith("ray["))
    docker = _validate(raw)["docker"]
    assert "image" not in docker, "one image per role: head_image and worker_image"
    pins = {role: image_pins(docker[f"{role}_image"]) for role in ("head", "worker")}
    for role, (ray_version, py, _) in pins.items():
        assert ray_version == ray.__version__ and ray_version in ray_spec, (role, ray_version)
        assert py == f"{sys.version_info.major}.{sys.version_info.minor}", (role, py)
        assert py in SpecifierSet(project["requires-python"]), (role, py)
    assert pins["head"][2] == "cpu" and pins["worker"][2] == "gpu"
    # The setup keeps the image's Ray: the same pin again, so pip never swaps it for another release.
    assert f"=={ray.__version__}" in "\n".join(raw["setup_commands"])


def test_the_store_is_named_once_for_every_node(raw):
    """ADREC_STORE (the bucket the nodes share) is set in one line of setup_commands (every node), exported
    to the login shells Ray starts in, and appears nowhere else in the file."""
    text = CLUSTER.read_text()
    assert len(re.findall(r"ADREC_STORE=", text)) == 1
    lines = [c for c in raw["setup_commands"] if "ADREC_STORE=" in c]
    assert len(lines) == 1 and re.search(r"export ADREC_STORE=s3://[a-z0-9.-]+/\S*' >> ~/.bashrc$", lines[0]), lines
    assert not any("ADREC_STORE" in c for key in ("head_setup_commands", "worker_setup_commands")
                   for c in raw[key])


def test_image_pin_check_rejects_what_it_should():
    assert image_pins("rayproject/ray:2.60.0-py311-gpu") == ("2.60.0", "3.11", "gpu")
    for bad in ("rayproject/ray:latest", "rayproject/ray:2.60.0-gpu", "rayproject/ray:nightly-py311-cpu"):
        with pytest.raises(AssertionError, match="not a pinned"):
            image_pins(bad)


def test_the_clusters_serve_config_is_reachable_and_needs_a_key(monkeypatch, tmp_path):
    """serve_apps/config.cluster.yaml: valid for Serve and adrec, beyond loopback (so the builder wants an API
    key), its model on the store the nodes were given."""
    from ray.serve.schema import ServeDeploySchema

    from adrec.errors import ConfigError
    from adrec.serving.builder import build_app
    from adrec.serving.exposure import require_api_key
    from serve_apps.app import config_args

    path = ROOT / "serve_apps" / "config.cluster.yaml"
    conf = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(conf)
    args = config_args(path)
    assert args.topology == "fused" and args.model_dir == "$ADREC_STORE/runs/r1"
    assert {d["name"] for d in conf["applications"][0]["deployments"]} == {"Ingress", "FeedbackDeployment"}
    host, port = conf["http_options"]["host"], conf["http_options"]["port"]
    monkeypatch.delenv("ADREC_API_KEY", raising=False)
    monkeypatch.setenv("ADREC_STORE", str(tmp_path))
    with pytest.raises(ConfigError, match="without an API key"):
        require_api_key(args.resolved(), host, port)
    # as Serve would build it there (the builder asks Serve for the host; no Serve runs here)
    with pytest.raises(ConfigError, match="without an API key"):
        build_app(args.model_copy(update={"host": host}))
