"""The one exception type for mistakes a user can fix; the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """Bad input: a missing path, a model without attention, empty text, an over-long sequence, ..."""


class NoAttentionError(UserError):
    """The model has no attention attnkit can reach."""
