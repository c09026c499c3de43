"""Logging without patient data, one record a line.

Exception messages from pydicom, SQLAlchemy or a decoder can quote attribute values (a patient
name in an SQL parameter list, say). At the default level a failure is logged with its
exception type only; the full traceback is logged at DEBUG, for an operator who chose to see it.

Values a peer controls (a calling AE title with a newline or a NUL) must not forge or break log
lines: :class:`OneLineFormatter` escapes control characters in the message, so every record
stays one line of text (tracebacks, added after the message, keep their lines).
"""

from __future__ import annotations

import logging
import re
import sys

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """*text* with control characters shown as escapes (``\\n``, ``\\x00``)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose message part can never hold a line break or a NUL."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = one_line(record.message)
        return super().formatMessage(record)


def log_failure(log: logging.Logger, message: str, *args: object) -> None:
    exc = sys.exc_info()[1]
    kind = type(exc).__name__ if exc is not None else "error"
    log.error(message + " (%s; traceback at DEBUG level)", *args, kind)
    log.debug(message, *args, exc_info=True)
