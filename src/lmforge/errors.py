"""The one exception type for bad user input: the CLI prints its message, never a traceback."""


class LmforgeError(ValueError):
    """A user-facing error. The message names the file, field or value and what would be valid."""
