"""Resolve ``data.dataset`` (a built-in name or a schema path) to a schema file."""

from __future__ import annotations

import logging
from pathlib import Path

from adrec.config import DataConfig
from adrec.data import movielens, synthetic
from adrec.errors import DataError

log = logging.getLogger(__name__)

BUILTIN = ("synthetic", "movielens-100k")

# Crosses that suit each built-in data set when the config names none.
DEFAULT_CROSSES = {
    "synthetic": [("user.age", "item.category"), ("ctx.hour", "item.category"),
                  ("user.gender", "item.category"), ("ctx.slot", "item.advertiser")],
    "movielens-100k": movielens.DEFAULT_CROSSES,
}


def resolve_schema(cfg: DataConfig, raw_dir: Path) -> Path:
    """Return the schema YAML for the configured data set, writing built-in ones under ``raw_dir``."""
    name = cfg.dataset
    if name == "synthetic":
        log.info("generating the synthetic ad log (seed %d) in %s", cfg.synthetic.seed, raw_dir)
        return synthetic.generate(cfg.synthetic, raw_dir)
    if name in ("movielens-100k", "ml-100k"):
        if not cfg.data_dir:
            raise DataError("movielens-100k needs --data-dir pointing at the unpacked ml-100k folder")
        return movielens.materialize(cfg.data_dir, raw_dir)
    path = Path(name)
    if path.is_dir():
        path = path / "schema.yaml"
    if not path.is_file():
        raise DataError(
            f"dataset '{name}' is neither a built-in ({', '.join(BUILTIN)}) nor an existing schema YAML"
        )
    return path
