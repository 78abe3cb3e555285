"""The one exception type that the CLI turns into a one-line message (never a traceback)."""


class BnfoldError(Exception):
    """A user-facing error: bad input, a bad file or a bad option. The message says what to do."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped a job that must not go on with a partial model (exit code 130).
    The message says what was saved and what was left untouched."""
