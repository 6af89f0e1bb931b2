"""Learning a byte-level BPE's merges with rustbpe (tokenizer.py's `BPETokenizer.train`).

It is more than one call for two reasons, each handled here:

- memory: rustbpe counts its texts in parallel, a batch at a time. Texts are fed as
  ~64 KB chunks cut after a newline (`line_chunks`), BPE_TRAIN_BUFFER of them at once,
  so a huge document is never held whole (prepare.py's `bpe_sample` feeds it so too).
- signals: rustbpe calls back into Python while it trains, where a Ctrl-C must not
  land (`_SignalsDeferred`); the handlers run between chunks instead.

A corpus can run out of pairs to merge before the vocabulary is full: `CountedTexts`
counts the sample for the refusal when nothing could be merged, and `bpe_shortfall`
words the warning when some, but fewer than asked, were.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator

from minigpt.signals import check

BPE_TRAIN_BUFFER = 512
"""Texts rustbpe holds at once while it counts (its default, 8192 texts of up to 64 KB,
could hold half a GB): counts are summed over batches, so the merges are the same."""


def learn_merges(
    texts: Iterable[str], vocab_size: int, pattern: str
) -> tuple[dict[bytes, int], str]:
    """rustbpe's byte-level BPE of `vocab_size` tokens (the 256 bytes and the merges)
    learned from `texts` split with `pattern`: (mergeable ranks, the split it used)."""
    import rustbpe

    trainer = rustbpe.Tokenizer()
    with _SignalsDeferred() as signals:
        trainer.train_from_iterator(
            _chunks(texts, signals), vocab_size, buffer_size=BPE_TRAIN_BUFFER, pattern=pattern
        )
    return dict(trainer.get_mergeable_ranks()), trainer.get_pattern()


class CountedTexts:
    """Texts passed through as they are, counting their characters on the way."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars = texts, 0

    def __iter__(self):
        for text in self.texts:
            self.chars += len(text)
            yield text


def bpe_shortfall(asked: int, learned: int) -> str | None:
    """The warning for a BPE that learned fewer tokens than asked (a corpus, or a sample
    of one, runs out of pairs to merge), or None where it learned them all."""
    if learned >= asked:
        return None
    return (
        f"bpe learned {learned:,} of the {asked:,} tokens asked: "
        "its sample of the corpus has no more pairs to merge"
    )


def line_chunks(pieces: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """One text (whole, or in pieces) cut after the first newline at or past every `size`
    characters: ~64 KB texts that rustbpe counts in parallel."""
    buffer, start = "", 0
    for piece in pieces:
        buffer, start = buffer[start:] + piece, 0
        while (end := buffer.find("\n", start + size)) != -1:
            yield buffer[start : end + 1]
            start = end + 1
    if start < len(buffer):
        yield buffer[start:]


def _chunks(texts: Iterable[str], signals: _SignalsDeferred) -> Iterator[str]:
    for text in texts:
        for chunk in line_chunks((text,)):
            signals.raise_pending()  # a Ctrl-C while reading stops here, between chunks
            check()
            yield chunk


class _SignalsDeferred:
    """While rustbpe trains, SIGINT and SIGTERM are recorded, and their own handlers run
    between chunks of the iterator or when training returns.

    Why: rustbpe calls back into Python outside our iterator too (pyo3-log looks up a
    Python logger on its first message). A handler that raises inside such a call is
    printed and left pending by the Rust side, and the next Python call then fails with
    "SystemError: ... returned a result with an exception set": a traceback and exit
    code 1 instead of a clean stop. Signals that the process ignores or leaves at the
    default action are not touched; neither is anything off the main thread, which
    cannot set handlers.
    """

    CAUGHT = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _SignalsDeferred:
        if threading.current_thread() is threading.main_thread():
            for signum in self.CAUGHT:
                handler = signal.getsignal(signum)
                if callable(handler):
                    self.previous[signum] = handler
                    signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.pending.append(signum)

    def raise_pending(self) -> None:
        """Run the first recorded signal's handler now (ours raise, to stop cleanly)."""
        if self.pending:
            signum = self.pending.pop(0)
            self.previous[signum](signum, None)

    def __exit__(self, exc_type, exc, traceback) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if exc_type is None:
            self.raise_pending()
