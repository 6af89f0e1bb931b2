"""`minigpt prepare`: a corpus tokenised once into a prepared folder (see data.py).

A source (a built-in dataset, or a file or folder of .txt, .jsonl or .parquet files:
see datasets.py and corpus.py) is prepared in two streaming passes, so memory is
bounded by a chunk, never by the corpus:

1. scan: read every document once for the content hash, each document's length
   and (for char) the characters. The hash, with the tokenizer settings, names
   the folder: preparing the same thing again reuses it at once, and a changed
   corpus gets a new one. The lengths place the split: validation is the last
   10% (for one document, its last 10% of characters; for several, whole
   documents from the end).
2. tokenise: train the BPE on a bounded sample of the training split, if one is
   asked for, then read the corpus again, encode it on every core (encode.py)
   and append the ids to the token files in order. Documents are joined by
   <|endoftext|> (char: each ends in a newline). The pass hashes what it reads
   too: a corpus edited in between is an error, never a folder of mixed tokens.

The folder is built under a temporary name and renamed into place (atomic.py), so
a crash never leaves a half-prepared folder that a later run would trust; a folder
that is damaged all the same fails `load_prepared`'s checks, and `prepare` builds
it again. `prepare_for_resume` prepares exactly the data a resumed run was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.atomic import (
    discard,
    make_temp_dir,
    no_empty_folders_left,
    remove_stale_temp_folders,
    write_json_atomic,
)
from minigpt.corpus import AUTO_GLOB, DEFAULT_FIELD, TEXT, ContentHash, Corpus
from minigpt.data import (
    DEFAULT_DATA_DIR,
    META_FILE,
    PREPARED_FORMAT,
    TRAIN_FILE,
    VAL_FILE,
    PreparedData,
    PreparedDataDamaged,
    find_run_data,
    load_prepared,
    project_dirs,
    run_data_folders,
    token_dtype,
)
from minigpt.datasets import BUILTIN_DATASETS, DEFAULT_SOURCE, load_source
from minigpt.encode import (
    VAL_FRACTION,
    ByteProgress,
    Split,
    bpe_sample,
    check_workers,
    encode_in_order,
    hashed_pieces,
    split_point,
    split_texts,
)
from minigpt.errors import MinigptError, os_error
from minigpt.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    check_tokenizer_settings,
    save_tokenizer,
    train_tokenizer,
)

DEFAULT_BPE_SAMPLE_CHARS = 100_000_000
"""BPE merges are learned from at most this many characters of the training split, so
learning's memory and time stop growing with the corpus there: rustbpe's memory grows
with the distinct words it counts, while a sample this size already gives the merges
that compress the text about as well as the whole would (bench/prepare.py measures it)."""
ROOM_CHECK_CHARS = 8_000_000
"""Tokenise this much before estimating the token files' size from it (BPE's bytes per
token vary with the text; char's are known at once)."""
KEEP_FRESH_S = 600.0
"""Touch the temporary folder this often: a prepare on another host takes a folder
untouched for atomic.STALE_AFTER_S as a killed one's."""


def check_sample_chars(sample_chars: int) -> None:
    if isinstance(sample_chars, bool) or not isinstance(sample_chars, int) or sample_chars < 1:
        raise MinigptError(
            f"bpe_sample_chars must be a whole number of characters, at least 1, not "
            f"{sample_chars!r}",
            hint=f"the default is {DEFAULT_BPE_SAMPLE_CHARS:,}",
            param="bpe_sample_chars",
        )


# ---------------------------------------------------------------------------- pass 1: the scan


@dataclass
class CorpusScan:
    """What one quick pass over a corpus learns before anything is tokenised."""

    content_hash: str  # names the prepared folder (with the tokenizer settings)
    doc_chars: array  # characters of each non-empty document, in order: they place the split
    characters: int  # their sum
    n_bytes: int  # UTF-8 bytes of those documents
    chars: list[str] | None  # every character, sorted (for a char vocabulary)


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
            for piece, piece_bytes in hashed_pieces(doc, hasher):
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


