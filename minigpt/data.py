"""Preparing corpora into token files, loading them, and the random-window batcher.

`prepare` turns a source (see corpus.py: a built-in dataset, a file or a folder
of .txt, .jsonl or .parquet files) into

    data/<name>-<tokenizer>-<hash>/
        train.bin, val.bin   token ids, uint16 when the vocab fits, else uint32
        tokenizer.json       everything needed to encode and decode
        meta.json            tokenizer, token counts, source, content hash, sizes

in two streaming passes, so memory is bounded by a chunk, never by the corpus:

1. scan: read every document once for the content hash, each document's length
   and (for char) the characters. The hash, with the tokenizer settings, names
   the folder: preparing the same thing again reuses it at once, and a changed
   corpus gets a new one. The lengths place the split: validation is the last
   10% (for one document, its last 10% of characters; for several, whole
   documents from the end).
2. tokenise: train the BPE on a bounded sample of the training split, if one is
   asked for, then read the corpus again, encode it on every core (tiktoken
   releases the GIL, so threads run in parallel) and append the ids to the token
   files in order. Documents are joined by <|endoftext|> (char: each ends in a
   newline). The pass hashes what it reads too: a corpus edited in between is an
   error, never a folder of mixed tokens.

The folder is built under a temporary name and renamed into place, so a crash
never leaves a half-prepared folder that a later run would trust; a folder that
is damaged all the same (a truncated token file, an edited meta.json) fails
`load_prepared`'s checks, and `prepare` builds it again. The temporary name says
which host and process own it (`.NAME.HOST.PID.RANDOM.tmp`), so the next prepare
can clear the leftovers of one that was killed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minigpt.atomic import write_json_atomic
from minigpt.corpus import (
    AUTO_GLOB,
    BUILTIN_DATASETS,
    DEFAULT_FIELD,
    DEFAULT_SOURCE,
    TEXT,
    ContentHash,
    Corpus,
    Document,
    OnBytes,
    load_corpus,
)
from minigpt.errors import MinigptError, os_error
from minigpt.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    TokenizerFileDamaged,
    check_tokenizer_settings,
    line_chunks,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)

PREPARED_FORMAT = 1
"""Version of the prepared folder's layout (meta.json's "format")."""
DEFAULT_DATA_DIR = Path("data")
VAL_FRACTION = 0.1
TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"
TRAIN, VAL = 0, 1
DEFAULT_BPE_SAMPLE_CHARS = 100_000_000
"""BPE merges are learned from at most this many characters of the training split, so
learning's memory and time stop growing with the corpus there. rustbpe's memory grows
with the distinct words it counts: on text whose vocabulary keeps growing, 185M
characters took 474 MB and 50M took 290 MB, while the 4096-token BPE learned from
either compressed the text alike (4.27 bytes a token; bench/prepare.py)."""
TASK_CHARS = 1 << 20
"""Text per tokenising task: enough that a thread's work dwarfs handing it over, little
enough that the tasks in flight (two per worker) hold a few MB."""
CUT_CHARS = 1 << 20
"""A document longer than this is tokenised a piece of about this size at a time, cut
where its tokenizer allows (`Tokenizer.cut_point`) so the ids are those of the whole."""
SHOW_PROGRESS_BYTES = 5_000_000
"""Progress bars appear only for sources at least this big, where the wait is noticeable."""

# ---------------------------------------------------------------------------- preparing


class PreparedDataDamaged(MinigptError):
    """A prepared folder that cannot be trusted: `prepare` builds it again."""


@dataclass
class PreparedData:
    """A prepared corpus: token files, their tokenizer and what meta.json says about them."""

    dir: Path
    train_path: Path
    val_path: Path
    meta: dict
    tokenizer: Tokenizer
    dtype: np.dtype
    reused: bool = field(default=False, compare=False)  # True when an earlier prepare made it
    seconds: float | None = field(default=None, compare=False)  # how long prepare took
    workers: int | None = field(default=None, compare=False)  # threads it tokenised on

    def train_tokens(self) -> np.ndarray:
        return _memmap(self.train_path, self.dtype)

    def val_tokens(self) -> np.ndarray:
        return _memmap(self.val_path, self.dtype)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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


def check_sample_chars(sample_chars: int) -> None:
    if isinstance(sample_chars, bool) or not isinstance(sample_chars, int) or sample_chars < 1:
        raise MinigptError(
            f"bpe_sample_chars must be a whole number of characters, at least 1, not "
            f"{sample_chars!r}",
            hint=f"the default is {DEFAULT_BPE_SAMPLE_CHARS:,}",
            param="bpe_sample_chars",
        )


class ByteProgress:
    """A progress bar over the bytes of a source, with throughput and time left. Calls
    are gathered a megabyte at a time, so a corpus of tiny documents is not slowed by it."""

    def __init__(self, total: int, desc: str, show: bool):
        show = show and total >= SHOW_PROGRESS_BYTES
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show)
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


# ---------------------------------------------------------------------------- pass 1: the scan


@dataclass
class CorpusScan:
    """What one quick pass over a corpus learns before anything is tokenised."""

    content_hash: str  # names the prepared folder (with the tokenizer settings)
    doc_chars: array  # characters of each non-empty document, in order: they place the split
    characters: int  # their sum
    n_bytes: int  # UTF-8 bytes of those documents
    chars: list[str] | None  # every character, sorted (for a char vocabulary)


def _hashed_pieces(doc: Document, hasher: ContentHash) -> Iterator[tuple[str, int]]:
    """(text, its UTF-8 bytes) of a non-empty document, a piece at a time, fed to the hash."""
    if isinstance(doc, str):
        if doc:
            raw = doc.encode("utf-8")
            hasher.begin(len(raw))
            hasher.update(raw)
            yield doc, len(raw)
        return
    hasher.begin(doc.n_bytes)
    for piece in doc.pieces:
        raw = piece.encode("utf-8")
        hasher.update(raw)
        yield piece, len(raw)


class CharSet:
    """The characters seen so far, as a bitmap over code points (numpy, not a Python
    set: a set costs an object per character looked at)."""

    def __init__(self):
        self.seen = np.zeros(0x110000, dtype=bool)
        self.pending: list[str] = []
        self.n_pending = 0

    def add(self, text: str) -> None:
        self.pending.append(text)
        self.n_pending += len(text)
        if self.n_pending >= 1 << 22:
            self._flush()

    def _flush(self) -> None:
        codes = np.frombuffer("".join(self.pending).encode("utf-32-le"), dtype=np.uint32)
        self.seen[codes] = True
        self.pending, self.n_pending = [], 0

    def sorted(self) -> list[str]:
        self._flush()
        return [chr(code) for code in np.flatnonzero(self.seen)]


def scan_corpus(
    corpus: Corpus, end_with_newline: bool, collect_chars: bool, progress: bool = True
) -> CorpusScan:
    """Pass 1: the content hash, document lengths, size and (collect_chars) characters.

    end_with_newline (char): a document that does not end in a newline is counted with
    the one that tokenising will add.
    """
    hasher, doc_chars, n_bytes = ContentHash(), array("q"), 0
    seen = CharSet() if collect_chars else None
    with ByteProgress(corpus.n_bytes, "reading", progress) as bar:
        for doc in corpus.documents(bar):
            n_chars, last = 0, ""
            for piece, piece_bytes in _hashed_pieces(doc, hasher):
                n_chars, n_bytes, last = n_chars + len(piece), n_bytes + piece_bytes, piece[-1]
                if seen is not None:
                    seen.add(piece)
            if n_chars == 0:  # an empty file adds nothing
                continue
            if end_with_newline and last != "\n":
                n_chars, n_bytes = n_chars + 1, n_bytes + 1
                if seen is not None:
                    seen.add("\n")
            doc_chars.append(n_chars)
    chars = seen.sorted() if seen is not None else None
    return CorpusScan(hasher.hexdigest(), doc_chars, sum(doc_chars), n_bytes, chars)


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


def _train_chars(scan: CorpusScan, split: Split) -> int:
    return sum(scan.doc_chars[: split.val_start]) + split.cut


# ---------------------------------------------------------------------------- pass 2: tokenising

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
        pieces = (piece for piece, _ in _hashed_pieces(doc, hasher))
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
        for task in tasks:
            pending.append(pool.submit(encode, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class TokenFiles:
    """train.bin and val.bin, appended to as ids arrive. An id that does not fit the
    dtype is an error, never wrapped; the disk is checked for room once the size of
    the rest can be estimated."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder, self.dtype = folder, np.dtype(dtype)
        self.files = [open(folder / TRAIN_FILE, "wb"), open(folder / VAL_FILE, "wb")]
        self.counts = [0, 0]

    def write(self, split: int, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            bad = int(ids.max()) if ids.max() > np.iinfo(self.dtype).max else int(ids.min())
            raise MinigptError(
                f"token id {bad} does not fit the token file's {self.dtype.name}",
                hint="the tokenizer's vocab_size is wrong; prepare again with a fresh tokenizer",
            )
        self.files[split].write(ids.astype(self.dtype, copy=False).data)
        self.counts[split] += len(ids)

    def check_room(self, tokens_left: float) -> None:
        """Refuse to go on when the tokens still to come will not fit on the disk."""
        need = int(tokens_left * self.dtype.itemsize)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise MinigptError(
                f"the token files need about {_gb(need)} more, and the disk holding "
                f"{self.folder.parent} has {_gb(free)} free",
                hint="free some space, or prepare into another folder "
                "(prepare's --data-dir; train's data.data_dir)",
            )

    def close(self, durable: bool) -> None:
        """Close both files; `durable`: flushed to the disk first (before the folder is
        renamed into place, so a power cut cannot leave a renamed folder of zeros)."""
        for f in self.files:
            if durable and not f.closed:
                f.flush()
                os.fsync(f.fileno())
            f.close()


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


ROOM_CHECK_CHARS = 8_000_000
"""Tokenise this much before estimating the token files' size from it (BPE's bytes per
token vary with the text; char's are known at once)."""
KEEP_FRESH_S = 600.0
"""Touch the temporary folder this often: a prepare on another host takes a folder
untouched for STALE_AFTER_S as a killed one's."""


def tokenize_into(
    folder: Path,
    corpus: Corpus,
    scan: CorpusScan,
    split: Split,
    tok: Tokenizer,
    workers: int,
    progress: bool = True,
) -> list[int]:
    """Pass 2: tokenise the corpus into folder's train.bin and val.bin; returns the token
    counts. The content hash is checked again: an edited corpus is an error."""
    hasher = ContentHash()
    files = TokenFiles(folder, token_dtype(tok.vocab_size))
    done_chars, checked = 0, False
    fresh_at = time.monotonic()
    try:
        with ByteProgress(corpus.n_bytes, "tokenizing", progress) as bar:
            end_with_newline = tok.kind == "char"
            texts = split_texts(corpus, split, tok.cut_point, end_with_newline, hasher, bar)
            for task in encode_in_order(tok, texts, workers):
                done_chars += task.n_chars
                if not checked and (done_chars >= ROOM_CHECK_CHARS or tok.kind == "char"):
                    # before this task is written: its ids say how many the rest will take
                    tokens_per_char = (sum(files.counts) + len(task.ids)) / max(1, done_chars)
                    files.check_room(
                        len(task.ids) + (scan.characters - done_chars) * tokens_per_char * 1.05
                    )
                    checked = True
                files.write(task.split, task.ids)
                if time.monotonic() - fresh_at > KEEP_FRESH_S:
                    os.utime(folder)
                    fresh_at = time.monotonic()
        if hasher.hexdigest() != scan.content_hash:
            raise MinigptError(
                f"the corpus {corpus.source} changed while it was being prepared",
                hint="prepare it again once nothing is writing to it",
            )
        files.close(durable=True)
    finally:
        files.close(durable=False)
    return files.counts


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


def bpe_sample(
    corpus: Corpus, split: Split, sample_chars: int, on_bytes: OnBytes = lambda n: None
) -> Iterator[str]:
    """The first `sample_chars` characters of the training split, as the texts BPE
    training counts (`line_chunks` of each document, as ever: a corpus smaller than
    the sample learns exactly the merges it always did)."""
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


# ---------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer a prepare asks for: a kind to build for the corpus, or a ready one."""

    kind: str
    vocab_size: int | None  # bpe's, checked
    given: Tokenizer | None  # a fine-tuned model's own tokenizer
    setting: str  # what the folder's key records: the kind, or kind:fingerprint
    tag: str  # what the folder's name says: char, bpe2048, gpt2, ...

    @classmethod
    def of(cls, tokenizer: str | Tokenizer, vocab_size: int | None) -> TokenizerChoice:
        if isinstance(tokenizer, Tokenizer):
            kind = tokenizer.kind
            # the folder is keyed by the tokenizer's content: two BPEs of one size differ
            fingerprint = hashlib.sha256(json.dumps(tokenizer.to_json()).encode()).hexdigest()
            tag = f"{kind}{tokenizer.vocab_size}"
            return cls(kind, vocab_size, tokenizer, f"{kind}:{fingerprint[:16]}", tag)
        vocab_size = check_tokenizer_settings(tokenizer, vocab_size)
        tag = tokenizer if vocab_size is None else f"{tokenizer}{vocab_size}"
        return cls(tokenizer, vocab_size, None, tokenizer, tag)


def prepare(
    source: str | Path | None = DEFAULT_SOURCE,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    glob: str = AUTO_GLOB,
    progress: bool = True,
    expected_hash: str | None = None,
    *,
    text_field: str = DEFAULT_FIELD,
    workers: int | None = None,
    bpe_sample_chars: int | None = None,
) -> PreparedData:
    """Tokenise `source` once into data_dir/<name>-<tokenizer>-<hash>/, or reuse that folder.

    `source` is a built-in dataset name, a file or a folder (read with `glob`; see
    corpus.py), None meaning the default, pystdlib; `text_field` is the JSONL field or
    Parquet column. `tokenizer` is a kind to build for this corpus ('char', 'bpe', a
    tiktoken name), or a ready Tokenizer (a fine-tuned model's own). `workers`: threads
    to tokenise on (None or 0: every core). A BPE learns from the first
    `bpe_sample_chars` characters of the training split (None: DEFAULT_BPE_SAMPLE_CHARS).
    `expected_hash`, where given, is the content hash the corpus must still have (a
    resumed run's). Raises MinigptError for bad input, before anything is written. A
    damaged folder is built again.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    choice = TokenizerChoice.of(tokenizer, vocab_size)
    workers = check_workers(workers)
    if bpe_sample_chars is None:
        bpe_sample_chars = DEFAULT_BPE_SAMPLE_CHARS
    check_sample_chars(bpe_sample_chars)
    corpus = load_corpus(
        DEFAULT_SOURCE if source is None else source, data_dir, glob, progress, text_field
    )
    char = choice.kind == "char"
    scan = scan_corpus(corpus, char, collect_chars=char and choice.given is None, progress=progress)
    if not scan.doc_chars:
        raise MinigptError(
            f"the corpus {corpus.source} is empty", hint="give it some text to learn from"
        )
    check_corpus_unchanged(corpus, scan.content_hash, expected_hash)
    split = split_point(scan.doc_chars)
    settings = {
        "format": PREPARED_FORMAT,
        "tokenizer": choice.setting,
        "vocab_size": choice.vocab_size,
        "val_fraction": VAL_FRACTION,
    }
    if (
        choice.kind == "bpe"
        and choice.given is None
        and _train_chars(scan, split) > bpe_sample_chars
    ):
        settings["bpe_sample_chars"] = bpe_sample_chars  # only where it changes the merges
    key = hashlib.sha256((scan.content_hash + json.dumps(settings, sort_keys=True)).encode())
    out_dir = data_dir / f"{corpus.name}-{choice.tag}-{key.hexdigest()[:12]}"
    remove_stale_temp_folders(data_dir)
    reused = _reuse_prepared(out_dir, corpus)
    if reused is not None:
        return reused
    meta = {
        "format": PREPARED_FORMAT,
        "source": corpus.source,
        "source_kind": corpus.kind,
        "source_path": _source_path(corpus),
        "glob": corpus.glob,
        "content_hash": scan.content_hash,
        "settings": settings,
        "source_format": corpus.format,
    }
    if corpus.format != TEXT:
        meta["text_field"] = corpus.text_field
    _build_prepared(out_dir, corpus, scan, split, choice, meta, workers, progress, bpe_sample_chars)
    prepared = load_prepared(out_dir)
    prepared.seconds, prepared.workers = time.perf_counter() - started, workers
    return prepared


def check_corpus_unchanged(corpus: Corpus, corpus_hash: str, expected_hash: str | None) -> None:
    """A resumed run must see the corpus it was trained on: refuse a changed one before
    anything is trained or written."""
    if expected_hash is None or corpus_hash == expected_hash:
        return
    raise MinigptError(
        f"the corpus {corpus.source} has changed since the run started: its content hash "
        f"is {corpus_hash[:12]}, the run was trained on {str(expected_hash)[:12]}",
        hint="restore the original corpus, or start a new run with --out",
    )


def _source_path(corpus: Corpus) -> str | None:
    return None if corpus.path is None else str(corpus.path)


def _reuse_prepared(out_dir: Path, corpus: Corpus) -> PreparedData | None:
    """The folder an earlier prepare made, if it is whole; a damaged one is removed, to be
    built again, so that a truncated or edited folder is never trusted."""
    if not os.path.lexists(out_dir):
        return None
    try:
        prepared = load_prepared(out_dir, reused=True)
    except PreparedDataDamaged:
        _discard(out_dir)
        return None
    # meta.json names the source of whoever prepared the folder first (the same content,
    # maybe elsewhere); this caller is told about its own
    prepared.meta.update(source=corpus.source, source_path=_source_path(corpus))
    return prepared


def build_tokenizer(
    choice: TokenizerChoice,
    corpus: Corpus,
    scan: CorpusScan,
    split: Split,
    sample_chars: int,
    progress: bool = True,
) -> Tokenizer:
    """The given tokenizer; or char's vocabulary from the scan (the whole corpus, so val
    has no unseen characters); or BPE merges learned from a sample of the training
    split only, so val is truly held out; or a named encoding."""
    if choice.given is not None:
        return choice.given
    if choice.kind == "char":
        return CharTokenizer(scan.chars)
    if choice.kind == "bpe":
        sampled = min(_train_chars(scan, split), sample_chars) / max(1, scan.characters)
        total = int(corpus.n_bytes * sampled)  # the bytes the sample is read from, near enough
        with ByteProgress(total, "learning bpe", progress) as bar:
            sample = bpe_sample(corpus, split, sample_chars, bar)
            return BPETokenizer.train(sample, choice.vocab_size)
    return train_tokenizer(choice.kind, [], choice.vocab_size)


def _build_prepared(
    out_dir: Path,
    corpus: Corpus,
    scan: CorpusScan,
    split: Split,
    choice: TokenizerChoice,
    meta: dict,
    workers: int,
    progress: bool,
    sample_chars: int,
) -> None:
    """Build the folder under a temporary name, then rename it into place in one step.

    Whatever stops it (an error, Ctrl-C) removes the temporary folder on the way out;
    only a kill leaves it, for the next prepare to clear.
    """
    tmp_dir = make_temp_dir(out_dir)
    try:
        tok = build_tokenizer(choice, corpus, scan, split, sample_chars, progress)
        train_tokens, val_tokens = tokenize_into(
            tmp_dir, corpus, scan, split, tok, workers, progress
        )
        meta.update(
            {
                "tokenizer": tok.to_json(),
                "tokenizer_kind": tok.kind,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "dtype": token_dtype(tok.vocab_size).name,
                "documents": split.documents,
                "train_documents": split.train_documents,
                "val_documents": split.val_documents,
                "characters": scan.characters,
                "bytes": scan.n_bytes,
                "train_tokens": train_tokens,
                "val_tokens": val_tokens,
                "bytes_per_token": scan.n_bytes / max(1, train_tokens + val_tokens),
            }
        )
        save_tokenizer(tok, tmp_dir / TOKENIZER_FILE)
        write_json_atomic(tmp_dir / META_FILE, meta)  # last: its presence marks a complete folder
        _move_into_place(tmp_dir, out_dir)
    except OSError as err:
        raise os_error(err, "write", out_dir) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if os.path.lexists(out_dir):  # a leftover without meta.json, or another process won the race
        if (out_dir / META_FILE).exists():
            return
        _discard(out_dir)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        if not (out_dir / META_FILE).exists():
            raise


# ---------------------------------------------------------------------------- temporary folders

STALE_AFTER_S = 24 * 3600
"""A temporary folder whose owner cannot be asked (on another host) is stale after a day
untouched: its owner touches it every KEEP_FRESH_S while it tokenises, however long."""
# .NAME.HOST.PID.RANDOM.tmp, NAME ending in the 12 hex digits of the prepared folder's key;
# OLD_TEMP_NAME is the older .NAME.RANDOM.tmp of tempfile.mkdtemp. Nothing else is touched.
TEMP_NAME = re.compile(
    r"\.(?P<name>.+-[0-9a-f]{12})\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp"
)
OLD_TEMP_NAME = re.compile(r"\..+-[0-9a-f]{12}\.[a-z0-9_]{8}\.tmp")


def _host_tag() -> str:
    """This host's name with only letters, digits and '-', so the name's dots stay separators."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _temp_path(out_dir: Path) -> Path:
    owner = f"{_host_tag()}.{os.getpid()}"
    return out_dir.parent / f".{out_dir.name}.{owner}.{secrets.token_hex(4)}.tmp"


