"""A model version: one folder Serve (or anyone) can load on its own; this package owns its format.

- :mod:`~adrec.model_version.layout`: the file names of a version folder (:class:`VersionPaths`).
- :mod:`~adrec.model_version.writer`: the one writer (:func:`write_version`: atomic, fsync-ed, with
  the known users' two-stage lists), used by training (:func:`publish`) and the online learner.
- :mod:`~adrec.model_version.registry`: the run's numbered, immutable versions on its store
  (:class:`VersionRegistry`: commit with a checksummed manifest written last, live pointer, rollback,
  prune) and :func:`materialize` (a verified local copy, cached per node).
- :mod:`~adrec.model_version.publish`: training's publish, a run's stages -> its next live version.
- :mod:`~adrec.model_version.reader`: :func:`read_version` (``version.json``) and :func:`load_version`
  (a :class:`ModelVersion`: spec, tables, histories, seen items, sources, models).
- :mod:`~adrec.model_version.lists`: the precomputed two-stage lists (:class:`TwoStageLists`).
"""

from .layout import VersionPaths
from .lists import TwoStageLists
from .publish import publish
from .reader import ModelVersion, load_version, read_version
from .registry import (
           VersionEntry,
           VersionRegistry,
           live_dir,
           live_entry,
           materialize,
           registry_of,
)
from .writer import write_version

__all__ = ["ModelVersion", "TwoStageLists", "VersionEntry", "VersionPaths", "VersionRegistry", "live_dir", "live_entry",
           "load_version", "materialize", "publish", "read_version", "registry_of", "write_version"]
