"""Errors raised by ``pacs_node`` (the network, the roles, the command line).

``storage`` and ``ai`` have their own (``storage.errors``, ``ai.errors``); the command line
answers all three bases with a message and exit status 2.
"""


class NodeError(Exception):
    """Base class of every error ``pacs_node`` raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the key's path."""


class DeliveryError(NodeError):
    """A result could not be sent to a peer."""
