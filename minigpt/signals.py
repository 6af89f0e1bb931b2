"""SIGINT (Ctrl-C) and SIGTERM, for every command: a flag that the work polls.

A handler that raises lands wherever Python happens to be: inside a library's
import (which then fails with its own ImportError), a finalizer, a progress bar's
constructor. So, while `handled()` is in force (the command line's whole life;
`train` as a library call), a signal only sets one process-wide flag, and the code
stops at points where stopping is safe:

- `check()` raises `Interrupted` (SIGINT) or `Terminated` (SIGTERM) if the flag is
  set. The long loops call it: each chunk that prepare reads or encodes, each
  evaluation batch, each generated token, each batch inspect-heads measures head
  importance on, each chunk a download reads, between the phases of a command. The `finally` blocks on the way out (and
  atomic.py's temporary folders) remove what was half made.
- `pending()` only reads the flag: the trainer saves its state first, then stops.
- `interruptible()` is for waiting (a prompt read from the terminal, a hub download):
  inside it a signal raises at once, since nothing is half done while one waits.

A second signal more than `REPEAT_S` after the first raises at once, wherever Python
is: the user who presses Ctrl-C again wants out now. (torchrun forwards the signal
that the terminal already sent every process, so a repeat within REPEAT_S is the
same request and only sets the flag.)

The command line catches `Stopped`, says one word ("interrupted", "terminated") and
exits with the shell's code for the signal (`EXIT_CODES`). Handlers can only be set
from the main thread; elsewhere (a notebook's worker) the flag is never set.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""The code a shell reports for a process stopped by each signal (128 + its number)."""

T = TypeVar("T")

REPEAT_S = 1.0
"""A second signal this long after the first stops the command at once."""


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
    """Ctrl-C (SIGINT)."""

    signum = signal.SIGINT


class Terminated(Stopped):
    """SIGTERM: the command exits with 143, as a process killed by SIGTERM does, after
    its `finally` blocks have cleaned up."""

    signum = signal.SIGTERM


_RAISED = {signal.SIGINT: Interrupted, signal.SIGTERM: Terminated}


class _Flag:
    """The one flag of the process, and what the handler needs to know."""

    def __init__(self) -> None:
        self.signum = 0
        self.first_at = 0.0
        self.waiting = 0
        """How many `interruptible()` blocks are open: a signal then raises at once."""
        self.installed = 0
        """How many `handled()` blocks are open."""
        self.previous: dict[int, object] = {}

    def handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self.first_at = signum, now
        elif now - self.first_at > REPEAT_S:
            raise _RAISED[signum]()
        if self.waiting:
            raise _RAISED[self.signum]()


_FLAG = _Flag()


def pending() -> int:
    """The signal that asked this process to stop (SIGINT or SIGTERM), or 0."""
    return _FLAG.signum


def check() -> None:
    """Raise `Interrupted` or `Terminated` if a signal asked the process to stop."""
    if _FLAG.signum:
        raise _RAISED[_FLAG.signum]()


def polled(items: Iterable[T]) -> Iterator[T]:
    """`items`, with `check()` before each: a loop over them stops between two."""
    for item in items:
        check()
        yield item


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While inside, a signal raises at once (for waits: a read, a download). Raises at
    once on entry if a signal came before."""
    check()
    _FLAG.waiting += 1
    try:
        yield
    finally:
        _FLAG.waiting -= 1


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """From now on, for the rest of the process, SIGINT and SIGTERM set the flag (the
    command line calls this first: its process ends with the command, and a signal
    while Python shuts down must not kill it half-way through its exit)."""
    if _in_main_thread():
        _FLAG.installed += 1  # for good: a `handled()` inside it changes nothing
        _set_handlers()


def _set_handlers() -> None:
    for signum in EXIT_CODES:
        signal.signal(signum, _FLAG.handle)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM set the flag (for a library call such as
    `train.train`); on leaving the outermost block, the handlers that were there come
    back and the flag is cleared, so that the next call starts afresh."""
    if not _in_main_thread():
        yield
        return
    if _FLAG.installed == 0:
        _FLAG.previous = {signum: signal.getsignal(signum) for signum in EXIT_CODES}
        _FLAG.signum = 0
        _set_handlers()
    _FLAG.installed += 1
    try:
        yield
    finally:
        _FLAG.installed -= 1
        if _FLAG.installed == 0:
            for signum, handler in _FLAG.previous.items():
                signal.signal(signum, handler)
            _FLAG.signum = 0


def exit_quietly(code: int) -> None:
    """Exit with `code` after a signal. A second signal raises wherever Python is,
    possibly inside a library's constructor (a progress bar half built): that object's
    finalizer then fails as the process ends, and Python would print its traceback.
    The user asked us to stop; such noise from the way out is not theirs."""
    sys.unraisablehook = lambda unraisable: None
    sys.exit(code)
