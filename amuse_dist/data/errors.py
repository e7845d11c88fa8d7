"""The one error type of the data pipeline: CLIs turn it into a message and exit status 2."""


class DataError(ValueError):
    """Bad data input (a file, a folder, a tokenizer, a size): the message names it."""
