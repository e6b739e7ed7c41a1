"""No code from data files: every loader of a model or state file refuses what only running code could load.

Real files, real loaders: a planted malicious pickle, crafted torch checkpoints, a skops file smuggling a
type, class names that are module paths. Each payload creates a marker file when it runs; every test
asserts both the refusal (a clear :class:`UnsafeFileError`) and that the marker was never created.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adrec.errors import UnsafeFileError
from adrec.topk import gbdt

PKG = Path(__file__).resolve().parents[2] / "platform" / "adrec"


class _Plant:
    """Unpickled, this runs ``open(marker, "w")``: the marker exists iff the payload ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Plant(marker))


def test_the_planted_payload_is_live(tmp_path):
    # What makes the refusals below mean something: unpickling the payload does create its marker.
    marker = tmp_path / "ran"
    pickle.Unpickler(io.BytesIO(_payload(marker))).load().close()
    assert marker.exists()


# ---- the scikit-learn re-ranker: skops, never pickle ----------------------------------------------------
@pytest.fixture(scope="module")
def hgb():
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.normal(size=(3000, 6)), columns=[f"f{i}" for i in range(6)])
    y = ((x["f0"] + 0.5 * x["f1"] + rng.normal(size=len(x))) > 0).astype(np.int64).to_numpy()
    model = gbdt.train_ranker("sklearn", x, y, np.array([len(y)]), {"max_iter": 40}, seed=0)
    return model, x


def test_sklearn_reranker_round_trips_without_pickle(hgb, tmp_path):
    model, x = hgb
    gbdt.save_ranker(model, "sklearn", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [gbdt.SKLEARN_FILE]
    # a skops file: JSON and .npy arrays in a zip, nothing pickled
    names = zipfile.ZipFile(tmp_path / gbdt.SKLEARN_FILE).namelist()
    assert names and all(n.endswith((".json", ".npy")) for n in names), names
    loaded = gbdt.load_ranker("sklearn", tmp_path)
    assert type(loaded) is type(model)
    # the same trees read back: bit-identical scores on this machine is the point
    np.testing.assert_array_equal(gbdt.predict(loaded, "sklearn", x), gbdt.predict(model, "sklearn", x))
    matrix = x.to_numpy(np.float64)
    np.testing.assert_array_equal(gbdt.predict(loaded, "sklearn", matrix), gbdt.predict(model, "sklearn", matrix))


def test_a_pickled_reranker_is_refused_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / gbdt.LEGACY_PICKLE).write_bytes(_payload(marker))
    with pytest.raises(UnsafeFileError, match=r"ranker\.pkl.*pickled.*`adrec candidates --run R`"):
        gbdt.load_ranker("sklearn", tmp_path)
    assert not marker.exists()


