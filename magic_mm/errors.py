"""Errors a user can cause.

Every ``UserError`` message names the offending input and says how to fix it.
The CLI prints these without a traceback and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class for mistakes in the user's input, arguments or files."""


class BadImageError(UserError):
    """An image file (or bytes) that cannot be used: missing, empty, corrupt, too large."""


class BadTextError(UserError):
    """A text input that cannot be embedded, e.g. an empty string."""


class BadInputError(UserError):
    """An input of an unsupported type or shape."""


class ModelFolderError(UserError):
    """A model name or folder that does not hold a usable magic-mm model."""


class CompressionSpecError(UserError):
    """A compression spec that cannot be parsed or is not supported by the backbone."""
