"""Storage by URI against a real S3-protocol server on 127.0.0.1 (moto's, started and stopped by PID):
locations, runs and model versions on the store, the per-node cache, and integrity checks."""

from __future__ import annotations

import json
import os

import pytest

from adrec import storage
from adrec.errors import ConfigError, RunError
from adrec.model_version.registry import MANIFEST, VersionIntegrityError, materialize, registry_of, staging_dir
from adrec.run import RunDir
from tests.support.s3 import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(bucket="adrec-store").start(tmp_path_factory.mktemp("moto"))
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_uris_are_normalized_and_bad_ones_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs/r1") == str(tmp_path / "runs" / "r1")  # absolute where the user typed it
    assert storage.normalize("s3://b/runs/r1/") == "s3://b/runs/r1"
    assert storage.normalize("file:///x/y") == "/x/y" and storage.normalize("gcs://b/p") == "gs://b/p"
    with pytest.raises(ConfigError, match="unknown storage scheme 'hdfs'"):
        storage.normalize("hdfs://nn/runs")
    with pytest.raises(ConfigError, match="names no bucket"):
        storage.normalize("s3://")


def test_a_location_on_the_store_reads_writes_and_copies_trees(s3, tmp_path):
    loc = storage.resolve("s3://adrec-store/t1")
    assert not loc.exists() and not loc.is_dir() and loc.files() == []
    (loc / "a.json").write_json({"x": 1})
    (loc / "a.json").write_json({"x": 2})  # whole-object replace
    assert (loc / "a.json").read_json() == {"x": 2} and loc.is_dir()
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.bin").write_bytes(b"\0" * 3000)
    (src / "g.txt").write_text("hi")
    (loc / "tree").upload(src)
    assert [(e.name, e.size) for e in (loc / "tree").files()] == [("g.txt", 2), ("sub/f.bin", 3000)]
    back = (loc / "tree").download(tmp_path / "back")
    assert (back / "sub" / "f.bin").read_bytes() == b"\0" * 3000
    (loc / "tree").delete()
    assert loc.children() == ["a.json"]
    assert "t1/a.json" in s3.keys("t1/")


def test_a_run_on_the_store_keeps_its_stages_there_and_computes_in_a_cache(s3, cache):
    run = RunDir("s3://adrec-store/runs/r1")
    assert run.remote and run.path.is_relative_to(cache)
    (run.path / "features").mkdir(parents=True)
    (run.path / "features" / "spec.json").write_text("{}")
    run.push("features", "absent")
    run.update_manifest("prepare", {"rows": 3})
    assert "runs/r1/features/spec.json" in s3.keys("runs/r1/") and "runs/r1/manifest.json" in s3.keys("runs/r1/")
    other = RunDir("s3://adrec-store/runs/r1")  # another process, another node: same store, fresh cache
    import shutil

    shutil.rmtree(other.path)
    assert other.manifest()["stages"]["prepare"]["rows"] == 3
    other.pull("features")
    assert (other.path / "features" / "spec.json").read_text() == "{}"
    with pytest.raises(RunError, match=r"s3://adrec-store/runs/r1/candidates is missing: run `adrec candidates"):
        other.require(other.path / "candidates", "candidates")


def _version(reg, vid: str, payload: bytes):
    d = staging_dir(reg, vid)
    (d / "ranker").mkdir(parents=True)
    (d / "ranker" / "model.pt").write_bytes(payload)
    (d / "version.json").write_text(json.dumps({"version": vid}))
    return d


def test_versions_on_the_store_are_committed_by_the_manifest_cached_once_and_verified(s3, cache):
    import boto3

    reg = registry_of("s3://adrec-store/runs/r2")
    v1 = reg.commit(_version(reg, "a", b"w" * 5000))
    assert v1.uri == "s3://adrec-store/runs/r2/versions/000001" and reg.live().number == 1
    local = materialize(v1.uri)
    assert local.is_relative_to(cache) and (local / "ranker" / "model.pt").read_bytes() == b"w" * 5000
    assert materialize(v1.uri) == local  # cached: no second download
    # An upload that stopped before its manifest is no version at all.
    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.put_object(Bucket="adrec-store", Key="runs/r2/versions/000002/version.json", Body=b"{}")
    assert reg.numbers() == [1]
    with pytest.raises(RunError, match="not a committed model version"):
        materialize("s3://adrec-store/runs/r2/versions/000002")
    # A changed object fails its checksum on a node that has not cached the version yet.
    v3 = reg.commit(_version(reg, "c", b"x" * 5000))
    assert v3.number == 3
    client.put_object(Bucket="adrec-store", Key="runs/r2/versions/000003/ranker/model.pt", Body=b"y" * 5000)
    with pytest.raises(VersionIntegrityError, match="does not match its checksum"):
        materialize(v3.uri)
    assert not [p.name for p in (cache / "versions").iterdir() if p.name.startswith("000003")]  # nothing kept
    assert reg.rollback()["number"] == 1 and reg.live().version == "a"
    assert MANIFEST in [e.name for e in (reg.location / "000001").files()]
