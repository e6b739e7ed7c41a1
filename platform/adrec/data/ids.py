"""The one normalization of user and item ids, shared by ingestion and serving.

An id is the same id wherever it arrives (a data file, a ``/recommend`` or ``/feedback`` body) only if
both sides clean it the same way, so prepare and Serve both call :func:`normalize_id` before they
pseudonymize a user id or look an item up:

- surrounding whitespace is stripped (spreadsheet exports and hand-written clients leave it behind);
- the text is put in Unicode NFC, so an id typed with a precomposed accent (``é``, U+00E9) and one
  whose bytes carry a combining accent (``e`` + U+0301, what macOS file names and some keyboards
  produce) are one id. Canonically equivalent strings look identical to every person who reads them;
  keeping them apart would split one user in two at random. Compatibility forms (NFKC: ligatures,
  full-width digits) are NOT folded: they can be distinct ids on purpose.

Inner whitespace and case are kept: ``"Ann Lee"`` and ``"ann lee"`` stay two ids.
"""

from __future__ import annotations

import unicodedata

import pandas as pd


def normalize_id(raw) -> str:
    """``raw`` as text, in Unicode NFC, without surrounding whitespace."""
    return unicodedata.normalize("NFC", str(raw)).strip()


def normalize_ids(ids: pd.Series) -> pd.Series:
    """:func:`normalize_id` of every value, computed once per distinct value (logs repeat ids).

    Python's own ``str.strip`` on purpose, not a vectorized pandas/Arrow one: Arrow's idea of
    whitespace is not Python's, and Serve normalizes with :func:`normalize_id`.
    """
    text = ids.astype(str)
    uniq = pd.unique(text.to_numpy())
    return text.map({u: normalize_id(u) for u in uniq})
