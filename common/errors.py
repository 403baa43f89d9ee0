"""The one exception base of spoolmq; each error carries its exit code."""

from common.exits import Exit


class SpoolmqError(Exception):
    """Base of every error a command reports as one line and an exit code."""

    exit_code: Exit = Exit.SOFTWARE

    def __init__(self, message: str, *, exit_code: Exit | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(SpoolmqError):
    """A config file that cannot be used; names the key and the reason."""

    exit_code = Exit.CONFIG

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        where = f"{key}: " if key else ""
        super().__init__(f"config error: {where}{reason}")


class EnvelopeError(SpoolmqError):
    """A message on the wire that does not decode."""

    exit_code = Exit.DATAERR


class LinkError(SpoolmqError):
    """The broker cannot be reached or refused us."""

    exit_code = Exit.UNAVAILABLE
