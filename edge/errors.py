"""Errors of the edge; each carries the exit code its command ends with."""

from common.errors import SpoolmqError
from common.exits import Exit


class SpoolError(SpoolmqError):
    """Base of the edge's errors."""


class OutboxError(SpoolError):
    """The outbox cannot be opened, created or written."""

    exit_code = Exit.CANTCREAT


class RecordError(SpoolError):
    """A record that cannot be accepted (not JSON, too large, ...)."""

    exit_code = Exit.DATAERR


class OutboxBusy(SpoolError):
    """The outbox is locked or the disk is full: try again later."""

    exit_code = Exit.TEMPFAIL


class OutboxFull(OutboxBusy):
    """The outbox reached its limits and may not drop what is waiting."""
