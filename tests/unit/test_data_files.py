"""Where a table's rows lie (a file, a folder of shards, a glob), the per-block parser's counts adding up to
the whole file's, and the sharded synthetic log: no Ray here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from adrec.config import SyntheticConfig
from adrec.data.files import list_table
from adrec.data.ingest import Recorder, _BadRows, _EmptyFields, parse_interactions
from adrec.data.schema import InteractionsSchema
from adrec.data.synthetic import generate
from adrec.errors import DataError
from adrec.features.spec import build_vocab, value_counts, vocab_from_counts

SPEC = InteractionsSchema(path="x", user="u", item="i", timestamp="t", label="y", context=["c"])


def _table(path: str, **kw) -> InteractionsSchema:
    return SPEC.model_copy(update={"path": path, **kw})


def test_list_table_file_folder_glob(tmp_path):
    (tmp_path / "one.csv").write_text("u\n")
    shards = tmp_path / "shards"
    (shards / "day=2").mkdir(parents=True)
    (shards / "day=1").mkdir()
    for p in ("day=2/b.parquet", "day=1/a.parquet", "_SUCCESS", ".part.crc"):
        (shards / p).write_bytes(b"")
    one = list_table(_table("one.csv"), tmp_path, "interactions")
    assert one.paths == [str(tmp_path / "one.csv")] and one.format == "csv" and one.base_dir is None
    folder = list_table(_table("shards"), tmp_path, "interactions")
    assert [p.rsplit("/", 2)[-2] for p in folder.paths] == ["day=1", "day=2"]  # sorted, markers left out
    assert folder.format == "parquet" and folder.base_dir == str(shards)
    glob = list_table(_table("shards/*/b.parquet"), tmp_path, "interactions")
    assert glob.paths == [str(shards / "day=2" / "b.parquet")]
    assert list_table(_table("one.csv", format="parquet"), tmp_path, "x").format == "parquet"
    with pytest.raises(DataError, match="does not exist"):
        list_table(_table("nope"), tmp_path, "interactions")
    with pytest.raises(DataError, match="no files"):
        list_table(_table("shards/*.csv"), tmp_path, "interactions")


def _rows(n: int) -> pd.DataFrame:
    df = pd.DataFrame({"u": [f"u{i % 7}" for i in range(n)], "i": [f"i{i % 5}" for i in range(n)],
                       "t": [str(1000 + i) for i in range(n)], "y": [str(i % 2) for i in range(n)],
                       "c": ["" if i % 9 == 0 else "a" for i in range(n)]})
    df.loc[[3, 40, 41, 77], "y"] = "2"
    df.loc[[5, 90], "t"] = "never"
    return df


def test_blocks_count_bad_rows_and_empty_cells_as_the_whole_file_does():
    df = _rows(100)
    lines = np.arange(100) + 2
    bad, empties = _BadRows(10), _EmptyFields()
    whole, keep = parse_interactions(df, lines, "f.csv", SPEC, bad, empties, b"k")
    bad_b, empties_b = _BadRows(10), _EmptyFields()
    parts = []
    for lo in (60, 0, 90, 30):  # blocks of 30 rows, replayed in an order other than the file's
        rec = Recorder()
        part = df.iloc[lo:lo + 30].reset_index(drop=True)
        out, k = parse_interactions(part, lines[lo:lo + 30], "f.csv", SPEC, rec, rec, b"k")
        rec.replay(bad_b, empties_b)
        parts.append((lo, out))
    assert bad_b.total == bad.total == 6 and bad_b.count == bad.count == {"f.csv": 6}
    assert empties_b.count == empties.count
    joined = pd.concat([o for _, o in sorted(parts, key=lambda p: p[0])], ignore_index=True)
    pd.testing.assert_frame_equal(joined, whole)
    assert keep.sum() == len(whole) == 94

    strict = _BadRows(5)
    with pytest.raises(DataError, match=r"f.csv: column 't', row 92: not unix seconds"):  # the 6th bad row
        for lo in (0, 30, 60, 90):
            rec = Recorder()
            parse_interactions(df.iloc[lo:lo + 30].reset_index(drop=True), lines[lo:lo + 30], "f.csv", SPEC,
                               rec, rec, b"k")
            rec.replay(strict, _EmptyFields())
    assert strict.total == 6


def test_value_counts_of_blocks_add_up_to_the_vocabulary_of_the_whole():
    s = pd.Series(["a|b", "b", "", "c|a", None, "b|d"] * 5)
    blocks = [value_counts(s.iloc[i:i + 7], sep="|") for i in range(0, len(s), 7)]
    summed = pd.concat(blocks).groupby(level=0).sum()
    assert vocab_from_counts(summed, 6) == build_vocab(s, 6, sep="|")
    assert vocab_from_counts(summed) == build_vocab(s, sep="|") == {"a": 1, "b": 2, "c": 3, "d": 4}


def test_synthetic_shards_hold_the_log_in_slices_of_time(tmp_path):
    cfg = SyntheticConfig(n_users=50, n_ads=20, n_impressions=1050, shard_rows=300, drift_at=0.5)
    schema = generate(cfg, tmp_path)
    parts = sorted((tmp_path / "impressions").glob("*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [300, 300, 300, 150]
    rows = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    assert rows["ts"].is_monotonic_increasing and rows["clicked"].isin([0, 1]).all()
    assert rows["user_id"].str.fullmatch(r"user\d{5}").all() and "format: parquet" in schema.read_text()
    again = tmp_path / "again"
    generate(cfg, again)
    pd.testing.assert_frame_equal(pd.read_parquet(again / "impressions" / "part-00002.parquet"),
                                  pd.read_parquet(parts[2]))
