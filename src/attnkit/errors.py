"""The one exception type for mistakes a user can fix; the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """Bad input: a missing path, a model without attention, empty text, an over-long sequence, ..."""


class NoAttentionError(UserError):
    """The model has no attention attnkit can reach."""


class MissingExtraError(UserError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it.

    A ``UserError`` (the CLI prints it as one line, exit code 2) and a ``ModuleNotFoundError``
    (``except ImportError`` in a user's code still catches it).
    """
