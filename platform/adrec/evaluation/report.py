"""The run report: ``metrics.json`` (machine-readable) and ``report.md`` (for people).

``metrics.json`` is a flat JSON object, keys sorted, values floats. A value that is
not finite (e.g. AUC on a single-class test set) is written as ``null`` so the file
stays strict JSON that any parser (jq, JavaScript) reads.

``report.md`` holds a headline table of the metrics, every image (embedded by a
path relative to the report folder; images outside it are copied into
``<report_dir>/figures/``), then the extra sections and tables.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["write_report", "markdown_table", "flatten_metrics"]

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten ``{"ctr": {"auc": 0.7}}`` to ``{"ctr.auc": 0.7}``; every leaf must be a number."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, prefix=name + "."))
            continue
        if name in out:
            raise ValueError(f"metric {name!r} given twice")
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(()).item()
        if value is None:
            out[name] = math.nan
        elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {name!r} is not a number: {value!r}")
        else:
            out[name] = float(value)
    return out


def write_report(
    report_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    sections: Mapping[str, str] | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
    tables: Mapping[str, pd.DataFrame | Sequence[Mapping[str, Any]]] | None = None,
    *,
    title: str = "adrec evaluation report",
) -> Path:
    """Write ``metrics.json`` and ``report.md`` into ``report_dir``; return the report.md path.

    Args:
        metrics: metric name -> number (nested dicts are flattened with ".").
        sections: heading -> markdown body, appended in order.
        images: caption -> PNG path; each is embedded in report.md by relative path.
        tables: heading -> DataFrame (or list of records), rendered with
            :func:`markdown_table`.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    flat = flatten_metrics(metrics)
    json_ready = {}
    for key in sorted(flat):
        value = flat[key]
        if not math.isfinite(value):
            logger.warning("metric %s is %s; written as null in %s", key, value, METRICS_FILE)
            json_ready[key] = None
        else:
            json_ready[key] = value
    _atomic_write(report_dir / METRICS_FILE,
                  json.dumps(json_ready, indent=2, sort_keys=True, allow_nan=False) + "\n")

    lines = [f"# {title}", ""]
    lines += ["## Metrics", ""]
    if flat:
        lines.append(markdown_table(
            [{"metric": k, "value": flat[k]} for k in sorted(flat)], floatfmt=".4f"
        ))
    else:
        lines.append("_No metrics._")
    lines.append("")

    if images:
        lines += ["## Figures", ""]
        for caption, img in images.items():
            rel = _image_link(report_dir, Path(img))
            lines += [f"### {caption}", "", f"![{_escape_alt(caption)}](<{rel}>)", ""]

    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", str(body).rstrip(), ""]

    for heading, table in (tables or {}).items():
        lines += [f"## {heading}", "", markdown_table(table), ""]

    path = report_dir / REPORT_FILE
    _atomic_write(path, "\n".join(lines).rstrip() + "\n")
    logger.info("wrote %s and %s", report_dir / METRICS_FILE, path)
    return path


def _image_link(report_dir: Path, img: Path) -> str:
    if not img.is_file():
        raise FileNotFoundError(f"report image not found: {img}")
    root = report_dir.resolve()
    src = img.resolve()
    try:
        rel = src.relative_to(root)
    except ValueError:
        dest_dir = root / "figures"
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / src.name
        stem, n = src.stem, 1
        while dest.exists() and not _same_file(dest, src):
            dest = dest_dir / f"{stem}_{n}{src.suffix}"
            n += 1
        shutil.copy2(src, dest)
        rel = dest.relative_to(root)
    return rel.as_posix()


def _same_file(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def _escape_alt(text: str) -> str:
    return text.replace("[", r"\[").replace("]", r"\]")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markdown_table(
    df_or_records: pd.DataFrame | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    floatfmt: str = ".4f",
    index: bool | None = None,
) -> str:
    """A GitHub-flavoured markdown table (no tabulate needed).

    Accepts a DataFrame, a list of records (dicts; columns in first-seen order), or a
    dict of columns. ``index``: include the DataFrame index (default: only when it is
    not a plain 0..n-1 RangeIndex). Floats use ``floatfmt``; numeric columns are
    right-aligned; ``|`` and newlines in cells are escaped.
    """
    if isinstance(df_or_records, pd.DataFrame):
        df = df_or_records
    elif isinstance(df_or_records, Mapping):
        df = pd.DataFrame(dict(df_or_records))
    else:
        records = list(df_or_records)
        columns: list[str] = []
        for rec in records:
            if not isinstance(rec, Mapping):
                raise TypeError(f"records must be mappings, got {type(rec).__name__}")
            for c in rec:
                if c not in columns:
                    columns.append(c)
        df = pd.DataFrame.from_records(records, columns=columns)
    if index is None:
        index = not (isinstance(df.index, pd.RangeIndex) and df.index.start == 0
                     and df.index.step == 1 and df.index.name is None)
    if index:
        df = df.reset_index()
    if df.shape[1] == 0:
        return ""
    headers = [_cell(c, floatfmt) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               for c in df.columns]
    rows = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False, name=None)]
    widths = [max([len(h), 3] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt_row(cells):
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w
                            for w, num in zip(widths, numeric)) + " |"
    return "\n".join([fmt_row(headers), sep] + [fmt_row(r) for r in rows])


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        return format(float(value), floatfmt)
    if value is pd.NA or value is pd.NaT:
        return ""
    text = str(value)
    return text.replace("|", r"\|").replace("\r\n", "<br>").replace("\n", "<br>")
