"""The version registry on a local disk: numbered, committed by the manifest, verified, live, rollback, prune."""

from __future__ import annotations

import json

import pytest

from adrec.errors import RunError
from adrec.model_version.registry import (MANIFEST, VersionIntegrityError, VersionRegistry, materialize, registry_of,
                                          staging_dir)


def _folder(reg: VersionRegistry, vid: str, payload: bytes = b"weights"):
    d = staging_dir(reg, vid)
    (d / "ranker").mkdir(parents=True)
    (d / "ranker" / "model.pt").write_bytes(payload)
    (d / "version.json").write_text(json.dumps({"version": vid, "created": "now"}))
    return d


def test_versions_are_numbered_committed_with_their_manifest_and_never_rewritten(tmp_path):
    reg = registry_of(tmp_path / "run")
    a = reg.commit(_folder(reg, "a"))
    b = reg.commit(_folder(reg, "b", b"other weights"))
    assert (a.number, b.number) == (1, 2) and reg.numbers() == [1, 2]
    man = json.loads((a.location.local_path / MANIFEST).read_text())
    assert {f["path"] for f in man["files"]} == {"ranker/model.pt", "version.json"}
    assert man["bytes"] == sum(f["size"] for f in man["files"])
    assert reg.live().number == 2 and reg.live_record()["previous"] == 1
    # The staging folders were consumed; nothing but the two versions and the pointer remains.
    assert sorted(p.name for p in (tmp_path / "run" / "versions").iterdir()) == ["000001", "000002", "LIVE.json"]


def test_a_folder_without_its_manifest_is_not_a_version(tmp_path):
    reg = registry_of(tmp_path / "run")
    reg.commit(_folder(reg, "a"))
    (tmp_path / "run" / "versions" / "000002").mkdir()  # an upload that never finished
    assert reg.numbers() == [1]
    assert reg.commit(_folder(reg, "b")).number == 3  # never reuses a number a writer may hold
    with pytest.raises(RunError, match="no committed version 2"):
        reg.entry(2)


def test_a_damaged_version_is_refused_by_the_reader(tmp_path):
    reg = registry_of(tmp_path / "run")
    v = reg.commit(_folder(reg, "a"))
    assert materialize(v.uri) == v.location.local_path
    (v.location.local_path / "ranker" / "model.pt").write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(VersionIntegrityError, match="ranker/model.pt does not match its checksum"):
        materialize(v.uri)
    (v.location.local_path / "ranker" / "model.pt").unlink()
    with pytest.raises(VersionIntegrityError, match="is missing"):
        materialize(v.uri)


def test_rollback_and_prune_keep_the_live_version_and_its_predecessor(tmp_path):
    reg = registry_of(tmp_path / "run")
    for vid in "abcde":
        reg.commit(_folder(reg, vid))
    assert reg.live().version == "e"
    rec = reg.rollback()
    assert (rec["number"], rec["previous"]) == (4, 5)
    reg.set_live(2)  # an explicit rollback to an old one: 4 becomes the previous
    assert reg.prune(keep=1) == [1, 3]  # 5 is the newest, 2 live, 4 its predecessor
    assert reg.numbers() == [2, 4, 5]
    assert reg.find("d").number == 4 and reg.find("5").version == "e"
    with pytest.raises(RunError, match="no version 'zz'"):
        reg.find("zz")


def test_no_previous_version_is_a_clear_error(tmp_path):
    reg = registry_of(tmp_path / "run")
    with pytest.raises(RunError, match="no live model version"):
        reg.live()
    reg.commit(_folder(reg, "a"))
    with pytest.raises(RunError, match="no previous version to roll back to"):
        reg.rollback()
