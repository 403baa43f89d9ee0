"""Exit codes of every spoolmq command (sysexits.h)."""

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    USAGE = 64
    DATAERR = 65
    UNAVAILABLE = 69
    SOFTWARE = 70
    CANTCREAT = 73
    IOERR = 74
    TEMPFAIL = 75
    NOPERM = 77
    CONFIG = 78
