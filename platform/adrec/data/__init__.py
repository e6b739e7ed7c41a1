"""Raw data: the schema contract, the built-in data sets, validated ingestion, pseudonymization."""

from adrec.errors import DataError
from adrec.data.ingest import RawData, read_dataset
from adrec.data.schema import DatasetSchema, load_schema

__all__ = ["DataError", "DatasetSchema", "RawData", "load_schema", "read_dataset"]