def _train_chars(scan: CorpusScan, split: Split) -> int:
    return sum(scan.doc_chars[: split.val_start]) + split.cut


# ---------------------------------------------------------------------------- the tokenizer


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


# ---------------------------------------------------------------------------- pass 2: the token files


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


# ---------------------------------------------------------------------------- prepare


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
    with no_empty_folders_left(data_dir):  # a refused prepare leaves no empty folder
        choice = TokenizerChoice.of(tokenizer, vocab_size)
        workers = check_workers(workers)
        if bpe_sample_chars is None:
            bpe_sample_chars = DEFAULT_BPE_SAMPLE_CHARS
        check_sample_chars(bpe_sample_chars)
        corpus = load_source(
            DEFAULT_SOURCE if source is None else source, data_dir, glob, progress, text_field
        )
        char = choice.kind == "char"
        scan = scan_corpus(
            corpus, char, collect_chars=char and choice.given is None, progress=progress
        )
        if not scan.doc_chars:
            raise MinigptError(
                f"the corpus {corpus.source} is empty", hint="give it some text to learn from"
            )
        check_corpus_unchanged(corpus, scan.content_hash, expected_hash)
        split = split_point(scan.doc_chars)
        settings = _folder_settings(choice, _train_chars(scan, split), bpe_sample_chars)
        key = hashlib.sha256((scan.content_hash + json.dumps(settings, sort_keys=True)).encode())
        out_dir = data_dir / f"{corpus.name}-{choice.tag}-{key.hexdigest()[:12]}"
        remove_stale_temp_folders(data_dir)
        reused = _reuse_prepared(out_dir, corpus)
        if reused is not None:
            return reused
        meta = _source_meta(corpus, scan, settings)
        _build_prepared(
            out_dir, corpus, scan, split, choice, meta, workers, progress, bpe_sample_chars
        )
        prepared = load_prepared(out_dir)
        prepared.seconds, prepared.workers = time.perf_counter() - started, workers
        return prepared


def _folder_settings(choice: TokenizerChoice, train_chars: int, bpe_sample_chars: int) -> dict:
    """What, besides the corpus's content, the folder's name is a hash of."""
    settings = {
        "format": PREPARED_FORMAT,
        "tokenizer": choice.setting,
        "vocab_size": choice.vocab_size,
        "val_fraction": VAL_FRACTION,
    }
    if choice.kind == "bpe" and choice.given is None and train_chars > bpe_sample_chars:
        settings["bpe_sample_chars"] = bpe_sample_chars  # only where it changes the merges
    return settings


def _source_meta(corpus: Corpus, scan: CorpusScan, settings: dict) -> dict:
    """meta.json's account of where the tokens come from (the rest is added once they exist)."""
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
    return meta


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


def _discard(path: Path) -> None:
    """Remove a damaged prepared folder (or a link or file in its place) in one step."""
    try:
        discard(path)
    except OSError as err:
        raise MinigptError(
            f"the prepared folder {path} is damaged and cannot be removed: {err.strerror}",
            hint="remove it by hand, then prepare again",
        ) from None


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
    anything is written; the run's prepared folder (`data.find_run_data`) is used
    when the source is gone (or is a built-in dataset, which a new Python may
    change). Relative paths are also looked for from the run's project, so a run
    resumes from another working directory or in a copied project. `options` are
    prepare's text_field, workers and bpe_sample_chars. A run directory is data, not
    instructions: an edited config.json cannot make minigpt tokenise some other file
    into some other folder, because whatever it reads must have the recorded content hash.
    """
    expected_hash = _recorded_hash(run_data)
    source = _source_to_read(source, run_data, project_dirs(run_dir))
    if source in BUILTIN_DATASETS or not _exists(source):
        builtin = source if source in BUILTIN_DATASETS else None
        prepared = find_run_data(run_data, run_dir, data_dir, builtin=builtin)
        if prepared is not None:
            return prepared
    folders = run_data_folders(run_data, run_dir, data_dir)
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
