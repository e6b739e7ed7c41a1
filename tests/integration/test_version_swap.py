"""A replica's swap to a new version leaves the old one to reference counting: no full collection (its
pause was the latency tail of every rollout) and nothing of the old version kept alive."""

from __future__ import annotations

import gc
import weakref

import pytest

pytestmark = pytest.mark.ray  # the shared tiny run is built on Ray


def test_a_swapped_out_version_is_freed_without_a_full_collection(tiny_run):
    from adrec.serving.holder import load_candidate_side, settle_heap

    def load():
        return load_candidate_side(str(tiny_run.model), True, 100, 100, 10**6)

    live = load()
    settle_heap()
    try:
        old_version, old_model = weakref.ref(live.version), weakref.ref(live.version.ranker.model)
        frozen = gc.get_freeze_count()
        collections = gc.get_stats()[2]["collections"]
        live = load()  # the swap: the only reference to the old version goes
        settle_heap()
        assert old_version() is None and old_model() is None, "the old version outlived its swap"
        assert gc.get_stats()[2]["collections"] == collections, "the swap ran a full collection"
        # What stays frozen is the new version, not both: the count is about one version's objects.
        assert gc.get_freeze_count() < 1.5 * frozen
    finally:
        gc.unfreeze()
