"""Resolve ``data.dataset`` (a built-in name or a schema path) to a schema file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SchemaSource:
    """A schema YAML and the folder its relative paths resolve against."""

    path: Path
    data_root: Path | None  # ``--data-dir`` for a schema of the user's; None: the YAML's own folder

    @property
    def root_from(self) -> str:
        """What the manifest records as ``data_root_from``."""
        return "schema folder" if self.data_root is None else "--data-dir"


def resolve_schema(cfg: DataConfig, raw_dir: Path) -> SchemaSource:
    """The schema YAML for the configured data set (built-in ones written under ``raw_dir``), with the
    folder its paths resolve against: ``data.data_dir`` (``--data-dir``) when set, for a schema of the
    user's; a built-in's own schema already points into ``--data-dir`` where it reads one."""
    name = cfg.dataset
    if name == "synthetic":
        log.info("generating the synthetic ad log (seed %d) in %s", cfg.synthetic.seed, raw_dir)
        return SchemaSource(synthetic.generate(cfg.synthetic, raw_dir), None)
    if name in ("movielens-100k", "ml-100k"):
        if not cfg.data_dir:
            raise DataError("movielens-100k needs --data-dir pointing at the unpacked ml-100k folder")
        return SchemaSource(movielens.materialize(cfg.data_dir, raw_dir), None)
    path = Path(name)
    if path.is_dir():
        path = path / "schema.yaml"
    if not path.is_file():
        raise DataError(
            f"dataset '{name}' is neither a built-in ({', '.join(BUILTIN)}) nor an existing schema YAML"
        )
    return SchemaSource(path, Path(cfg.data_dir).expanduser().resolve() if cfg.data_dir else None)