def make_temp_dir(out_dir: Path) -> Path:
    """A fresh temporary folder beside `out_dir`, named for its owner (see TEMP_NAME).

    Made with mkdir's mode, 0o777 less the umask, so the folder renamed into place has
    the modes of any folder (mkdtemp's would be 0o700: private to one user).
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        while True:
            path = _temp_path(out_dir)
            try:
                path.mkdir()
                return path
            except FileExistsError:  # 32 random bits taken already: draw again
                continue
    except OSError as err:  # named for the data folder, not for the hidden name it tried
        raise os_error(OSError(err.errno, err.strerror), "write in", out_dir.parent) from None


def remove_stale_temp_folders(data_dir: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary folders that killed prepares left in data_dir; returns them.

    One made on this host by a process that is gone is stale at once; one whose owner
    cannot be asked (another host, or an older name without a pid) after STALE_AFTER_S.
    """
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(data_dir))
    except OSError:  # no data folder yet, or one that cannot be listed: nothing to clear
        return []
    stale = [Path(entry.path) for entry in entries if _is_stale_temp(entry, now)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _is_stale_temp(entry: os.DirEntry, now: float) -> bool:
    match = TEMP_NAME.fullmatch(entry.name)
    if not (match or OLD_TEMP_NAME.fullmatch(entry.name)):
        return False
    try:
        if not entry.is_dir(follow_symlinks=False):
            return False
        age = now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if match and match["host"] == _host_tag() and os.name == "posix":
        return not _process_alive(int(match["pid"]))
    return age > STALE_AFTER_S


def _process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (on POSIX; signal 0 only asks)."""
    if pid <= 0:  # 0 and -1 would signal whole process groups: never a real owner
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; larger than any pid
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


def _discard(path: Path) -> None:
    """Remove a damaged prepared folder (or a link or file in its place).

    A folder is renamed to a temporary name first, so it vanishes in one step: a kill
    while it is being deleted leaves a temporary folder, never a half-deleted one.
    """
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # a link's target is not ours to delete
            return
        doomed = _temp_path(path)
        os.rename(path, doomed)
    except FileNotFoundError:  # another prepare removed it first
        return
    except OSError as err:
        raise MinigptError(
            f"the prepared folder {path} is damaged and cannot be removed: {err.strerror}",
            hint="remove it by hand, then prepare again",
        ) from None
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------- loading


TOKEN_DTYPES = ("uint16", "uint32")
META_TYPES: dict[str, type | tuple[type, ...]] = {
    # what load_prepared and describe_prepared read, and the type each must have
    "format": int,
    "source": str,
    "dtype": str,
    "vocab_size": int,
    "documents": int,
    "train_documents": int,
    "val_documents": int,
    "characters": int,
    "bytes": int,
    "train_tokens": int,
    "val_tokens": int,
    "bytes_per_token": (int, float),
}


REPAIR_HINT = "prepare the corpus again (`minigpt prepare` rebuilds a damaged folder)"


def _damaged(directory: Path, what: str) -> PreparedDataDamaged:
    return PreparedDataDamaged(f"the prepared folder {directory} is damaged: {what}", REPAIR_HINT)


def load_prepared(directory: str | Path, reused: bool = False) -> PreparedData:
    """Open a prepared folder (as written by `prepare`), checked: meta.json holds what is
    read from it, both token files hold the tokens it counts, the tokenizer loads.

    A damaged folder is a PreparedDataDamaged naming it and what is wrong; one that
    cannot be read (permissions) a MinigptError.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    _check_meta(directory, meta)
    dtype = np.dtype(meta["dtype"])
    train_path, val_path = directory / TRAIN_FILE, directory / VAL_FILE
    _check_token_file(directory, train_path, meta["train_tokens"], dtype)
    _check_token_file(directory, val_path, meta["val_tokens"], dtype)
    return PreparedData(
        dir=directory,
        train_path=train_path,
        val_path=val_path,
        meta=meta,
        tokenizer=_load_prepared_tokenizer(directory, meta, dtype),
        dtype=dtype,
        reused=reused,
    )


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise PreparedDataDamaged(
            f"{directory} is not prepared data (no {META_FILE})",
            hint="run `minigpt prepare` on the corpus first",
        ) from None
    except IsADirectoryError:
        raise _damaged(directory, f"{META_FILE} is a folder") from None
    except OSError as err:  # permission denied: an error to report, not damage to repair
        raise os_error(err, "read", path) from None
    except (ValueError, RecursionError):  # bad JSON or UTF-8; absurdly deep nesting
        raise _damaged(directory, f"{META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _damaged(directory, f"{META_FILE} is not a JSON object")
    return meta


def _check_meta(directory: Path, meta: dict) -> None:
    for key, kind in META_TYPES.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _damaged(directory, f"{META_FILE} has no valid {key!r}")
        if kind is int and value < 0:
            raise _damaged(directory, f"{META_FILE} has a negative {key!r}")
    if meta["format"] != PREPARED_FORMAT:
        raise _damaged(
            directory, f"{META_FILE} says format {meta['format']}, not {PREPARED_FORMAT}"
        )
    if meta["dtype"] not in TOKEN_DTYPES:
        raise _damaged(directory, f"{META_FILE} says dtype {meta['dtype']!r}, not uint16 or uint32")


def _check_token_file(directory: Path, path: Path, n_tokens: int, dtype: np.dtype) -> None:
    """The file holds exactly n_tokens ids of `dtype`: a truncated one is damage, never data."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise _damaged(directory, f"{path.name} is missing") from None
    except OSError as err:
        raise os_error(err, "read", path) from None
    if not stat.S_ISREG(info.st_mode):
        raise _damaged(directory, f"{path.name} is not a regular file")
    expected = n_tokens * dtype.itemsize
    if info.st_size != expected:
        raise _damaged(
            directory,
            f"{path.name} has {info.st_size:,} bytes, where {META_FILE}'s {n_tokens:,} "
            f"{dtype.name} tokens take {expected:,}",
        )
    try:
        open(path, "rb").close()  # unreadable now is clearer than when it is mapped
    except OSError as err:
        raise os_error(err, "read", path) from None


def _load_prepared_tokenizer(directory: Path, meta: dict, dtype: np.dtype) -> Tokenizer:
    """tokenizer.json, else (older folders) meta.json's copy; damaged means the folder is."""
    path = directory / TOKENIZER_FILE
    try:
        if path.exists():
            tok = load_tokenizer(path)
        else:
            tok = tokenizer_from_json(meta.get("tokenizer"), where=str(directory / META_FILE))
    except TokenizerFileDamaged as err:  # its message names the file, in this folder
        raise PreparedDataDamaged(str(err), REPAIR_HINT) from None
    if tok.vocab_size - 1 > np.iinfo(dtype).max:
        raise _damaged(
            directory, f"its {tok.vocab_size:,}-token vocabulary does not fit {dtype.name}"
        )
    return tok


def check_block_size(n_tokens: int, block_size: int, what: str) -> None:
    """`what` must hold one window of block_size + 1 tokens (the inputs, and the targets
    shifted by one): the one check of a split's size, before anything is trained or written."""
    if n_tokens < block_size + 1:
        raise MinigptError(
            f"{what} has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}",
            hint="use a smaller model.block_size or a bigger corpus",
        )


def describe_prepared(prepared: PreparedData) -> str:
    """What `minigpt prepare` prints: sizes, splits, vocab, bytes per token, where it is."""
    meta = prepared.meta
    lines = [
        f"{'reused' if prepared.reused else 'prepared'} {meta['source']} "
        f"with the {prepared.tokenizer.describe()} tokenizer",
        f"  characters     {meta['characters']:,} ({meta['bytes']:,} bytes)",
        f"  documents      {meta['documents']:,} (train {meta['train_documents']:,}, "
        f"val {meta['val_documents']:,})",
        f"  train tokens   {meta['train_tokens']:,}",
        f"  val tokens     {meta['val_tokens']:,}",
        f"  vocab size     {meta['vocab_size']:,} ({meta['dtype']})",
        f"  bytes/token    {meta['bytes_per_token']:.2f}",
        f"  in             {prepared.dir}",
    ]
    if prepared.seconds is not None:
        rate = meta["bytes"] / 1e6 / max(prepared.seconds, 1e-9)
        lines.append(
            f"  took           {prepared.seconds:.2f} s ({rate:.3g} MB/s, "
            f"{prepared.workers} worker{'s' if prepared.workers != 1 else ''})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- a resumed run's data


def prepare_for_resume(
    source: str,
    data_dir: Path,
    run_data: dict,
    run_dir: Path,
    *,
    tokenizer: str | Tokenizer,
    vocab_size: int | None,
    glob: str,
    progress: bool = True,
    **options,
) -> PreparedData:
    """The data a resumed run was trained on, and nothing else.

    run_data is the run's config.json "prepared_data" (its folder and the corpus's
    content hash). A corpus file or folder whose content changed is refused before
    anything is written; the run's prepared folder is used when the source is gone
    (or is a built-in dataset, which a new Python may change). Relative paths are
    also looked for from the run's project, so a run resumes from another working
    directory or in a copied project. `options` are prepare's text_field, workers and
    bpe_sample_chars. A run directory is data, not instructions: an
    edited config.json cannot make minigpt tokenise some other file into some other
    folder, because whatever it reads must have the recorded content hash.
    """
    expected_hash = _recorded_hash(run_data)
    projects = _project_dirs(run_dir)
    source = _source_to_read(source, run_data, projects)
    folders = _recorded_folders(run_data, str(data_dir), projects)
    if source in BUILTIN_DATASETS or not _exists(source):
        builtin = source if source in BUILTIN_DATASETS else None
        check = _intact(expected_hash, builtin)
        prepared = next((p for p in map(check, folders) if p is not None), None)
        if prepared is not None:
            return prepared
    data_dir = next((f.parent for f in folders if _is_dir(f)), data_dir)
    return prepare(
        source, tokenizer, vocab_size, data_dir, glob, progress, expected_hash, **options
    )


def _recorded_hash(run_data: dict) -> str:
    content_hash = run_data.get("content_hash") if isinstance(run_data, dict) else None
    if not isinstance(content_hash, str):
        raise MinigptError(
            "the run's config.json does not record the content hash of its data, so "
            "resume cannot check that the data is the same",
            hint="the file was edited or damaged; start a new run with another --out",
        )
    return content_hash


def _project_dirs(run_dir: Path) -> list[Path]:
    """Where a run's relative paths may start from besides the working directory: the
    folder holding the run, and the one above (checkpoints/<run> sits in a project)."""
    run_dir = run_dir.resolve()
    return [run_dir.parent, run_dir.parent.parent]


def _recorded_folders(run_data: dict, data_dir: str, projects: list[Path]) -> list[Path]:
    """Where a resumed run's prepared folder may be: where config.json says, and under
    data_dir from the run's project (a project copied elsewhere, with its runs)."""
    recorded = run_data.get("dir")
    if not isinstance(recorded, str) or not recorded:
        return []
    return [Path(recorded), *(base / data_dir / Path(recorded).name for base in projects)]


def _intact(content_hash: str, builtin: str | None) -> Callable[[Path], PreparedData | None]:
    """A check of a folder: the prepared data of the corpus with this content hash (and
    of this built-in dataset, where one is named), if it is whole (load_prepared checks
    it), else None."""

    def check(folder: Path) -> PreparedData | None:
        try:
            prepared = load_prepared(folder)
        except (MinigptError, OSError):
            return None
        meta = prepared.meta
        if meta.get("content_hash") != content_hash:
            return None
        return prepared if builtin is None or meta.get("source") == builtin else None

    return check


def _source_to_read(source: str, run_data: dict, projects: list[Path]) -> str:
    """The source as written; or, for a run resumed from another working directory
    or copied with its project, the absolute path recorded when it was prepared, or
    the relative path taken from the run's project. Whichever is read, its content
    hash must still be the run's."""
    if source in BUILTIN_DATASETS or _exists(source):
        return source
    recorded = run_data.get("source_path")
    candidates = [recorded] if isinstance(recorded, str) else []
    if not Path(source).is_absolute():
        candidates += [str(base / source) for base in projects]
    return next((c for c in candidates if _exists(c)), source)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a NUL in an edited path
        return False


def _exists(source: str) -> bool:
    try:
        return Path(source).expanduser().exists()
    except (RuntimeError, OSError, ValueError):  # ~nouser/..., too long, a NUL in it
        return False
