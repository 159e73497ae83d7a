"""Errors lorakit reports to the user as one message instead of a traceback."""


class LorakitError(Exception):
    """Bad input from the user: printed as one message, exit code 2."""

    exit_code = 2


class RunFailed(LorakitError):
    """The run could not go on (disk full, non-finite loss): a message, exit code 1."""

    exit_code = 1
