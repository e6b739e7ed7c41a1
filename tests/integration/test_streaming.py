"""The streaming prepare (``features.pipeline: streaming``) on the session's real local Ray: folders of CSV
and Parquet shards, bad rows counted exactly across blocks, and the same rows, split and features as the
in-process pipeline on the same data (MovieLens-100k in the slow test)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adrec import flow
from adrec.config import SyntheticConfig, build_config
from adrec.data.synthetic import generate
from adrec.errors import DataError
from adrec.features.pipeline import Features
from adrec.run import RunDir

KEY = "stream-key"
SMALL = SyntheticConfig(n_users=60, n_ads=40, n_impressions=1500, seed=3)


def _prepare(tmp_path, name: str, schema_path, *overrides: str) -> tuple[Features, dict]:
    run = RunDir(tmp_path / name)
    cfg = build_config(overrides=[f"data.dataset={schema_path}", f"data.pseudonym_key={KEY}", "ray.num_cpus=2",
                                  *overrides])
    flow.prepare(cfg, run)
    return Features(run), run.manifest()["stages"]["prepare"]["counts"]


def _assert_same(a: Features, b: Features) -> None:
    """Same rows in the same order, same split, codes and history; same catalogue tables and spec."""
    pd.testing.assert_frame_equal(a.interactions.drop(columns=["hist"]), b.interactions.drop(columns=["hist"]),
                                  check_dtype=False)
    assert [list(h) for h in a.interactions["hist"]] == [list(h) for h in b.interactions["hist"]]
    pd.testing.assert_frame_equal(a.items, b.items, check_dtype=False)
    pd.testing.assert_frame_equal(a.users, b.users, check_dtype=False)
    assert a.spec == b.spec


def _without_files(counts: dict) -> dict:
    """The counts that do not depend on how the table is cut into files."""
    return {k: v for k, v in counts.items() if not k.startswith("bad_rows_skipped.")}


def _log(tmp_path):
    """The small synthetic log as one CSV (and its schema), with three bad rows in different places."""
    folder = tmp_path / "one"
    schema = generate(SMALL, folder)
    imp = pd.read_csv(folder / "impressions.csv", dtype=str, keep_default_na=False)
    imp.loc[10, "clicked"] = "yes"  # not 0/1
    imp.loc[700, "ts"] = "yesterday"  # not a time
    imp.loc[1400, "user_id"] = ""  # empty id
    imp.to_csv(folder / "impressions.csv", index=False)
    return folder, schema, imp


def test_csv_shards_in_a_folder_match_one_file_and_bad_rows_count_across_blocks(ray_session, tmp_path):
    folder, schema, imp = _log(tmp_path)
    shards = tmp_path / "shards"
    (shards / "impressions").mkdir(parents=True)
    for k, lo in enumerate(range(0, len(imp), 500)):
        imp.iloc[lo:lo + 500].to_csv(shards / "impressions" / f"part-{k}.csv", index=False)
    (shards / "impressions" / "_SUCCESS").write_text("")  # a writer's marker is not data
    for f in ("ads.csv", "users.csv"):
        (shards / f).write_bytes((folder / f).read_bytes())
    (shards / "schema.yaml").write_text((folder / "schema.yaml").read_text().replace("path: impressions.csv",
                                                                                      "path: impressions"))
    whole, whole_counts = _prepare(tmp_path, "in-process", schema, "data.max_bad_rows=3")
    # Blocks of 64 rows: the three bad rows fall in different blocks (and files) of a parallel read.
    streamed, counts = _prepare(tmp_path, "streaming", shards / "schema.yaml", "data.max_bad_rows=3",
                                "features.pipeline=streaming", "features.batch_size=64")
    _assert_same(whole, streamed)
    assert _without_files(counts) == _without_files(whole_counts)
    assert counts["bad_rows_skipped"] == 3
    assert {k: v for k, v in counts.items() if k.startswith("bad_rows_skipped.")} == {
        "bad_rows_skipped.part-0.csv": 1, "bad_rows_skipped.part-1.csv": 1, "bad_rows_skipped.part-2.csv": 1}
    written = {p.name for p in RunDir(tmp_path / "streaming").features.iterdir()}
    assert written >= {"train", "valid", "test", "spec.json"} and "interactions.parquet" not in written

    with pytest.raises(DataError) as err:
        _prepare(tmp_path, "strict", shards / "schema.yaml", "data.max_bad_rows=2",
                 "features.pipeline=streaming", "features.batch_size=64")
    # Which of the three bad rows tips the count over depends on which block finishes last; each is
    # named by its file, column and row (the row in its file, the header being row 1).
    assert any(f"part-{k}.csv: column '{col}', row {row}" in str(err.value)
               for k, col, row in ((0, "clicked", 12), (1, "ts", 202), (2, "user_id", 402)))


@pytest.mark.slow
def test_sharded_synthetic_and_hive_partitioned_parquet(ray_session, tmp_path):
    """The generator's Parquet shards, re-cut into a hive-partitioned folder (device=.../), read like
    one CSV of the same rows."""
    sharded = tmp_path / "sharded"
    schema = generate(SMALL.model_copy(update={"shard_rows": 400}), sharded)
    parts = sorted((sharded / "impressions").glob("*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [400, 400, 400, 300]
    rows = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    assert rows["ts"].is_monotonic_increasing  # each shard is its own slice of the timeline

    hive = tmp_path / "hive"
    pq.write_to_dataset(pa.Table.from_pandas(rows, preserve_index=False), hive / "impressions",
                        partition_cols=["device"])
    (hive / "schema.yaml").write_text(schema.read_text())
    for f in ("ads.csv", "users.csv"):
        (hive / f).write_bytes((sharded / f).read_bytes())
    one = tmp_path / "one"
    one.mkdir()
    # The hive layout groups rows by device: the single file holds them in that order too.
    order = rows.assign(_d=rows["device"]).sort_values("_d", kind="stable").drop(columns="_d")
    order.to_csv(one / "impressions.csv", index=False)
    for f in ("ads.csv", "users.csv"):
        (one / f).write_bytes((sharded / f).read_bytes())
    (one / "schema.yaml").write_text(schema.read_text().replace("path: impressions\n", "path: impressions.csv\n")
                                     .replace("  format: parquet\n", ""))
    whole, whole_counts = _prepare(tmp_path, "in-process", one / "schema.yaml")
    streamed, counts = _prepare(tmp_path, "hive", hive / "schema.yaml", "features.pipeline=streaming",
                                "features.batch_size=256")
    _assert_same(whole, streamed)
    assert counts == whole_counts
    direct, _ = _prepare(tmp_path, "shards", schema, "features.pipeline=streaming")
    assert len(direct.interactions) == len(rows)


@pytest.mark.slow
def test_streaming_matches_in_process_on_movielens(ray_session, tmp_path, ml100k_dir):
    """Same rows, split, features, history and counts as the in-process pipeline on MovieLens-100k."""
    common = ["data.dataset=movielens-100k", f"data.data_dir={ml100k_dir}"]
    whole, whole_counts = _prepare(tmp_path, "in-process", "movielens-100k", *common)
    streamed, counts = _prepare(tmp_path, "streaming", "movielens-100k", *common, "features.pipeline=streaming")
    _assert_same(whole, streamed)  # the conversion label (rating == 5, issue 17) among the compared columns
    assert "conversion" in streamed.interactions and counts["conversions"] == int((streamed.interactions["conversion"]).sum()) > 0
    assert counts == whole_counts
    assert np.bincount(streamed.interactions["split"].map({"train": 0, "valid": 1, "test": 2})).tolist() == [
        whole_counts["rows.train"], whole_counts["rows.valid"], whole_counts["rows.test"]]
