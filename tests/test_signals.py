"""Signals in-process: the flag a loop polls, the exceptions that stop a command, and
the exit codes. The signals sent to whole commands are tested as processes."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from minigpt import signals


def test_the_flag_records_the_signal_and_restores_the_handlers():
    before = {signum: signal.getsignal(signum) for signum in signals.EXIT_CODES}
    with signals.SignalFlag() as flag:
        assert flag.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)  # the process goes on: only the flag is set
        assert flag.signum == signal.SIGTERM
    assert {signum: signal.getsignal(signum) for signum in signals.EXIT_CODES} == before


@pytest.mark.parametrize(
    ("signum", "raised", "code"),
    [(signal.SIGINT, signals.Interrupted, 130), (signal.SIGTERM, signals.Terminated, 143)],
)
def test_raising_turns_a_signal_into_its_exception(signum, raised, code):
    before = signal.getsignal(signum)
    with pytest.raises(raised) as info:
        with signals.raising(signum):
            os.kill(os.getpid(), signum)  # the handler runs before the next line
            pytest.fail("the signal did not raise")
    assert info.value.exit_code == code == signals.EXIT_CODES[signum]
    assert isinstance(info.value, signals.Stopped) and not isinstance(info.value, Exception)
    assert signal.getsignal(signum) is before


def test_exit_quietly_exits_with_the_code_and_silences_finalizers(monkeypatch, capsys):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored afterwards
    with pytest.raises(SystemExit) as info:
        signals.exit_quietly(143)
    assert info.value.code == 143
    sys.unraisablehook(object())  # what a half-built object's failing finalizer reports
    assert capsys.readouterr() == ("", "")