class _Smuggled:
    """A type outside the trusted list whose rebuilding (``__setstate__``) would run code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        open(state["marker"], "w").close()
        self.__dict__.update(state)


def test_a_skops_file_smuggling_an_untrusted_type_is_refused(hgb, tmp_path):
    import skops.io

    model, _ = hgb
    marker = tmp_path / "ran"
    model.smuggled = _Smuggled(marker)
    try:
        skops.io.dump(model, tmp_path / gbdt.SKLEARN_FILE)
    finally:
        del model.smuggled
    with pytest.raises(UnsafeFileError, match=r"trusted list.*_Smuggled.*adrec candidates"):
        gbdt.load_ranker("sklearn", tmp_path)
    assert not marker.exists()


def test_a_skops_file_of_another_estimator_is_refused(tmp_path):
    import skops.io
    from sklearn.linear_model import LogisticRegression

    skops.io.dump(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), tmp_path / gbdt.SKLEARN_FILE)
    with pytest.raises(UnsafeFileError, match="LogisticRegression, not the HistGradientBoostingClassifier"):
        gbdt.load_ranker("sklearn", tmp_path)


# ---- torch files: plain state, weights_only=True -----------------------------------------------------
def test_training_state_is_plain_and_resumes(tmp_path):
    from adrec.ranking.train.session import STATE_FILE, load_state, save_state
    from adrec.ranking.train.state import Progress

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    logits = np.linspace(-2, 2, 7).astype(np.float32)
    pr = Progress(epoch=3, best_auc=0.71, best_epoch=2, history=[{"epoch": 1, "valid_auc": 0.7}],
                  best_state={k: v.clone() for k, v in model.state_dict().items()}, best_logits=logits)
    save_state(dict(pr.as_dict(), model=model.state_dict(), optim=opt.state_dict(), ema=None), tmp_path)
    # the file itself loads with weights_only=True (no adrec code in between)
    raw = torch.load(tmp_path / STATE_FILE, map_location="cpu", weights_only=True)
    assert isinstance(raw["best_logits"], torch.Tensor)

    back = load_state(tmp_path)
    again = Progress.from_dict(back)
    assert isinstance(again.best_logits, np.ndarray)
    np.testing.assert_array_equal(again.best_logits, logits)
    assert (again.epoch, again.best_epoch, again.history) == (3, 2, [{"epoch": 1, "valid_auc": 0.7}])
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["optim"])  # the optimizer resumes from the file's state
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_crafted_training_checkpoint_is_refused(tmp_path):
    from adrec.ranking.train.session import STATE_FILE, load_state

    marker = tmp_path / "ran"
    torch.save({"epoch": 1, "model": {}, "progress": _Plant(marker)}, tmp_path / STATE_FILE)
    with pytest.raises(UnsafeFileError, match=r"state\.pt is refused: a training checkpoint.*`adrec train --run R`"):
        load_state(tmp_path)
    assert not marker.exists()


def test_online_checkpoint_is_plain_and_refuses_a_crafted_one(tmp_path):
    from adrec.online.checkpoint import NAME, load_checkpoint, save_checkpoint

    state = {"offset": np.int64(123), "pos": np.arange(5, dtype=np.int64), "p": [np.float32(0.25), 0.5],
             "orphans": {("u1", 3): [1.5]}, "ready": [(1, "e1", "u1", 3, 10.0, {"ctx": "a"}, (1, 2), 1.0)],
             "model": {"w": torch.ones(2)}}
    save_checkpoint(tmp_path / "ok", state)
    back = load_checkpoint(tmp_path / "ok")
    assert back["offset"] == 123 and back["p"] == [0.25, 0.5] and back["orphans"] == {("u1", 3): [1.5]}
    np.testing.assert_array_equal(np.asarray(back["pos"], np.int64), np.arange(5))
    assert back["ready"] == state["ready"]
    torch.testing.assert_close(back["model"]["w"], torch.ones(2))

    marker = tmp_path / "ran"
    (tmp_path / "bad").mkdir()
    torch.save({"format": 1, "joiner": _Plant(marker)}, tmp_path / "bad" / NAME)
    with pytest.raises(UnsafeFileError, match=r"checkpoint\.pt is refused: the online learner's checkpoint.*delete"):
        load_checkpoint(tmp_path / "bad")
    assert not marker.exists()


def test_plain_refuses_to_write_an_object():
    from adrec import torchfile

    with pytest.raises(TypeError, match="_Plant is not plain state"):
        torchfile.save({"x": _Plant(Path("unused"))}, io.BytesIO())


def test_a_saved_encoder_with_pickled_weights_is_refused(tmp_path):
    from adrec.features.encoder import load_saved_encoder, tiny_bert

    tiny_bert(100).config.save_pretrained(tmp_path)  # a real config.json, weights as a pickle beside it
    marker = tmp_path / "ran"
    torch.save({"x": _Plant(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        load_saved_encoder(tmp_path)
    assert not marker.exists()


# ---- class names from files: allow-lists only -------------------------------------------------------
@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """A module on sys.path whose import creates a marker: ``(name, marker)``."""
    marker = tmp_path / "imported"
    name = "adrec_nocode_planted"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Ranker:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


@pytest.mark.parametrize("ref", ["os.system", "os:system", "adrec.ranking.fusion:FusionRanker", "{mod}:Ranker",
                                 "{mod}.Ranker", ["FusionRanker"], None])
def test_a_ranker_json_naming_a_module_is_refused(tmp_path, planted_module, ref):
    from adrec.ranking.base import RANKER_CLASSES, load_ranker

    mod, marker = planted_module
    ref = ref.format(mod=mod) if isinstance(ref, str) else ref
    folder = tmp_path / "ranker"
    folder.mkdir()
    (folder / "ranker.json").write_text(json.dumps({"class": ref}))
    with pytest.raises(UnsafeFileError, match=r"not one adrec ships \(known: \['FusionRanker'\]\); nothing was imported"):
        load_ranker(folder)
    assert not marker.exists() and mod not in sys.modules
    assert set(RANKER_CLASSES) == {"FusionRanker"}


@pytest.mark.parametrize("ref", ["os.system", "{mod}.Ranker", "subprocess.Popen", ["ALSSource"]])
def test_a_source_json_naming_a_module_is_refused(tmp_path, planted_module, ref):
    from adrec.candidates import CandidateSource
    from adrec.candidates.base import FORMAT, FORMAT_VERSION, STATE_JSON

    mod, marker = planted_module
    ref = ref.format(mod=mod) if isinstance(ref, str) else ref
    np.savez(tmp_path / "arrays.npz", x=np.zeros(1))
    (tmp_path / STATE_JSON).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "class": ref,
                                                   "name": "s", "n_users": 1, "n_items": 1, "params": {}}))
    with pytest.raises(UnsafeFileError, match=r"unknown source class .*nothing was imported.*ALSSource"):
        CandidateSource.load(tmp_path)
    assert not marker.exists() and mod not in sys.modules


# ---- the library, read as text ---------------------------------------------------------------------------
UNSAFE = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|joblib\.load|"
                    r"yaml\.(?:unsafe_)?load\(|yaml\.full_load|trust_remote_code\s*=\s*True|(?<![.\w])(?:eval|exec)\(\s*[^)\s]")


def test_no_unsafe_loader_in_the_library():
    found = [f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}"
             for p in sorted(PKG.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert not found, "loaders that can run code from a file:\n" + "\n".join(found)


def test_the_grep_catches_what_it_looks_for():
    for line in ("pickle.loads(b)", "torch.load(p, weights_only=False)", "np.load(p, allow_pickle=True)",
                 "yaml.load(f)", "eval(s)"):
        assert UNSAFE.search(line), line
    for line in ("yaml.safe_load(f)", "model.eval()", "# eval() walks", "torch.load(p, weights_only=True)"):
        assert not UNSAFE.search(line), line
