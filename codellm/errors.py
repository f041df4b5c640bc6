"""The one exception type that reaches users: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input or environment, explained in words a user can act on (name the field and the limit)."""
