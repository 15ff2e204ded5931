"""Errors the CLI turns into one line on stderr and an exit code (no traceback without --debug).

Interrupts too: :func:`sigterm_interrupts` makes SIGTERM raise ``KeyboardInterrupt`` like Ctrl-C
(so staged output is discarded the same way), and :func:`interrupt_exit_code` tells them apart
(130 for Ctrl-C, 143 for SIGTERM).  The CLI and ``edgeq.pipeline.output.staged_output`` both use it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_SIGTERM = "SIGTERM"  # the KeyboardInterrupt's message when SIGTERM raised it


class EdgeqError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""

    exit_code = 1


class UsageError(EdgeqError):
    """Bad options or arguments."""

    exit_code = 2


class ValidationFailed(EdgeqError):
    """The model was produced or checked, but a parity threshold was not met."""

    exit_code = 1


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(_SIGTERM)


@contextmanager
def sigterm_interrupts(sigint: bool = False) -> Iterator[None]:
    """While open, SIGTERM raises ``KeyboardInterrupt("SIGTERM")``; the previous handler is restored after.

    With ``sigint``, SIGINT is also set to raise ``KeyboardInterrupt`` (and left so): a shell starts
    background jobs with SIGINT ignored, and Python then never raises it, but an interrupt must always
    discard staged output cleanly.  Outside the main thread signals cannot be handled: nothing changes.
    """
    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        if sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """143 when SIGTERM raised ``e`` (see :func:`sigterm_interrupts`), else 130 (Ctrl-C)."""
    return 143 if _SIGTERM in str(e) else 130
