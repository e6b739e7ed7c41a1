"""The package's exception classes, in one place.

Each one is raised at a boundary (a file, a configuration, a run folder, an HTTP request) with a message
that says what was wrong and how to fix it; the CLI turns them into an error line and exit code 2.
"""


class ConfigError(ValueError):
    """A configuration file or override that does not fit :class:`adrec.config.AdrecConfig`."""


class DataError(ValueError):
    """Raw data that does not fit the schema; the message names file, column and row."""


class RunError(FileNotFoundError):
    """A stage asked for the output of an earlier stage that is not in the run folder."""


class UnsafeFileError(ValueError):
    """A model or state file that only code execution could load (a pickle, a checkpoint holding objects,
    a class name off the allow-list): refused, never run; the message says how to rebuild it."""


class LogShrankError(RuntimeError):
    """The feedback log is shorter than an offset already consumed: it was replaced or rewritten."""


class ApiError(Exception):
    """A client error: ``status`` (4xx) and a message meant for the client."""

    def __init__(self, status: int, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []

    def body(self) -> dict:
        out: dict = {"detail": self.message}
        if self.details:
            out["errors"] = self.details
        return out


class LearnerFailedError(RuntimeError):
    """The online learner failed more often in a row than it may restart; it reports itself unhealthy."""
