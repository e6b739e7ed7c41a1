"""The data boundary on malformed but realistic files: ``prepare`` end to end (reading, the feature
pipeline on Ray Data, the manifest) on each, for the clear error or the kept-and-counted outcome that
docs/design.md "Data contract" promises.

Each case is a small folder of files written byte for byte (CRLF, a BOM, stray spaces are the point),
prepared through :func:`adrec.flow.prepare` on the session's real local Ray.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from adrec import flow
from adrec.config import build_config
from adrec.data.ids import normalize_id
from adrec.data.privacy import pseudonymize
from adrec.errors import DataError
from adrec.run import RunDir

KEY = "real-files-key"

SCHEMA = """\
interactions: {path: imp.csv, user: user_id, item: ad_id, timestamp: ts, label: clicked, context: [slot]}
items:
  path: ads.csv
  id: ad_id
  text: [title]
  categorical: [cat]
  multi_valued: {tags: "|"}
  numeric: [price]
users: {path: users.csv, id: user_id, categorical: [gender], numeric: [age]}
"""


def _impressions(n_users: int = 4, per_user: int = 6) -> list[str]:
    """Enough rows per user for a train/valid/test split: user u<k> sees ads a0..a3 in turn."""
    lines = []
    for u in range(n_users):
        for t in range(per_user):
            lines.append(f"u{u},a{(u + t) % 4},{1000 + 10 * t + u},{(u + t) % 2},{'top' if t % 2 else 'side'}")
    return lines


def _csv(header: str, lines: list[str], eol: str = "\n", bom: bool = False) -> bytes:
    return (("\ufeff" if bom else "") + eol.join([header, *lines]) + eol).encode()


ADS = ["a0,shoes,sport,9.5,run|walk", "a1,hat,fashion,19,sun", "a2,bag,fashion,5,", "a3,cap,sport,7,sun|run"]
USERS = ["u0,f,31", "u1,m,45", "u2,f,22", "u3,m,60"]


def _files(imp: list[str] | None = None, ads: list[str] | None = None, users: list[str] | None = None,
           imp_header: str = "user_id,ad_id,ts,clicked,slot") -> dict[str, bytes]:
    return {"imp.csv": _csv(imp_header, _impressions() if imp is None else imp),
            "ads.csv": _csv("ad_id,title,cat,price,tags", ADS if ads is None else ads),
            "users.csv": _csv("user_id,gender,age", USERS if users is None else users)}


def _prepare(tmp_path, files: dict[str, bytes], *overrides: str, schema: str = SCHEMA, data_dir=None):
    """Write ``files`` and the schema (both into ``data_dir`` when given: the schema then elsewhere),
    run prepare; returns the run and its manifest entry."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name, body in files.items():
        (data / name).write_bytes(body)
    schema_dir = tmp_path / "schema" if data_dir else data
    schema_dir.mkdir(exist_ok=True)
    (schema_dir / "schema.yaml").write_text(schema)
    opts = [f"data.dataset={schema_dir / 'schema.yaml'}", f"data.pseudonym_key={KEY}", "ray.num_cpus=2", *overrides]
    if data_dir:
        opts.append(f"data.data_dir={data}")
    run = RunDir(tmp_path / "run")
    flow.prepare(build_config(overrides=opts), run)
    return run, run.manifest()["stages"]["prepare"]


def _features(run: RunDir, name: str) -> pd.DataFrame:
    return pd.read_parquet(run.features / f"{name}.parquet")


def test_spreadsheet_export_crlf_bom_padded_header_quoted_separators(ray_session, tmp_path, caplog):
    imp = _impressions()
    imp[0] = " u0 ," + imp[0].split(",", 1)[1]  # an id with stray spaces is the same user
    files = {
        "imp.csv": _csv("user_id ,ad_id, ts,clicked,slot ", imp, eol="\r\n", bom=True),
        "ads.csv": _csv("ad_id,title,cat,price,tags",
                        ['a0,"Toy Story, The",sport,9.5,"run|walk"', 'a1,"Hat, ""sun""",fashion,19,sun', *ADS[2:]],
                        eol="\r\n", bom=True),
        "users.csv": _csv("user_id,gender,age", USERS, eol="\r\n"),
    }
    with caplog.at_level("WARNING", logger="adrec"):
        run, prep = _prepare(tmp_path, files)
    assert "header cell 'user_id ' read as 'user_id'" in caplog.text
    assert "'slot ' read as 'slot'" in caplog.text
    counts = prep["counts"]
    assert counts["interactions"] == len(imp) and counts["indexed_users"] == 4 and counts["indexed_items"] == 4
    assert counts["bad_rows_skipped"] == 0 and counts["interactions_with_unknown_item"] == 0
    items = _features(run, "items").set_index("item")
    assert items.loc["a0", "text"] == "Toy Story, The" and items.loc["a1", "text"] == 'Hat, "sun"'
    assert items.loc["a0", "item.tags"] == "run|walk"
    # No CR survives anywhere: the last column's values are clean.
    inter = _features(run, "interactions")
    assert set(map(str, inter.columns)) >= {"f:ctx.slot", "f:item.cat", "f:user.gender"}
    assert (inter["f:ctx.slot"] > 0).all() and (inter["f:user.gender"] > 0).all()
    users = _features(run, "users")
    assert pseudonymize(normalize_id(" u0 "), KEY.encode()) in set(users["user"])


