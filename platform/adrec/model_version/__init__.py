"""A model version: one folder Serve (or anyone) can load on its own; this package owns its format.

- :mod:`~adrec.model_version.layout`: the file names of a version folder (:class:`VersionPaths`).
- :mod:`~adrec.model_version.writer`: the one writer (:func:`write_version`: atomic, fsync-ed, with
  the known users' two-stage lists), used by training (:func:`publish`) and the online learner.
- :mod:`~adrec.model_version.publish`: training's publish, a run's stages -> ``run/model``.
- :mod:`~adrec.model_version.reader`: :func:`read_version` (``version.json``) and :func:`load_version`
  (a :class:`ModelVersion`: spec, tables, histories, seen items, sources, models).
- :mod:`~adrec.model_version.lists`: the precomputed two-stage lists (:class:`TwoStageLists`).
"""

from .layout import VersionPaths
from .lists import TwoStageLists
from .publish import publish
from .reader import ModelVersion, load_version, read_version
from .writer import write_version

__all__ = ["ModelVersion", "TwoStageLists", "VersionPaths", "load_version", "publish", "read_version", "write_version"]
