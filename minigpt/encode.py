"""Encoding a corpus into token ids: in order, on threads, in bounded memory.

`split_texts` reads a corpus's documents as (split, text) pieces: train, then the
last VAL_FRACTION as validation (`split_point`), a huge document cut where its
tokenizer allows (`Tokenizer.cut_point`) so its pieces encode to the ids of the
whole. `encode_in_order` encodes those pieces on several threads (tiktoken releases
the GIL, so threads run in parallel) and hands the ids back in order, holding only
a few tasks in memory. prepare.py writes them into token files; `tokenize_corpus`
keeps them in memory (what `minigpt eval --data` scores). `bpe_sample` reads the start
of the training split as the texts a BPE learns its merges from.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from minigpt.bpe_training import line_chunks
from minigpt.console import progress_bar
from minigpt.corpus import ContentHash, Corpus, Document, OnBytes
from minigpt.errors import MinigptError
from minigpt.signals import check, polled
from minigpt.tokenizer import Tokenizer

VAL_FRACTION = 0.1
TRAIN, VAL = 0, 1
TASK_CHARS = 1 << 20
"""Text per tokenising task: enough that a thread's work dwarfs handing it over, little
enough that the tasks in flight (two per worker) hold a few MB."""
CUT_CHARS = 1 << 20
"""A document longer than this is tokenised a piece of about this size at a time, cut
where its tokenizer allows (`Tokenizer.cut_point`) so the ids are those of the whole."""
SHOW_PROGRESS_BYTES = 5_000_000
"""Progress bars appear only for sources at least this big, where the wait is noticeable."""


def default_workers() -> int:
    """The cores this process may run on (its affinity mask, where the OS keeps one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_workers(workers: int | None) -> int:
    """The threads to tokenise on: `workers`, or every core for None or 0."""
    if isinstance(workers, bool) or not isinstance(workers, int | None) or (workers or 0) < 0:
        raise MinigptError(
            f"workers must be a whole number, at least 1 (or 0 for every core), not {workers!r}",
            hint="e.g. workers 4; the default uses every core",
            param="workers",
        )
    return workers or default_workers()


class ByteProgress:
    """A progress bar over the bytes of a source, with throughput and time left. Calls
    are gathered a megabyte at a time, so a corpus of tiny documents is not slowed by it."""

    def __init__(self, total: int, desc: str, show: bool):
        show = show and total >= SHOW_PROGRESS_BYTES
        self.bar = progress_bar(total=total, desc=desc, show=show, in_bytes=True)
        self.pending = 0

    def __call__(self, n_bytes: int) -> None:
        self.pending += n_bytes
        if self.pending >= 1 << 20:
            self.bar.update(self.pending)
            self.pending = 0

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.update(self.pending)
        self.bar.close()


def hashed_pieces(doc: Document, hasher: ContentHash) -> Iterator[tuple[str, int]]:
    """(text, its UTF-8 bytes) of a non-empty document, a piece at a time, fed to the hash."""
    check()  # a signal stops every pass over the corpus between two pieces
    if isinstance(doc, str):
        if doc:
            raw = doc.encode("utf-8")
            hasher.begin(len(raw))
            hasher.update(raw)
            yield doc, len(raw)
        return
    hasher.begin(doc.n_bytes)
    for piece in polled(doc.pieces):
        raw = piece.encode("utf-8")
        hasher.update(raw)
        yield piece, len(raw)


# ---------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class Split:
    """Where validation begins: at document `val_start`, after its first `cut`
    characters. One document is cut inside (val_start 0); several, between documents."""

    documents: int
    val_start: int
    cut: int = 0

    @property
    def train_documents(self) -> int:
        return 1 if self.documents == 1 else self.val_start

    @property
    def val_documents(self) -> int:
        return 1 if self.documents == 1 else self.documents - self.val_start


def split_point(doc_chars: Sequence[int], val_fraction: float = VAL_FRACTION) -> Split:
    """The last `val_fraction` of the corpus as validation.

    One document: cut at that fraction of its characters. Several: whole documents
    from the end until they hold at least that fraction; train keeps at least one.
    """
    if len(doc_chars) == 1:
        return Split(1, 0, int(doc_chars[0] * (1 - val_fraction)))
    total = sum(doc_chars)
    first_val, val_chars = len(doc_chars), 0
    while first_val > 1 and val_chars < val_fraction * total:
        first_val -= 1
        val_chars += doc_chars[first_val]
    return Split(len(doc_chars), first_val)


# ---------------------------------------------------------------------------- texts, then ids

Cutter = Callable[[str, int], "int | None"]
"""`Tokenizer.cut_point`: where a long text may be cut for tokenising a piece at a time."""


def split_texts(
    corpus: Corpus,
    split: Split,
    cut_point: Cutter | None,
    end_with_newline: bool,
    hasher: ContentHash,
    on_bytes: OnBytes,
) -> Iterator[tuple[int, str, bool]]:
    """(split, text, starts_document) for the whole corpus, in order.

    Each non-empty document comes whole, or (a long one) in pieces of about CUT_CHARS
    cut at `cut_point`; with no cut_point, a long one comes in the pieces it was read
    in, for a reader that joins them itself. The document the split falls in comes as
    a train part and a val part. Everything read is fed to `hasher`.
    """
    index = 0
    for doc in corpus.documents(on_bytes):
        if isinstance(doc, str) and not doc:
            continue
        pieces = (piece for piece, _ in hashed_pieces(doc, hasher))
        if end_with_newline:
            pieces = _ending_in_newline(pieces)
        if index == split.val_start and split.cut:
            tagged = _cut_at(pieces, split.cut)
        else:
            where = TRAIN if index < split.val_start else VAL
            tagged = ((where, piece) for piece in pieces)
        for part, group in itertools.groupby(tagged, key=lambda tagged_piece: tagged_piece[0]):
            texts = (text for _, text in group if text)
            starts = True
            for text in texts if cut_point is None else _in_pieces(texts, cut_point):
                yield part, text, starts
                starts = False
        index += 1


def _ending_in_newline(pieces: Iterator[str]) -> Iterator[str]:
    last = ""
    for piece in pieces:
        last = piece[-1:] or last
        yield piece
    if last != "\n":
        yield "\n"


def _cut_at(pieces: Iterator[str], cut: int) -> Iterator[tuple[int, str]]:
    """(TRAIN, text) for the first `cut` characters of the pieces, (VAL, text) after."""
    seen = 0
    for piece in pieces:
        if seen >= cut:
            yield VAL, piece
        elif seen + len(piece) <= cut:
            yield TRAIN, piece
        else:
            yield TRAIN, piece[: cut - seen]
            yield VAL, piece[cut - seen :]
        seen += len(piece)


def _in_pieces(texts: Iterable[str], cut_point: Cutter) -> Iterator[str]:
    """The texts joined, then cut into pieces of about CUT_CHARS where `cut_point`
    allows (a document with no such place stays whole); nothing empty."""
    buffer = ""
    for text in texts:
        buffer = buffer + text if buffer else text
        while len(buffer) > CUT_CHARS:
            at = cut_point(buffer, CUT_CHARS)
            if at is None:
                break
            yield buffer[:at]
            buffer = buffer[at:]
    if buffer:
        yield buffer


@dataclass
class EncodedTask:
    """One task's ids, for one split, and the characters they came from."""

    split: int
    ids: np.ndarray
    n_chars: int


def _tasks(
    texts: Iterable[tuple[int, str, bool]], separated: bool
) -> Iterator[tuple[int, list[tuple[bool, str]], int]]:
    """The texts grouped into tasks of about TASK_CHARS of one split: (split, [(separator
    before it?, text)], characters). A separator goes before every document of a split
    but its first."""
    started = [False, False]
    items: list[tuple[bool, str]] = []
    current, n_chars = TRAIN, 0
    for part, text, starts in texts:
        if items and (part != current or n_chars >= TASK_CHARS):
            yield current, items, n_chars
            items, n_chars = [], 0
        current = part
        items.append((separated and starts and started[part], text))
        started[part] = True
        n_chars += len(text)
    if items:
        yield current, items, n_chars


def _encode_task(tok: Tokenizer, split: int, items: list[tuple[bool, str]], n_chars: int):
    eot = np.array([tok.eot_id or 0], dtype=np.uint32)  # tiktoken's ids are uint32 too
    parts = []
    for separator, text in items:
        if separator:
            parts.append(eot)
        parts.append(tok.encode_array(text))
    return EncodedTask(split, np.concatenate(parts), n_chars)


def encode_in_order(
    tok: Tokenizer, texts: Iterable[tuple[int, str, bool]], workers: int
) -> Iterator[EncodedTask]:
    """The texts' ids, in order, encoded on `workers` threads: tiktoken releases the GIL
    while it encodes, so the threads run at once (each with its own copy of the
    tokenizer) while this one reads ahead. At most two tasks per worker are in flight,
    so memory stays a few MB."""
    tasks = _tasks(texts, separated=tok.eot_id is not None)
    own = threading.local()

    def encode(*task) -> EncodedTask:
        if not hasattr(own, "tok"):
            own.tok = tok.for_thread()
        return _encode_task(own.tok, *task)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
    pending: deque = deque()
    try:
        for task in polled(tasks):
            pending.append(pool.submit(encode, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def bpe_sample(
    corpus: Corpus, split: Split, sample_chars: int, on_bytes: OnBytes = lambda n: None
) -> Iterator[str]:
    """The first `sample_chars` characters of the training split, as the texts BPE
    training counts (`line_chunks` of each document, as `BPETokenizer.train` cuts any
    text: a corpus smaller than the sample learns the merges of the whole)."""
    left = sample_chars
    texts = split_texts(corpus, split, None, False, ContentHash(), on_bytes)
    with closing(texts):
        for part, document in _documents_of(texts):
            if part != TRAIN or left <= 0:
                return
            for chunk in line_chunks(document):
                yield chunk[:left]
                left -= len(chunk)
                if left <= 0:
                    return


def _documents_of(texts: Iterator[tuple[int, str, bool]]):
    """(split, that document's texts) for each document part in `texts`."""
    for (part, _), group in itertools.groupby(texts, key=_DocumentKey()):
        yield part, (text for _, text, _ in group)


class _DocumentKey:
    """A groupby key that changes at every document part's start."""

    def __init__(self):
        self.number = 0

    def __call__(self, item: tuple[int, str, bool]) -> tuple[int, int]:
        part, _, starts = item
        self.number += starts
        return part, self.number


def tokenize_corpus(
    tok: Tokenizer, corpus: Corpus, workers: int | None = None, progress: bool = True
) -> np.ndarray:
    """All of a corpus's ids in memory, documents joined by the end-of-text id where the
    tokenizer has one (no split, no added newline): what `minigpt eval --data` scores."""
    everything = Split(documents=0, val_start=sys.maxsize)
    with ByteProgress(corpus.n_bytes, "tokenizing", progress) as bar:
        texts = split_texts(corpus, everything, tok.cut_point, False, ContentHash(), bar)
        parts = [task.ids for task in encode_in_order(tok, texts, check_workers(workers))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def tokenize_documents(
    tok: Tokenizer, documents: Iterable[str], progress: bool = False, workers: int | None = None
) -> np.ndarray:
    """`tokenize_corpus` of documents held in memory."""
    texts = list(documents)
    corpus = Corpus("documents", "documents", "builtin", texts=texts, n_bytes=sum(map(len, texts)))
    return tokenize_corpus(tok, corpus, workers, progress)