def test_incomplete_side_tables_and_empty_fields_of_every_kind(ray_session, tmp_path, caplog):
    imp = _impressions() + ["u9,a0,2000,1,top", "u0,a7,2001,0,", "u9,a7,2002,1,"]  # u9, a7: in no side table
    ads = ["a0,shoes,sport,9.5,run|walk", "a1,,,,", "a2,bag,fashion,5,", "a3,cap,,7, | "]
    users = ["u0,f,31", "u1,,", "u2,f,22", "u3,m,"]
    with caplog.at_level("WARNING", logger="adrec"):
        run, prep = _prepare(tmp_path, _files(imp, ads, users))
    counts = prep["counts"]
    assert counts["interactions"] == len(imp)  # nothing dropped
    assert counts["interactions_with_unknown_item"] == 2 and counts["interactions_with_unknown_user"] == 2
    assert {k: v for k, v in counts.items() if k.startswith("empty_fields.")} == {
        "empty_fields.interactions.slot": 2,
        "empty_fields.items.title": 1, "empty_fields.items.cat": 2, "empty_fields.items.tags": 3,
        "empty_fields.items.price": 1, "empty_fields.users.gender": 1, "empty_fields.users.age": 2}
    for col in ("slot", "title", "cat", "tags", "price", "gender", "age"):
        assert len(re.findall(rf"column '{col}' is empty", caplog.text)) == 1, col
    assert "name items missing from the items table" in caplog.text

    items = _features(run, "items").set_index("item")
    width = len(items.loc["a0", "c:item.tags"])
    for item in ("a1", "a7"):  # an item with every field empty, and one the items table lacks
        assert items.loc[item, "text"] == ""
        assert items.loc[item, "c:item.cat"] == 0 and items.loc[item, "c:item.price"] == 0
        assert list(items.loc[item, "c:item.tags"]) == [0] * width
    assert list(items.loc["a3", "c:item.tags"]) == [0] * width  # " | ": separators only
    assert items.loc["a0", "c:item.cat"] > 0 and min(items.loc["a0", "c:item.tags"]) > 0
    users = _features(run, "users").set_index("user")
    u9 = pseudonymize("u9", KEY.encode())
    assert users.loc[u9, "c:user.gender"] == 0 and users.loc[u9, "c:user.age"] == 0
    inter = _features(run, "interactions")
    a7 = int(items.index.get_loc("a7"))
    assert (inter.loc[inter["item_idx"] == a7, "f:item.cat"] == 0).all()
    assert inter["f:ctx.slot"].isin([0, *range(1, 3)]).all() and (inter["f:ctx.slot"] == 0).sum() == 2


def test_duplicate_rows_are_kept_and_counted(ray_session, tmp_path):
    imp = _impressions()
    run, prep = _prepare(tmp_path, _files(imp + imp[:3]))
    counts = prep["counts"]
    assert counts["interactions"] == len(imp) + 3 and counts["duplicate_interactions"] == 3
    assert sum(v for k, v in counts.items() if k.startswith("rows.")) == len(imp) + 3


def test_blank_labels_are_bad_rows_named_or_skipped(ray_session, tmp_path):
    imp = _impressions()
    imp[1] = imp[1].replace(",0,", ",,").replace(",1,", ",,")
    imp[4] = imp[4].replace(",0,", ", ,").replace(",1,", ", ,")
    with pytest.raises(DataError, match=r"imp\.csv: column 'clicked', row 3: label must be 0 or 1 \(value ''\); "
                                         r"2 such row\(s\)"):
        _prepare(tmp_path, _files(imp))
    run, prep = _prepare(tmp_path, _files(imp), "data.max_bad_rows=2")
    counts = prep["counts"]
    assert counts["interactions"] == len(imp) - 2
    assert counts["bad_rows_skipped"] == 2 and counts["bad_rows_skipped.imp.csv"] == 2


def test_missing_column_is_named_once(ray_session, tmp_path):
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, _files([ln.rsplit(",", 1)[0] for ln in _impressions()], imp_header="user_id,ad_id,ts,clicked"))
    assert str(err.value).count("'slot'") == 1 and "missing column(s) ['slot']" in str(err.value)


def test_data_dir_is_where_a_schema_resolves_and_the_manifest_says_so(ray_session, tmp_path):
    run, prep = _prepare(tmp_path, _files(), data_dir=True)
    assert prep["data_root"] == str((tmp_path / "data").resolve()) and prep["data_root_from"] == "--data-dir"
    assert prep["counts"]["interactions"] == len(_impressions())
    # The evaluation stage reads the raw ids again from the recorded root, not the schema's folder.
    from adrec.evaluation.stage import _raw_user_ids

    raw = _raw_user_ids(run, KEY.encode())
    assert sorted(raw.values()) == ["u0", "u1", "u2", "u3"]
    # Without --data-dir the same schema resolves against its own folder, and says where it looked.
    with pytest.raises(DataError, match=rf"relative to {re.escape(str(tmp_path / 'schema'))}\)"):
        flow.prepare(build_config(overrides=[f"data.dataset={tmp_path / 'schema' / 'schema.yaml'}",
                                             f"data.pseudonym_key={KEY}", "ray.num_cpus=2"]), RunDir(tmp_path / "r2"))


def test_schema_folder_is_recorded_when_no_data_dir(ray_session, tmp_path):
    _, prep = _prepare(tmp_path, _files())
    assert prep["data_root"] == str((tmp_path / "data").resolve()) and prep["data_root_from"] == "schema folder"


def test_serve_normalizes_user_ids_as_prepare_did(tiny_run):
    """Recommender.user_index (what Serve's explain and ranking paths use) finds " user7 " as user7."""
    from adrec.serving.recommender import Recommender

    raw_ids = pd.read_csv(tiny_run.raw / "impressions.csv", dtype=str)["user_id"].unique()[:5]
    rec = Recommender(tiny_run.model, b"test-key", load_ranker=False, load_topk=False)
    idx = np.array([rec.user_index(u) for u in raw_ids])
    assert (idx >= 0).all()
    assert [rec.user_index(f"  {u}\t") for u in raw_ids] == idx.tolist()
