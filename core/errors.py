"""The collector's exceptions: one base, each carrying its exit code."""

from common.errors import SpoolmqError
from common.exits import Exit


class CoreError(SpoolmqError):
    """Base of every error raised inside the core package."""


class DatastoreError(CoreError):
    """A datastore that cannot be opened, created or written.

    `url` is the datastore URL with any password masked, so the message can be
    logged and shown as it is.
    """

    exit_code = Exit.CANTCREAT

    def __init__(self, url: str, reason: str, *, exit_code: Exit | None = None):
        self.url = url
        self.reason = reason
        super().__init__(f"datastore {url}: {reason}", exit_code=exit_code)
