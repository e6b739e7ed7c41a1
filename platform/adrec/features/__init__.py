"""Features: vocabularies, buckets, hashed crosses, text, history and the temporal split."""

from adrec.features.spec import FeatureSpec
from adrec.features.split import TEST, TRAIN, VALID, temporal_split

__all__ = ["FeatureSpec", "TEST", "TRAIN", "VALID", "temporal_split"]
