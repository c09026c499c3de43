"""Errors raised by ``storage``: one base class at the bottom of its import graph."""


class StorageError(Exception):
    """Base class of every error ``storage`` raises on purpose."""


class OutOfSpaceError(StorageError):
    """The storage volume is full or below its configured floor."""


class InvalidInstanceError(StorageError):
    """A received dataset cannot be stored as it is (bad or unsafe UIDs, mismatch)."""


class QueryError(StorageError):
    """A query the node cannot answer as asked (the message says why)."""


class SchemaError(StorageError):
    """The database schema is newer than this code, or cannot be brought up to date."""
