"""The data contract: schema validation, clear errors naming file/column/row, bad-row budget, privacy."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pandas as pd
import pytest

from adrec.config import SyntheticConfig, build_config
from adrec.data import DataError, load_schema, read_dataset
from adrec.data.ids import normalize_id, normalize_ids
from adrec.data.movielens import materialize
from adrec.data.privacy import pseudonymize
from adrec.data.sources import SchemaSource, resolve_schema
from adrec.data.synthetic import generate

KEY = b"k"


def _write(tmp_path, impressions: str, schema_extra: str = "", ads: str | None = None, label: str = "clicked",
           **table: str):
    """The impressions file, and a schema for it; ``table``: more keys of the interactions table, as YAML
    values (e.g. ``sep="'\\t'"``)."""
    (tmp_path / "imp.csv").write_text(textwrap.dedent(impressions).lstrip())
    schema = textwrap.dedent(f"""
        interactions:
          path: imp.csv
          user: user_id
          item: ad_id
          timestamp: ts
          label: '{label}'
        """) + "".join(f"  {k}: {v}\n" for k, v in table.items()) + textwrap.dedent(schema_extra)
    if ads is not None:
        (tmp_path / "ads.csv").write_text(textwrap.dedent(ads).lstrip())
        schema += "items:\n  path: ads.csv\n  id: ad_id\n  text: [title]\n  categorical: [cat]\n  numeric: [price]\n"
    (tmp_path / "schema.yaml").write_text(schema)
    return load_schema(tmp_path / "schema.yaml")


def test_reads_valid_file_and_pseudonymizes(tmp_path):
    schema, root = _write(tmp_path, """
        user_id,ad_id,ts,clicked
        alice,a1,100,1
        bob,a2,2024-01-01T00:00:00Z,0
        """)
    raw = read_dataset(schema, root, KEY)
    df = raw.interactions
    assert list(df["label"]) == [1, 0]
    assert df["ts"].tolist() == [100, 1704067200]
    assert "alice" not in set(df["user"]) and df["user"].iloc[0] == pseudonymize("alice", KEY)


def test_missing_column_names_file_and_column(tmp_path):
    schema, root = _write(tmp_path, "user_id,ad_id,ts\nu,a,1\n")
    with pytest.raises(DataError, match=r"imp\.csv: missing column\(s\) \['clicked'\]"):
        read_dataset(schema, root, KEY)


def test_bad_value_names_row_and_column(tmp_path):
    schema, root = _write(tmp_path, """
        user_id,ad_id,ts,clicked
        u1,a1,100,1
        u2,a2,yesterday,0
        """)
    with pytest.raises(DataError, match=r"column 'ts', row 3"):
        read_dataset(schema, root, KEY)


def test_bad_rows_skipped_and_counted_when_allowed(tmp_path):
    schema, root = _write(tmp_path, """
        user_id,ad_id,ts,clicked
        u1,a1,100,1
        u2,a2,100,7
        u3,a3,100,0
        """)
    raw = read_dataset(schema, root, KEY, max_bad_rows=1)
    assert len(raw.interactions) == 2
    assert raw.counts["bad_rows_skipped"] == 1 and raw.counts["bad_rows_skipped.imp.csv"] == 1
    with pytest.raises(DataError, match=r"column 'clicked', row 3.*max_bad_rows"):
        read_dataset(schema, root, KEY, max_bad_rows=0)


def test_label_rule_and_headerless(tmp_path):
    (tmp_path / "r.tsv").write_text("1\t10\t5\t100\n1\t11\t3\t101\n")
    (tmp_path / "schema.yaml").write_text(
        "interactions:\n  path: r.tsv\n  sep: \"\\t\"\n  header: false\n  names: [u, i, rating, t]\n"
        "  user: u\n  item: i\n  timestamp: t\n  label: rating >= 4\n")
    schema, root = load_schema(tmp_path / "schema.yaml")
    assert read_dataset(schema, root, KEY).interactions["label"].tolist() == [1, 0]


def test_unknown_schema_key_is_rejected(tmp_path):
    (tmp_path / "schema.yaml").write_text(
        "interactions:\n  path: x.csv\n  user: u\n  item: i\n  timestamp: t\n  label: l\n  lable: oops\n")
    with pytest.raises(DataError, match="interactions.lable: unknown key"):
        load_schema(tmp_path / "schema.yaml")


def test_items_missing_from_catalog_are_kept_and_counted(tmp_path):
    schema, root = _write(tmp_path, """
        user_id,ad_id,ts,clicked
        u1,a1,100,1
        u1,a9,101,0
        """, ads="""
        ad_id,title,cat,price
        a1,shoes,sport,9.5
        """)
    raw = read_dataset(schema, root, KEY)
    assert len(raw.interactions) == 2
    assert raw.counts["interactions_with_unknown_item"] == 1


def test_bad_numeric_in_items_names_row(tmp_path):
    schema, root = _write(tmp_path, "user_id,ad_id,ts,clicked\nu1,a1,100,1\n", ads="""
        ad_id,title,cat,price
        a1,shoes,sport,9.5
        a2,hat,fashion,cheap
        """)
    with pytest.raises(DataError, match=r"ads\.csv: column 'price', row 3"):
        read_dataset(schema, root, KEY)


def test_synthetic_is_deterministic_and_valid(tmp_path):
    cfg = SyntheticConfig(n_users=50, n_ads=30, n_impressions=2000)
    p1 = generate(cfg, tmp_path / "a")
    p2 = generate(cfg, tmp_path / "b")
    for name in ("impressions.csv", "ads.csv", "users.csv"):
        assert (p1.parent / name).read_bytes() == (p2.parent / name).read_bytes()
    schema, root = load_schema(p1)
    raw = read_dataset(schema, root, KEY)
    assert len(raw.interactions) == 2000
    ctr = raw.interactions["label"].mean()
    assert 0.01 < ctr < 0.3
    # Position bias: slot 1 clicks more than slot 5.
    df = pd.read_csv(p1.parent / "impressions.csv")
    by_slot = df.groupby("slot")["clicked"].mean()
    assert by_slot[1] > by_slot[5]


def test_synthetic_drift_changes_preferences(tmp_path):
    base = SyntheticConfig(n_users=200, n_ads=50, n_impressions=20000, seed=3)
    a = pd.read_csv(generate(base, tmp_path / "a").parent / "impressions.csv")
    b = pd.read_csv(generate(base.model_copy(update={"drift_at": 0.5}), tmp_path / "b").parent / "impressions.csv")
    first = slice(0, 10000)
    assert (a["clicked"][first] == b["clicked"][first]).all()
    assert not (a["clicked"][10000:] == b["clicked"][10000:]).all()


def test_movielens_loader_on_real_data(tmp_path, ml100k_dir):
    schema, root = load_schema(materialize(ml100k_dir, tmp_path))
    raw = read_dataset(schema, root, KEY)
    assert raw.counts["interactions"] == 100_000
    assert raw.counts["users"] == 943 and raw.counts["items"] == 1682
    # Label rule rating >= 4 over u.data.
    ratings = pd.read_csv(ml100k_dir / "u.data", sep="\t", header=None)[2]
    assert raw.counts["positives"] == int((ratings >= 4).sum())
    toy = raw.items[raw.items["item"] == "1"].iloc[0]
    assert toy["item.genres"] == "Animation|Children's|Comedy"
    assert np.isclose(raw.users["user.age"].mean(), pd.read_csv(ml100k_dir / "u.user", sep="|", header=None)[1].mean())


def test_movielens_missing_folder_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="grouplens"):
        materialize(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("sep", ["::", "||", "\\s+", '"'])
def test_separator_must_be_one_character(tmp_path, sep):
    with pytest.raises(DataError, match="sep must be one character"):
        _write(tmp_path, "user_id,ad_id,ts,clicked\nu,a,1,1\n", sep=f"'{sep}'")

def test_tab_separator_by_name(tmp_path):
    schema, root = _write(tmp_path, "user_id\tad_id\tts\tclicked\nu\ta\t1\t1\n", sep="'\\t'")
    assert schema.interactions.sep == "\t"
    assert read_dataset(schema, root, KEY).interactions["item"].tolist() == ["a"]


def test_header_whitespace_and_bom_are_stripped_with_a_warning(tmp_path, caplog):
    schema, root = _write(tmp_path, "\ufeffuser_id , ad_id,ts,clicked \r\nu1,a1,100,1\r\nu2,a2,101,0\r\n")
    with caplog.at_level("WARNING"):
        raw = read_dataset(schema, root, KEY)
    assert raw.interactions["label"].tolist() == [1, 0]
    assert "'user_id ' read as 'user_id'" in caplog.text and "'clicked '" in caplog.text


def test_strict_header_names_the_cell(tmp_path):
    schema, root = _write(tmp_path, "user_id ,ad_id,ts,clicked\nu1,a1,100,1\n", strict_header="true")
    with pytest.raises(DataError, match=r"header cell 'user_id ' has surrounding whitespace"):
        read_dataset(schema, root, KEY)


def test_missing_column_listed_once(tmp_path):
    schema, root = _write(tmp_path, "user_id,ad_id,ts\nu,a,1\n", label="rating >= 4", context="[rating]")
    with pytest.raises(DataError, match=r"missing column\(s\) \['rating'\];"):
        read_dataset(schema, root, KEY)


# ---- ids, empty fields, the data root (issue 15) ---------------------------------------------------
def test_normalize_id_strips_and_composes():
    decomposed, composed = "jose\u0301", "jos\u00e9"
    assert normalize_id(f" \t{decomposed} \r\n") == composed
    assert normalize_id(42) == "42"
    assert normalize_id("Ann Lee") == "Ann Lee" != normalize_id("ann lee")  # inner space and case are kept
    assert normalize_id("\uff11") == "\uff11"  # a full-width digit is not folded (NFC, not NFKC)
    s = pd.Series([" a", "a ", "b", decomposed])
    assert normalize_ids(s).tolist() == ["a", "a", "b", composed]


def test_ingestion_pseudonymizes_the_normalized_id(tmp_path):
    # What Serve computes for a raw id (Recommender.user_index, the ingress) is what prepare stored.
    schema, root = _write(tmp_path, "user_id,ad_id,ts,clicked\n jose\u0301 , a1 ,100,1\njos\u00e9,a1,101,0\n")
    raw = read_dataset(schema, root, KEY)
    assert raw.interactions["user"].nunique() == 1
    assert raw.interactions["user"].iloc[0] == pseudonymize(normalize_id("  jos\u00e9"), KEY)
    assert raw.interactions["item"].tolist() == ["a1", "a1"]


def test_empty_fields_of_every_kind_are_kept_counted_and_warned_once(tmp_path, caplog):
    schema, root = _write(tmp_path, """
        user_id,ad_id,ts,clicked,slot
        u1,a1,100,1,top
        u1,a2,101,0,
        u2,a3,102,1,
        """, ads="""
        ad_id,title,cat,price,tags
        a1,shoes,sport,9.5,run|walk
        a2,,,,
        a3,hat,,1.0, | 
        """, context="[slot]")
    (tmp_path / "schema.yaml").write_text((tmp_path / "schema.yaml").read_text() + "  multi_valued: {tags: '|'}\n")
    schema, root = load_schema(tmp_path / "schema.yaml")
    with caplog.at_level("WARNING", logger="adrec.data.ingest"):
        raw = read_dataset(schema, root, KEY)
    assert len(raw.interactions) == 3 and len(raw.items) == 3
    assert {k: v for k, v in raw.counts.items() if k.startswith("empty_fields.")} == {
        "empty_fields.interactions.slot": 2, "empty_fields.items.title": 1, "empty_fields.items.cat": 2,
        "empty_fields.items.tags": 2, "empty_fields.items.price": 1}
    for col in ("slot", "title", "cat", "tags", "price"):
        assert caplog.text.count(f"column '{col}' is empty") == 1, col
    assert raw.items["item.tags"].tolist() == ["run|walk", "", ""]
    assert raw.items["item.price"].isna().tolist() == [False, True, False]


def test_a_short_line_reads_as_empty_trailing_fields(tmp_path):
    # Some writers drop a line's trailing empty cells: "a2,hat" under a five-column header.
    schema, root = _write(tmp_path, "user_id,ad_id,ts,clicked\nu1,a1,100,1\nu1,a2,101,0\n",
                          ads="ad_id,title,cat,price\na1,shoes,sport,9.5\na2,hat\n")
    raw = read_dataset(schema, root, KEY)
    assert raw.items["item.cat"].tolist() == ["sport", ""]
    assert raw.items["item.price"].isna().tolist() == [False, True]
    assert raw.counts["empty_fields.items.cat"] == 1 and raw.counts["empty_fields.items.price"] == 1


def test_duplicate_interactions_are_kept_and_counted(tmp_path):
    schema, root = _write(tmp_path, "user_id,ad_id,ts,clicked\nu1,a1,100,1\nu1,a1,100,1\nu1,a1,101,1\n")
    raw = read_dataset(schema, root, KEY)
    assert len(raw.interactions) == 3 and raw.counts["duplicate_interactions"] == 1


def test_data_root_given_is_where_paths_resolve(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "imp.csv").write_text("user_id,ad_id,ts,clicked\nu1,a1,100,1\n")
    (tmp_path / "schema.yaml").write_text(
        "interactions:\n  path: imp.csv\n  user: user_id\n  item: ad_id\n  timestamp: ts\n  label: clicked\n")
    with pytest.raises(DataError, match=rf"schema path 'imp\.csv', relative to {re.escape(str(tmp_path))}\)"):
        read_dataset(*load_schema(tmp_path / "schema.yaml"), KEY)
    schema, root = load_schema(tmp_path / "schema.yaml", data)
    assert root == data.resolve() and len(read_dataset(schema, root, KEY).interactions) == 1
    with pytest.raises(DataError, match="is not a folder"):
        load_schema(tmp_path / "schema.yaml", tmp_path / "nowhere")


def test_resolve_schema_records_where_the_root_comes_from(tmp_path):
    (tmp_path / "schema.yaml").write_text("interactions: {}\n")
    cfg = build_config(overrides=[f"data.dataset={tmp_path / 'schema.yaml'}"]).data
    assert resolve_schema(cfg, tmp_path / "raw") == SchemaSource(tmp_path / "schema.yaml", None)
    assert resolve_schema(cfg, tmp_path / "raw").root_from == "schema folder"
    cfg = build_config(overrides=[f"data.dataset={tmp_path}", f"data.data_dir={tmp_path / 'd'}"]).data
    src = resolve_schema(cfg, tmp_path / "raw")
    assert src.data_root == (tmp_path / "d").resolve() and src.root_from == "--data-dir"
