"""Errors lorakit reports to the user as one message instead of a traceback."""


class LorakitError(Exception):
    """Bad input from the user: printed as one message, exit code 2."""

    exit_code = 2
