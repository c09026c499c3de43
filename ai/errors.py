"""Errors raised by ``ai``: one base class at the bottom of its import graph."""


class AiError(Exception):
    """Base class of every error ``ai`` raises on purpose."""


class UnusableInputError(AiError):
    """An input the models cannot use: its job is skipped with this message as the reason."""


class ModelError(AiError):
    """A model folder is missing, incomplete or invalid."""
