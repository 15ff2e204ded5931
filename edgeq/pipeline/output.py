"""Atomic output: nothing appears at the final path unless the whole write succeeded.

Files are written into a hidden temporary directory beside the target and moved into place with
``os.replace`` (atomic on one filesystem) only at ``commit()``; on any error, Ctrl-C or SIGTERM
the temporary directory is removed and the target is left as it was.

Replacing (``--force``): a file already at a target is hard-linked into the staging directory
before the new one replaces it, and put back if the commit fails half-way, so the old files are
never deleted before the new ones are all in place.  Concurrent converts to the same path: the
commit holds an exclusive ``flock`` on the target directory, so two commits never interleave (the
``.onnx`` and its report always come from the same run), and without ``overwrite`` a target that
appeared meanwhile (another convert finished first) is refused in one line instead of replaced.
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

try:
    import fcntl
except ImportError:  # Windows: no flock; commits are then not serialised between processes
    fcntl = None


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
    """A temporary directory whose files are moved to ``targets`` on ``commit``.

    ``overwrite``: replace files already at the targets (else a target that exists at commit time,
    e.g. written meanwhile by another convert, is refused).
    """

    def __init__(self, parent: Path, overwrite: bool = True):
        self.parent = parent
        self.overwrite = overwrite
        self.dir = Path(tempfile.mkdtemp(prefix=".edgeq-tmp-", dir=parent))
        self.targets: dict[Path, Path] = {}

    def path(self, final: Path) -> Path:
        staged = self.dir / final.name
        self.targets[staged] = final
        return staged

    def commit(self) -> None:
        """Move every staged file into place; Ctrl-C/SIGTERM wait until it is done (or undone)."""
        moved: list[tuple[Path, Path | None]] = []  # (final, the old file it replaced, kept in the stage)
        with _signals_deferred() as caught, _locked(self.parent):
            try:
                clash = next((f for s, f in self.targets.items() if s.exists() and os.path.lexists(f)), None)
                if clash is not None and not self.overwrite:
                    raise EdgeqError(f"output {clash} appeared while this convert ran (another edgeq convert to the "
                                     "same path?); nothing written — choose another output or pass --force")
                # data files first, the .onnx (what users open) last
                for staged, final in sorted(self.targets.items(), key=lambda kv: kv[1].suffix == ".onnx"):
                    if staged.exists():
                        moved.append((final, self._keep(final)))  # before the move: undone if it fails
                        os.replace(staged, final)
                if caught:  # Ctrl-C/SIGTERM arrived meanwhile: the run was interrupted
                    raise KeyboardInterrupt("during commit")
            except BaseException:
                for final, old in reversed(moved):  # all or nothing: the old files come back
                    if final.is_dir() and not final.is_symlink():
                        shutil.rmtree(final, ignore_errors=True)
                    elif old is None:
                        final.unlink(missing_ok=True)
                    if old is not None:
                        os.replace(old, final)
                raise

    def _keep(self, final: Path) -> Path | None:
        """A second name, inside the stage, for what is now at ``final`` (None if nothing is).

        A file is hard-linked (it is replaced atomically by the move); a folder output's sub-folder is
        moved aside whole, since ``os.replace`` cannot replace a non-empty directory.
        """
        old = self.dir / f".old-{final.name}"
        if final.is_dir() and not final.is_symlink():
            os.replace(final, old)
            return old
        if not final.is_file():
            return None
        try:
            os.link(final, old)
        except OSError:  # no hard links on this filesystem
            shutil.copy2(final, old)
        return old

    def discard(self) -> None:
        with _signals_deferred():
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def _locked(directory: Path):
    """An exclusive flock on ``directory`` (released when the process dies, so never stale)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
def staged_output(parent: Path, overwrite: bool = True):
    """Yield a :class:`StagedOutput`; SIGTERM is treated like Ctrl-C while it is open."""
    with sigterm_interrupts():
        stage = None
        try:
            with _signals_deferred():  # an interrupt right after mkdtemp must not leak the directory
                stage = StagedOutput(parent, overwrite)
            yield stage
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
                raise EdgeqError(f"{what} while writing to {parent}; nothing written — free space or choose "
                                 "another output") from None
            raise
        finally:
            if stage is not None:
                stage.discard()
