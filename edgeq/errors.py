"""Errors the CLI turns into one line on stderr and an exit code (no traceback without --debug)."""


class EdgeqError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""

    exit_code = 1


class UsageError(EdgeqError):
    """Bad options or arguments."""

    exit_code = 2


class ValidationFailed(EdgeqError):
    """The model was produced or checked, but a parity threshold was not met."""

    exit_code = 1
