"""Errors a user can cause and fix."""


class UserError(Exception):
    """An error the user can fix; the CLI prints its message on one line and exits non-zero."""


class PagesExhausted(UserError):
    """A request needs more KV pages than the pool has free."""
