"""Signals in-process: the flag the work polls, the waits that raise at once, the
exceptions that stop a command, and the exit codes. The signals sent to whole
commands are tested as processes (tests/e2e/test_signal_cases.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from minigpt import signals

SIGNALS = [(signal.SIGINT, signals.Interrupted, 130), (signal.SIGTERM, signals.Terminated, 143)]


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # the handler runs before the next line


def test_a_signal_only_sets_the_flag_and_leaving_restores_the_handlers():
    before = {signum: signal.getsignal(signum) for signum in signals.EXIT_CODES}
    with signals.handled():
        assert signals.pending() == 0
        send(signal.SIGTERM)  # the process goes on: only the flag is set
        assert signals.pending() == signal.SIGTERM
        with signals.handled():  # a library call inside a command keeps the command's flag
            assert signals.pending() == signal.SIGTERM
        assert signals.pending() == signal.SIGTERM
    assert {signum: signal.getsignal(signum) for signum in signals.EXIT_CODES} == before
    assert signals.pending() == 0  # the next call starts afresh


@pytest.mark.parametrize(("signum", "raised", "code"), SIGNALS)
def test_check_raises_the_signals_exception_with_its_exit_code(signum, raised, code):
    with signals.handled():
        signals.check()  # nothing yet
        send(signum)
        with pytest.raises(raised) as info:
            signals.check()
    assert info.value.exit_code == code == signals.EXIT_CODES[signum]
    assert isinstance(info.value, signals.Stopped) and not isinstance(info.value, Exception)


def test_polled_stops_between_two_items():
    seen = []
    with signals.handled(), pytest.raises(signals.Terminated):
        for item in signals.polled(range(5)):
            seen.append(item)
            if item == 2:
                send(signal.SIGTERM)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize(("signum", "raised", "code"), SIGNALS)
def test_a_signal_while_waiting_raises_at_once(signum, raised, code):
    with signals.handled():
        with pytest.raises(raised):
            with signals.interruptible():
                send(signum)
                pytest.fail("the signal did not raise inside interruptible()")
        with pytest.raises(raised):  # already stopping: a new wait does not begin
            with signals.interruptible():
                pytest.fail("interruptible() was entered with the flag set")


def test_a_quick_repeat_only_sets_the_flag_a_later_one_raises_at_once(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    with signals.handled():
        send(signal.SIGINT)
        clock[0] += signals.REPEAT_S / 2
        send(signal.SIGINT)  # the same Ctrl-C forwarded by torchrun: no raise
        assert signals.pending() == signal.SIGINT
        clock[0] += signals.REPEAT_S
        with pytest.raises(signals.Terminated):
            send(signal.SIGTERM)  # the user insists: stop now
            pytest.fail("the second signal did not raise")


def test_install_keeps_the_flag_for_the_rest_of_the_process():
    # in a child: install() is for good, which would outlive this test
    script = """
import os, signal
from minigpt import signals
signals.install()
os.kill(os.getpid(), signal.SIGTERM)
with signals.handled():
    pass
assert signals.pending() == signal.SIGTERM, signals.pending()
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_exit_quietly_exits_with_the_code_and_silences_finalizers(monkeypatch, capsys):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored afterwards
    with pytest.raises(SystemExit) as info:
        signals.exit_quietly(143)
    assert info.value.code == 143
    sys.unraisablehook(object())  # what a half-built object's failing finalizer reports
    assert capsys.readouterr() == ("", "")
