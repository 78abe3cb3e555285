"""The one exception type that the CLI turns into a one-line message (never a traceback)."""


class BnfoldError(Exception):
    """A user-facing error: bad input, a bad file or a bad option. The message says what to do."""
