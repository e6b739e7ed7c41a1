"""The one writer of model versions: atomic (temporary sibling + rename), fsync-ed, replacing a live one whole."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.sparse as sp

from adrec.model_version import VersionPaths, read_version, write_version


class _Saves:
    """A part that writes itself (as MultiSource and the ranker do): ``save(folder)``."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def save(self, path):
        os.makedirs(path)
        (path / "weights.bin").write_bytes(self.payload)


def _features(tmp_path):
    feats = tmp_path / "features-src"
    feats.mkdir(parents=True)
    for name in ("spec.json", "items.parquet", "users.parquet"):
        (feats / name).write_bytes(name.encode())
    cand = tmp_path / "cand-src"
    cand.mkdir()
    (cand / "als.npz").write_bytes(b"als")
    (cand / "recall.json").write_text("{}")  # a stage report, not part of a version
    return feats, cand


def _write(tmp_path, target, vid, ranker_payload=b"r1"):
    feats, cand = _features(tmp_path)
    seen = sp.csr_matrix(np.eye(3, dtype=np.float32))
    hist = [np.array([1, 2]), np.array([], np.int64), np.array([0])]
    return write_version(target, {"version": vid, "n_users": 3}, features=feats, history=hist, seen=seen,
                         candidates=cand, ranker=_Saves(ranker_payload))


def test_writer_is_atomic_and_fsyncs_every_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    target = tmp_path / "versions" / "v1"
    target.parent.mkdir()
    path, meta = _write(tmp_path, target, "v1")
    assert path == target and meta["version"] == "v1" and meta["created"]
    assert read_version(target) == json.loads(VersionPaths(target).info.read_text()) == meta
    paths = VersionPaths(target)
    for p in (paths.spec, paths.items, paths.users, paths.history, paths.seen, paths.candidates / "als.npz",
              paths.ranker / "weights.bin"):
        assert p.is_file(), p
    assert not (paths.candidates / "recall.json").exists()
    assert not paths.lists.exists() and not paths.topk.exists()  # no two-stage recommender: nothing to store
    # every file was fsync-ed under its temporary name, then the folders, then the parent after the rename
    tmp_names = {os.path.relpath(p, tmp_path / "versions").split(os.sep, 1)[0] for p in synced[:-1]}
    assert len(tmp_names) == 1 and tmp_names.pop().startswith(".v1.")
    assert len(synced) >= 7 + 4 and synced[-1] == str(target.parent)
    assert os.listdir(target.parent) == ["v1"]  # no temporary or old folder left


def test_writer_replaces_a_live_version_whole(tmp_path):
    target = tmp_path / "model"
    _write(tmp_path / "a", target, "v1", b"old")
    _write(tmp_path / "b", target, "v2", b"new")
    assert read_version(target)["version"] == "v2"
    assert (VersionPaths(target).ranker / "weights.bin").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "model"]
    with pytest.raises(FileNotFoundError, match="not a model version"):
        read_version(tmp_path / "a")
