"""A/B between model versions: which arm a user is in (``serve.ab``).

A user's arm is a function of the pseudonymized user id and the experiment's salt alone: SHA-256 of
``salt NUL pseudonym``, its first 8 bytes read as a number in [0, 1), looked up in the arms' cumulative
shares (in the order the config lists them). Every replica, after any restart, on any node, puts a user in
the same arm, and the ingress decides it (for ``/recommend`` and for the ``arm`` of every logged
impression) from the user id alone: a client cannot choose or report its arm. A new salt re-draws the
split (a new experiment); changing the shares moves only the users near the boundaries.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from itertools import accumulate

from adrec.config import ABConfig


def unit_hash(pseudonym: str, salt: str) -> float:
    """A number in [0, 1), uniform over users and fixed per (salt, user)."""
    digest = hashlib.sha256(f"{salt}\0{pseudonym}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


class ArmAssigner:
    """``assigner(pseudonym)`` -> the arm's name (see the module)."""

    def __init__(self, ab: ABConfig):
        self.salt = ab.salt
        self.names = [a.name for a in ab.arms]
        bounds = list(accumulate(a.share for a in ab.arms))
        self.bounds = bounds[:-1]  # the last arm takes everything above the others (shares sum to 1 +- 1e-6)

    def __call__(self, pseudonym: str) -> str:
        return self.names[bisect_right(self.bounds, unit_hash(pseudonym, self.salt))]


def assigner(ab: ABConfig | None):
    """The app's arm assignment: a callable pseudonym -> arm, or one that answers None without A/B."""
    return ArmAssigner(ab) if ab is not None else (lambda pseudonym: None)
