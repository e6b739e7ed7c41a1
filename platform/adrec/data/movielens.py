"""MovieLens-100k as a dataset of the schema contract.

u.data and u.user are read in place; u.item (latin-1, genres as 19 flag columns) is rewritten once
as a UTF-8 items.csv with ``genres`` as a multi-valued column. The data itself is never copied into
the repository: get it from https://grouplens.org/datasets/movielens/100k/ (see its README for the licence).

Labels, a stated proxy (MovieLens logs ratings, not ad clicks): a click is a rating of 4 or 5, a conversion a
rating of 5 (``CONVERSION_RULE``), so every conversion is behind a click as the schema contract requires.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adrec.errors import DataError
from adrec.data.schema import DatasetSchema, write_schema

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]

CLICK_RULE = "rating >= 4"
CONVERSION_RULE = "rating == 5"  # the proxy of issue 17: a 5 is the "purchase" behind a liked movie

DEFAULT_CROSSES = [
    ("user.age", "item.genre"),
    ("user.gender", "item.genre"),
    ("user.occupation", "item.genre"),
    ("user.age", "item.decade"),
]


def materialize(data_dir: str | Path, out_dir: str | Path) -> Path:
    src = Path(data_dir).expanduser().resolve()
    need = ["u.data", "u.user", "u.item"]
    missing = [f for f in need if not (src / f).is_file()]
    if missing:
        raise DataError(
            f"{src} is not a MovieLens-100k folder: missing {missing}. Download ml-100k.zip from "
            "https://grouplens.org/datasets/movielens/100k/ and pass its unpacked folder as --data-dir."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["movie_id", "title", "release", "video_release", "url", *GENRES]
    items = pd.read_csv(src / "u.item", sep="|", header=None, names=cols, encoding="latin-1", dtype=str,
                        keep_default_na=False)
    flags = items[GENRES].astype(int).to_numpy().astype(bool)
    genres = ["|".join(g for g, f in zip(GENRES, row) if f) or "unknown" for row in flags]
    year = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce").dt.year
    pd.DataFrame({
        "movie_id": items["movie_id"],
        "title": items["title"],
        "genres": genres,
        "genre": [g.split("|")[0] for g in genres],
        "decade": [f"{int(y) // 10 * 10}s" if pd.notna(y) else "" for y in year],
        "year": year,
    }).to_csv(out / "items.csv", index=False)
    schema = DatasetSchema.model_validate({
        "interactions": {"path": str(src / "u.data"), "sep": "\t", "header": False,
                         "names": ["user_id", "movie_id", "rating", "ts"],
                         "user": "user_id", "item": "movie_id", "timestamp": "ts", "label": CLICK_RULE,
                         "conversion": CONVERSION_RULE},
        "items": {"path": "items.csv", "id": "movie_id", "text": ["title", "genres"],
                  "categorical": ["genre", "decade"], "multi_valued": {"genres": "|"}, "numeric": ["year"]},
        "users": {"path": str(src / "u.user"), "sep": "|", "header": False,
                  "names": ["user_id", "age", "gender", "occupation", "zip"],
                  "id": "user_id", "categorical": ["gender", "occupation"], "numeric": ["age"]},
    })
    path = out / "schema.yaml"
    write_schema(schema, path)
    return path
