"""edgeq.errors.sigterm_interrupts / interrupt_exit_code: the one SIGTERM handler (CLI and staged output)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from edgeq.errors import interrupt_exit_code, sigterm_interrupts


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_sigterm_raises_keyboard_interrupt_while_open(restore_signals):
    def previous(signum, frame):
        pass

    signal.signal(signal.SIGTERM, previous)
    with pytest.raises(KeyboardInterrupt) as e, sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler's exception ends the wait
    assert interrupt_exit_code(e.value) == 143
    assert signal.getsignal(signal.SIGTERM) is previous  # restored, also after the interrupt
    with sigterm_interrupts(), sigterm_interrupts():  # nested (CLI around staged output)
        pass
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ctrl_c_is_130_and_sigint_is_rearmed_on_request(restore_signals):
    assert interrupt_exit_code(KeyboardInterrupt()) == 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts background jobs
    with sigterm_interrupts():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    with sigterm_interrupts(sigint=True):
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert interrupt_exit_code(e.value) == 130


def test_outside_the_main_thread_nothing_changes(restore_signals):
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def run():
        with sigterm_interrupts(sigint=True):
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before
