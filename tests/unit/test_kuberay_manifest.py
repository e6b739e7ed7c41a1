"""deploy/kuberay/rayservice.yaml against KubeRay's own RayService schema, offline.

The schema is the openAPIV3Schema of KubeRay's CRD (vendored: tests/data/kuberay/NOTICE.md). The API server
treats a field a structural schema does not list as unknown (pruned, or an error under kubectl's default
strict field validation) unless the object says ``x-kubernetes-preserve-unknown-fields``; JSON Schema
allows extra fields unless told otherwise, so :func:`as_kubernetes_validates` says so where Kubernetes
would, and a typo'd field fails here as it would on `kubectl apply`.
"""

from __future__ import annotations

import copy
import gzip
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml.gz"


def as_kubernetes_validates(schema: dict) -> dict:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties and does not
    preserve unknown fields (what Kubernetes's pruning does to a structural schema)."""
    node = dict(schema)
    if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    if "properties" in node:
        node["properties"] = {k: as_kubernetes_validates(v) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = as_kubernetes_validates(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [as_kubernetes_validates(s) for s in node[key]]
    return node


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    # libyaml's loader: the CRD is ~1 MB of YAML (seconds, against tens of seconds in pure Python)
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == "RayService"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    # OpenAPI 3.0's schema objects are a JSON Schema draft 4 dialect (its extra keywords are ignored).
    return jsonschema.Draft4Validator(as_kubernetes_validates(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return list(yaml.safe_load_all(MANIFEST.read_text()))


@pytest.fixture()
def service(docs) -> dict:
    return copy.deepcopy(next(d for d in docs if d["kind"] == "RayService"))


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_rayservice_validates_against_kuberays_schema(validator, service):
    assert service["apiVersion"] == "ray.io/v1"
    assert _errors(validator, service) == []


@pytest.mark.parametrize("mutate, where, says", [
    (lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParms={}),
     "spec.rayClusterConfig.headGroupSpec", "'rayStartParms' was unexpected"),
    (lambda s: s["spec"].update(serveConfigV3="applications: []"), "spec", "'serveConfigV3' was unexpected"),
    (lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
        imagePulPolicy="Always"), "spec.rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0",
     "'imagePulPolicy' was unexpected"),
    (lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="two"),
     "spec.rayClusterConfig.workerGroupSpecs.0.replicas", "'two' is not of type 'integer'"),
    (lambda s: s["spec"].update(serveConfigV2={"applications": []}), "spec.serveConfigV2", "is not of type 'string'"),
    (lambda s: s["spec"]["rayClusterConfig"].pop("headGroupSpec"), "spec.rayClusterConfig",
     "'headGroupSpec' is a required property"),
])
def test_the_schema_check_catches_typos_and_wrong_types(validator, service, mutate, where, says):
    mutate(service)
    errors = _errors(validator, service)
    assert any(e.startswith(f"{where}: ") and says in e for e in errors), errors


def test_the_serve_config_inside_is_one_serve_and_adrec_accept(service):
    """serveConfigV2 is a string: Ray Serve's schema and adrec's AppArgs (unknown args are errors) check it."""
    from ray.serve.schema import ServeDeploySchema

    from adrec.serving.args import AppArgs
    from adrec.serving.exposure import is_loopback

    conf = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(conf)
    (app,) = conf["applications"]
    AppArgs.model_validate(app["args"])
    assert app["import_path"] == "serve_apps.app:build_app"
    # Serve listens beyond loopback in the pods: every container gets the API key from a Secret.
    assert not is_loopback(conf["http_options"]["host"])
    for container in _containers(service):
        assert any(src.get("secretRef", {}).get("name") == "adrec-keys" for src in container["envFrom"]), container


def _containers(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    return [c for pod in pods for c in pod["template"]["spec"]["containers"]]


def test_ray_and_the_store_agree_with_cluster_yaml(docs, service):
    """One Ray everywhere: the RayService's rayVersion, the Dockerfile's base image and cluster.yaml's head image;
    the store is named once, in the ConfigMap every container reads."""
    import ray

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", (MANIFEST.parent / "Dockerfile").read_text(), re.M)[1]
    assert base == cluster["docker"]["head_image"] == f"rayproject/ray:{service['spec']['rayClusterConfig']['rayVersion']}-py311-cpu"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    (store,) = [d for d in docs if d["kind"] == "ConfigMap" and "ADREC_STORE" in d.get("data", {})]
    assert store["data"]["ADREC_STORE"].startswith("s3://")
    assert MANIFEST.read_text().count("s3://") == 1
    for container in _containers(service):
        assert {"configMapRef": {"name": store["metadata"]["name"]}} in container["envFrom"], container
