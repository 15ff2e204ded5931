"""Atomic output: nothing appears at the final path unless the whole write succeeded.

Files are written into a hidden temporary directory beside the target and moved into place with
``os.replace`` (atomic on one filesystem) only at ``commit()``; on any error, Ctrl-C or SIGTERM
the temporary directory is removed and the target is left as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgeq.errors import EdgeqError, UsageError, sigterm_interrupts


def check_output_path(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse outputs that would overwrite an input, land in a missing dir, or clobber a file."""
    out_res = out.resolve()
    for p in inputs:
        p_res = p.resolve()
        if out_res == p_res or p_res in out_res.parents:
            raise UsageError(f"output {out} is inside or equal to input {p}; choose another output path")
    parent = out_res.parent
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory {parent} is not writable; choose another output path")
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; give a file name ending in .onnx")
    for existing in (out, out.with_suffix(".json"), out.with_name(out.name + ".data")):
        if existing.exists() and not force:
            raise UsageError(f"output {existing} already exists; pass --force to overwrite it")


class StagedOutput:
    """A temporary directory whose files are moved to ``targets`` on ``commit``."""

    def __init__(self, parent: Path):
        self.dir = Path(tempfile.mkdtemp(prefix=".edgeq-tmp-", dir=parent))
        self.targets: dict[Path, Path] = {}

    def path(self, final: Path) -> Path:
        staged = self.dir / final.name
        self.targets[staged] = final
        return staged

    def commit(self) -> None:
        """Move every staged file into place; Ctrl-C/SIGTERM wait until it is done (or undone)."""
        moved: list[Path] = []
        with _signals_deferred() as caught:
            try:
                # data files first, the .onnx (what users open) last
                for staged, final in sorted(self.targets.items(), key=lambda kv: kv[1].suffix == ".onnx"):
                    if staged.exists():
                        if staged.is_dir() and final.is_dir():  # a staged sub-folder replaces the old one
                            shutil.rmtree(final)
                        os.replace(staged, final)
                        moved.append(final)
                if caught:  # Ctrl-C/SIGTERM arrived meanwhile: the run was interrupted
                    raise KeyboardInterrupt("during commit")
            except BaseException:
                for final in moved:  # all or nothing
                    if final.is_dir():
                        shutil.rmtree(final, ignore_errors=True)
                    else:
                        final.unlink(missing_ok=True)
                raise

    def discard(self) -> None:
        with _signals_deferred():
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def _signals_deferred():
    """Defer SIGINT/SIGTERM (delivered on exit) so a move or clean-up is never cut in half.

    Yields the list of signals caught meanwhile. The deferral is a Python handler that records the
    signal, not a blocked signal mask: a mask is per thread, so while it blocks the main thread the
    kernel hands a process-wide SIGTERM to one of the PyTorch / ONNX Runtime pool threads, and the
    main thread then raises KeyboardInterrupt whenever that thread gets to run: possibly after the
    commit (files left in place) or in the middle of the clean-up (``.edgeq-tmp-*`` left behind).
    Python runs signal handlers in the main thread between bytecodes, whichever thread caught them.
    """
    caught: list[int] = []

    def record(signum, frame):
        caught.append(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, record)
    except ValueError:  # not the main thread: handlers (and interrupts) belong to the main thread
        pass
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])  # delivered now, to the handler that was in place before


@contextmanager
def staged_output(parent: Path):
    """Yield a :class:`StagedOutput`; SIGTERM is treated like Ctrl-C while it is open."""
    with sigterm_interrupts():
        stage = None
        try:
            with _signals_deferred():  # an interrupt right after mkdtemp must not leak the directory
                stage = StagedOutput(parent)
            yield stage
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise EdgeqError(f"no space left on the device while writing to {parent}; "
                                 "free space and retry") from None
            raise
        finally:
            if stage is not None:
                stage.discard()
