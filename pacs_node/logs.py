"""Logging without patient data.

Exception messages from pydicom, SQLAlchemy or a decoder can quote attribute values (a patient
name in an SQL parameter list, say). At the default level a failure is logged with its
exception type only; the full traceback is logged at DEBUG, for an operator who chose to see it.
"""

from __future__ import annotations

import logging
import sys


def log_failure(log: logging.Logger, message: str, *args: object) -> None:
    exc = sys.exc_info()[1]
    kind = type(exc).__name__ if exc is not None else "error"
    log.error(message + " (%s; traceback at DEBUG level)", *args, kind)
    log.debug(message, *args, exc_info=True)
