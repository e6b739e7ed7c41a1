"""The dataset schema YAML: a folder of files plus this description, so a new data set needs no code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adrec.errors import DataError


#: Separators a schema may name by escape, since a tab is awkward to write in YAML.
NAMED_SEPARATORS = {"\\t": "\t", "tab": "\t"}


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A file, a folder (every file under it; partitioned Parquet included), a glob or a URI
    # (s3://bucket/key/...). A folder, a glob or a URI needs features.pipeline: streaming.
    path: str
    # csv or parquet; None: from the files' extension (.parquet / .pq, anything else is CSV).
    format: Literal["csv", "parquet"] | None = None
    # One character (or a named escape: "\t", "tab"). pandas takes a longer separator as a regular
    # expression run by its slow Python engine, where a crafted line can backtrack for minutes.
    sep: str = ","
    header: bool = True
    names: list[str] | None = None
    # A header cell that matches a schema column only once stripped of whitespace ("user_id ") is taken
    # with a warning; strict_header makes it an error naming the cell.
    strict_header: bool = False

    @field_validator("sep")
    @classmethod
    def _one_character(cls, sep: str) -> str:
        sep = NAMED_SEPARATORS.get(sep, sep)
        if len(sep) != 1 or sep in ('"', "\n", "\r"):
            raise ValueError(f"sep must be one character (or \\t / tab), not {sep!r}")
        return sep

    @model_validator(mode="after")
    def _names_without_header(self):
        if not self.header and not self.names:
            raise ValueError("header: false needs `names: [...]` listing the columns")
        return self


class InteractionsSchema(_Table):
    user: str
    item: str
    timestamp: str
    label: str  # a 0/1 column, or a rule such as "rating >= 4"
    # The second label (issue 17): a conversion behind the click, as a 0/1 column or a rule in the label's
    # style ("rating == 5"). A row that converts without a click is bad data (counted under max_bad_rows).
    # None: the data set has clicks only.
    conversion: str | None = None
    context: list[str] = Field(default_factory=list)


class EntitySchema(_Table):
    id: str
    text: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)
    multi_valued: dict[str, str] = Field(default_factory=dict)
    numeric: list[str] = Field(default_factory=list)
    # Items only: the column with each item's bid (a number >= 0), what serve.objective=expected_value
    # multiplies the click probability by. It travels into every model version's item table (``bid``).
    # An item without a bid (an empty cell, or an item the table lacks) is an error naming the column,
    # unless bid_default gives the value it then takes.
    bid: str | None = None
    bid_default: float | None = Field(None, ge=0)


class DatasetSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interactions: InteractionsSchema
    items: EntitySchema | None = None
    users: EntitySchema | None = None

    @model_validator(mode="after")
    def _bids_are_items(self):
        if self.users is not None and (self.users.bid is not None or self.users.bid_default is not None):
            raise ValueError("users.bid: bids belong to the items table (items.bid)")
        return self


_RULE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")


def parse_label_rule(label: str, what: str = "interactions.label") -> tuple[str, str | None, float | None]:
    """``"rating >= 4"`` -> ("rating", ">=", 4.0); a bare column name -> (name, None, None).
    ``what``: the schema key the rule came from, for the error."""
    m = _RULE.match(label)
    if m:
        return m.group(1), m.group(2), float(m.group(3))
    if re.fullmatch(r"[A-Za-z_][\w.]*", label.strip()):
        return label.strip(), None, None
    raise DataError(
        f"{what} '{label}' is neither a column name nor a rule like 'rating >= 4'"
    )


def load_schema(path: str | Path, data_root: str | Path | None = None) -> tuple[DatasetSchema, Path]:
    """Read a schema YAML; returns it with the folder its relative paths start from: ``data_root``
    when given (``--data-dir``), else the YAML's own folder."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"schema file {p} does not exist")
    root = (p.parent if data_root is None else Path(data_root).expanduser()).resolve()
    if not root.is_dir():
        raise DataError(f"data folder {root} (where the paths of schema {p} resolve) is not a folder")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"schema file {p} is not valid YAML: {err}") from None
    try:
        schema = DatasetSchema.model_validate(raw or {})
    except ValidationError as err:
        msgs = []
        for e in err.errors():
            where = ".".join(str(x) for x in e["loc"])
            what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            msgs.append(f"  {where}: {what}")
        raise DataError(f"schema file {p} does not fit the dataset contract:\n" + "\n".join(msgs)) from None
    parse_label_rule(schema.interactions.label)
    if schema.interactions.conversion is not None:
        parse_label_rule(schema.interactions.conversion, "interactions.conversion")
    return schema, root


def write_schema(schema: DatasetSchema, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(schema.model_dump(exclude_none=True), sort_keys=False))
