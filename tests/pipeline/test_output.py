"""edgeq.pipeline.output: all-or-nothing commit and clean-up under Ctrl-C / SIGTERM.

A signal may be caught by any thread of the process (PyTorch and ONNX Runtime keep thread pools);
CPython then runs the Python-level handler in the main thread at its next bytecode.  So "deferred"
must mean: while a commit or clean-up runs, the Python-level SIGINT/SIGTERM handlers do not raise.
These tests call the installed handler the way CPython would, at the worst moment, and also send
the real signal.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from edgeq.pipeline import output
from edgeq.pipeline.output import _signals_deferred, staged_output


def _deliver(sig: int) -> None:
    """What the main thread does when some thread caught ``sig``: run the Python-level handler."""
    handler = signal.getsignal(sig)
    assert callable(handler), handler
    handler(sig, None)


def _stage_two(stage, target):
    for name in ("out.json", "out.onnx"):
        stage.path(target / name).write_text(name)


@pytest.mark.parametrize("how", ["handler", "kill"])
def test_sigterm_during_commit_leaves_nothing(tmp_path, monkeypatch, how):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # out.json is in place already
            _deliver(signal.SIGTERM) if how == "handler" else os.kill(os.getpid(), signal.SIGTERM)
        return real(src, dst)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with staged_output(tmp_path) as stage:
            _stage_two(stage, tmp_path)
            monkeypatch.setattr(output.os, "replace", replace)
            stage.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # rolled back, staging directory removed
    assert len(calls) == 2 and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("how", ["handler", "kill"])
def test_sigterm_during_cleanup_does_not_cut_it_short(tmp_path, monkeypatch, how):
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        _deliver(signal.SIGTERM) if how == "handler" else os.kill(os.getpid(), signal.SIGTERM)
        return real(path, *a, **k)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with staged_output(tmp_path) as stage:
            _stage_two(stage, tmp_path)
            monkeypatch.setattr(output.shutil, "rmtree", rmtree)
    assert list(tmp_path.iterdir()) == []  # the whole staging directory went
    assert signal.getsignal(signal.SIGTERM) is before  # restored although the clean-up raised


def test_commit_without_signal_moves_everything(tmp_path):
    with staged_output(tmp_path) as stage:
        _stage_two(stage, tmp_path)
        stage.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.onnx"]


def test_deferred_sigint_is_raised_once_the_block_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred() as caught:
            os.kill(os.getpid(), signal.SIGINT)
            _deliver(signal.SIGINT)
            done.append(True)  # not cut short
            assert caught == [signal.SIGINT, signal.SIGINT]
    assert done and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _old_files(target):
    for name in ("out.json", "out.onnx"):
        (target / name).write_text(f"old {name}")


def test_overwrite_replaces_only_at_commit(tmp_path):
    _old_files(tmp_path)
    with staged_output(tmp_path) as stage:
        _stage_two(stage, tmp_path)
        assert (tmp_path / "out.onnx").read_text() == "old out.onnx"  # staged, not yet replaced
        stage.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.onnx"]
    assert (tmp_path / "out.onnx").read_text() == "out.onnx" and (tmp_path / "out.json").read_text() == "out.json"


def test_failed_commit_puts_the_old_files_back(tmp_path, monkeypatch):
    """--force and a commit that fails half-way (disk full on the second move): the replaced .json returns."""
    import errno

    _old_files(tmp_path)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    with pytest.raises(output.EdgeqError, match="no space left on the device .*choose another output"):
        with staged_output(tmp_path) as stage:
            _stage_two(stage, tmp_path)
            monkeypatch.setattr(output.os, "replace", replace)
            stage.commit()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"out.json": "old out.json",
                                                                  "out.onnx": "old out.onnx"}


def test_without_overwrite_a_target_that_appeared_meanwhile_is_refused(tmp_path):
    with pytest.raises(output.EdgeqError, match=r"out\.json appeared while this convert ran.*pass --force"):
        with staged_output(tmp_path, overwrite=False) as stage:
            _stage_two(stage, tmp_path)
            (tmp_path / "out.json").write_text("the other convert's")  # it committed first
            stage.commit()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"out.json": "the other convert's"}


@pytest.mark.skipif(output.fcntl is None, reason="no flock on this platform")
def test_commit_holds_the_directory_lock(tmp_path, monkeypatch):
    """While one commit moves files, no other process can take the lock (and so cannot commit)."""
    real, blocked = os.replace, []

    def replace(src, dst):
        fd = os.open(tmp_path, os.O_RDONLY)  # another open file description: what another process would use
        try:
            output.fcntl.flock(fd, output.fcntl.LOCK_EX | output.fcntl.LOCK_NB)
            blocked.append(False)
        except BlockingIOError:
            blocked.append(True)
        finally:
            os.close(fd)
        return real(src, dst)

    with staged_output(tmp_path) as stage:
        _stage_two(stage, tmp_path)
        monkeypatch.setattr(output.os, "replace", replace)
        stage.commit()
    assert blocked == [True, True]
    fd = os.open(tmp_path, os.O_RDONLY)  # released afterwards
    output.fcntl.flock(fd, output.fcntl.LOCK_EX | output.fcntl.LOCK_NB)
    os.close(fd)
