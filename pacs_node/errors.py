"""The project's exceptions: one base class, a few kinds an operator can act on."""


class NodeError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the key's path."""


class StorageError(NodeError):
    """An instance could not be stored durably."""


class OutOfSpaceError(StorageError):
    """The storage volume is full or below its configured floor."""


class InvalidInstanceError(StorageError):
    """A received dataset cannot be stored as it is (bad or unsafe UIDs, mismatch)."""


class UnusableInputError(NodeError):
    """An input the models cannot use: the job is skipped with this message as the reason."""


class DeliveryError(NodeError):
    """A result could not be sent to a peer."""
