"""``adrec score``: every requested user's top-K by a Ray Data pass over actors holding the live version,
the same lists the in-process serving Recommender (the request algorithm Serve runs) returns."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd

from adrec.data.privacy import resolve_key
from adrec.model_version import live_dir
from adrec.serving.batch import score
from adrec.serving.recommender import Recommender


# In `make test-all`: ~90 s (its own Serve app beside Ray Data actors).
@pytest.mark.slow
def test_score_writes_the_lists_serve_returns(tiny_run, tiny_cfg, tmp_path):
    ids = ["user00001", "user00007", "user00042", "user00299", "someone-new"]
    users = tmp_path / "users.txt"
    users.write_text("\n".join(ids) + "\n")
    summary = score(tiny_cfg, tiny_run, str(tmp_path / "some"), users=str(users), k=5)
    assert summary["users"] == len(ids)
    got = pd.read_parquet(tmp_path / "some").set_index("user_id")
    key = resolve_key(tiny_cfg.data.pseudonym_key, tiny_run.path)
    rec = Recommender(live_dir(tiny_run), key)
    for raw in ids:
        want = rec.recommend(raw, 5)
        assert list(got.loc[raw, "items"]) == [w["item"] for w in want], raw
        np.testing.assert_allclose(got.loc[raw, "click_probs"], [w["click_prob"] for w in want], rtol=1e-5, atol=1e-6)
    assert len(got.loc["someone-new", "items"]) == 5  # a user the version never saw gets the popular items

    summary = score(tiny_cfg, tiny_run, str(tmp_path / "all"), k=5)
    every = pd.read_parquet(tmp_path / "all").set_index("user")
    assert summary["users"] == len(every) == len(rec.version.user_pos)
    known = got.drop(index="someone-new")
    for pseudonym, items in zip(known["user"], known["items"]):
        assert list(every.loc[pseudonym, "items"]) == list(items)
