"""SIGINT (Ctrl-C) and SIGTERM, for every command: how a signal stops one cleanly.

A signal lands wherever Python happens to be, so there are two ways to stop:

- `raising`: the signal raises `Interrupted` (SIGINT) or `Terminated` (SIGTERM)
  right there, and the `finally` blocks on the way out remove what was half made.
  The command line raises on SIGINT for every command; the trainer also raises on
  SIGTERM while it sets up (preparing data, building the model). The command line
  catches either and exits with the shell's code for the signal (`EXIT_CODES`).
- `SignalFlag`: the signal only sets a flag that a loop polls between steps, so the
  trainer can save its state first and then stop.

Handlers can only be set from the main thread; called from another one (a
notebook's worker), these leave the handlers alone.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""The code a shell reports for a process stopped by each signal (128 + its number)."""


class Stopped(BaseException):
    """A signal asked the command to stop. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` swallows it; and our own, not KeyboardInterrupt: typer
    and click would each turn a KeyboardInterrupt into their own exit (1 with
    "Aborted!", or a silent 130)."""

    signum: signal.Signals

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.signum]


class Interrupted(Stopped):
    """Ctrl-C (SIGINT), raised by our handler."""

    signum = signal.SIGINT


class Terminated(Stopped):
    """SIGTERM, raised by our handler: the command exits with 143, as a process killed
    by SIGTERM does, after its `finally` blocks have cleaned up."""

    signum = signal.SIGTERM


_RAISED = {signal.SIGINT: Interrupted, signal.SIGTERM: Terminated}


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def raising(*signums: signal.Signals) -> Iterator[None]:
    """While inside, each of `signums` raises its `Stopped` exception; the handlers
    that were there before come back on the way out."""
    if not _in_main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        raise _RAISED[signum]()

    previous = {signum: signal.signal(signum, handle) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class SignalFlag:
    """While inside, SIGINT and SIGTERM only set `signum`, which a loop checks after
    each step, so that it can save before it stops."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalFlag:
        if _in_main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def exit_quietly(code: int) -> None:
    """Exit with `code` after a signal. The signal raised wherever Python was, possibly
    inside a library's constructor (a progress bar half built): that object's
    finalizer then fails as the process ends, and Python would print its traceback.
    The user asked us to stop; such noise from the way out is not theirs."""
    sys.unraisablehook = lambda unraisable: None
    sys.exit(code)
