"""Errors shared by the data layer and the schema, in a module that imports nothing of the
project's, so the schema (config.py) can name them without importing the data pipeline."""


class DataError(ValueError):
    """Training data that cannot be used as configured (a missing, truncated or corrupt file, a
    tokenizer that does not fit the model, a split that leaves a dataset without documents).
    The message, one line, names the file and the fix."""
