"""No secret at rest and auth that fails closed, on a real run: prepare -> candidates -> train -> evaluate ->
serve (HTTP on 127.0.0.1), and a tiny Tune search, with both keys given literally, then every file of the run folder searched for them.
Also a rollout to a version another key pseudonymized: refused by the replica, the live version keeps serving."""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

import httpx
import pytest
import yaml
from adrec import flow
from adrec.config import build_config
from adrec.keys import key_fingerprint
from adrec.model_version import live_dir, publish, read_version
from adrec.run import RunDir, resolve_config
from adrec.runtime import free_port
from adrec.tuning import tune

pytestmark = pytest.mark.ray

def _needles(key: str) -> dict[str, bytes]:
    """The key as given (text and bytes) and in hex, lower and upper case."""
    raw = key.encode()
    return {"as given": raw, "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode()}


@pytest.fixture(scope="module")
def secret_run(ray_session, tiny_cfg, tmp_path_factory):
    """The tiny run with both keys literal in the config (as a YAML or --set gives them), served by `adrec serve`'s path."""
    from adrec.serving.deploy import serve_run
    from ray import serve

    pk, ak = "pk-" + secrets.token_hex(12), "ak-" + secrets.token_hex(12)
    # topk.ranker_features off: its three stage rankers would double this fixture's cost, and the shared run
    # (tiny_run, the default config) already serves and evaluates with them.
    cfg = build_config(tiny_cfg.to_dict(), [f"data.pseudonym_key={pk}", f"serve.api_key={ak}",
                                            "topk.ranker_features=false"])
    run = RunDir(tmp_path_factory.mktemp("secret-run"))
    flow.prepare(cfg, run)
    flow.candidates(cfg, run, show_progress=False)
    flow.train(cfg, run)
    flow.evaluate(cfg, run, show_progress=False)
    # A one-trial ALS search (its marker, its trials' params and results land in RUN/tune), not promoted.
    space = tmp_path_factory.mktemp("space") / "als.yaml"
    space.write_text(yaml.safe_dump({"trainable": "als", "space": {"candidates.factors": {"grid": [8]}},
                                     "metric": "valid_recall@100", "mode": "max", "num_samples": 1,
                                     "max_concurrent": 1, "scheduler": "fifo", "resources_per_trial": {"cpu": 1}}))
    tune(cfg, run, space, do_promote=False, verbose=0)
    # Serve as the CLI does: the run's saved config (fingerprints only), the keys from the secrets files.
    mp = pytest.MonkeyPatch()
    mp.delenv("ADREC_PSEUDONYM_KEY", raising=False)  # tests/conftest.py sets another key for the other tests
    mp.delenv("ADREC_API_KEY", raising=False)
    served = resolve_config(run, overrides=[f"serve.port={free_port()}"])
    url = serve_run(served, run, blocking=False)
    yield {"run": run, "pk": pk, "ak": ak, "url": url, "served_cfg": served}
    serve.shutdown()
    mp.undo()


def test_healthz_says_only_ok_and_the_key_guards_the_rest(secret_run):
    url, ak = secret_run["url"], secret_run["ak"]
    h = httpx.get(url + "/healthz", timeout=30)
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    assert httpx.get(url + "/version", timeout=30).status_code == 401
    assert httpx.get(url + "/version", headers={"x-api-key": "wrong"}, timeout=30).status_code == 403
    v = httpx.get(url + "/version", headers={"x-api-key": ak}, timeout=30)
    assert v.status_code == 200 and v.json()["version"] == read_version(live_dir(secret_run["run"]))["version"]


def test_the_keys_are_nowhere_in_the_run_folder_but_the_secrets_files(secret_run):
    run, pk, ak, url = secret_run["run"], secret_run["pk"], secret_run["ak"], secret_run["url"]
    # Traffic first, so the feedback log and whatever Serve writes into the run folder are there too.
    from benchmarks.loadtest import raw_user_ids

    user = raw_user_ids(run)[0]
    with httpx.Client(base_url=url, headers={"x-api-key": ak}, timeout=30) as c:
        r = c.post("/recommend", json={"user_id": user, "k": 3})
        assert r.status_code == 200 and r.json()["ranked_by"] == "two_stage"  # the key from the file: a known user
        item = r.json()["items"][0]["item"]
        fb = c.post("/feedback", json={"events": [{"event_id": "auth-1", "user_id": user, "item": item,
                                                    "type": "click", "ts": time.time() - 60}]})
        assert fb.status_code == 200
    secrets_dir = run.path / "secrets"
    assert (secrets_dir / "pseudonym.key").read_text() == pk and (secrets_dir / "api.key").read_text() == ak
    for f in secrets_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert "config" in run.manifest()["stages"]["prepare"]  # what is searched below holds the config

    found, searched = [], 0
    for dirpath, _, files in os.walk(run.path):
        for name in files:
            path = Path(dirpath) / name
            if path.parent == secrets_dir:
                continue
            data = path.read_bytes()
            searched += 1
            for key_name, key in (("pseudonym key", pk), ("API key", ak)):
                for form, needle in _needles(key).items():
                    if needle in data:
                        found.append(f"{path.relative_to(run.path)}: the {key_name} ({form})")
    assert searched > 20 and not found, found
    assert (run.tune / "als" / "adrec_search.json").is_file()  # Tune's files were among those searched
    fp = key_fingerprint(pk)
    assert read_version(live_dir(run))["pseudonym_key_fingerprint"] == fp
    text = run.config_path.read_text()
    assert fp in text and key_fingerprint(ak) in text


def test_a_version_of_another_key_is_refused_by_the_replica_and_the_live_one_serves(secret_run, tmp_path):
    from adrec.serving.args import AppArgs
    from adrec.serving.deploy import preflight, rollout

    run, url, ak = secret_run["run"], secret_run["url"], secret_run["ak"]
    live = read_version(live_dir(run))["version"]
    other = publish(run, make_live=False,
                    extra={"pseudonym_key_fingerprint": key_fingerprint("a-different-key")}).location.local_path
    args = AppArgs.from_config(secret_run["served_cfg"], run)  # the running app's args: a rollout, no restart
    with pytest.raises(Exception, match="keys differ"):
        preflight(args.model_copy(update={"model_dir": str(other)}))
    # Past the start-up check (a rollout, or a Serve config pointing at it): the replica refuses to load it.
    with pytest.raises(RuntimeError, match="could not load.*keys differ"):
        rollout(args, other, timeout_s=300)
    v = httpx.get(url + "/version", headers={"x-api-key": ak}, timeout=30)
    assert v.status_code == 200 and v.json()["version"] == live
    assert httpx.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
