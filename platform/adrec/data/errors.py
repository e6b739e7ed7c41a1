class DataError(ValueError):
    """Raw data that does not fit the schema; the message names file, column and row."""
