"""Corpora, preparation into token files, and the random-window batcher.

A source is a text file, a folder (every file matching a glob, recursively, one
document per file), or a built-in dataset name from `BUILTIN_DATASETS`. `prepare`
reads it, builds the tokenizer, splits off the last 10% as validation (whole
documents at the end when there are several), tokenises once, and writes

    data/<name>-<tokenizer>-<hash>/
        train.bin, val.bin   token ids, uint16 when the vocab fits, else uint32
        tokenizer.json       everything needed to encode and decode
        meta.json            tokenizer, token counts, source, content hash, sizes

The hash covers the corpus content and the tokenizer settings, so preparing the
same thing again reuses the folder at once and a changed corpus gets a new one.
The folder is built under a temporary name and renamed into place, so a crash
never leaves a half-prepared folder that a later run would trust; a folder that
is damaged all the same (a truncated token file, an edited meta.json) fails
`load_prepared`'s checks, and `prepare` builds it again. The temporary name says
which host and process own it (`.NAME.HOST.PID.RANDOM.tmp`), so the next prepare
can clear the leftovers of one that was killed.

Text must be UTF-8: a file that is not (or that holds NUL bytes, i.e. binary, or
is UTF-16) is refused with the file and byte offset named, rather than silently
corrupted.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import socket
import stat
import string
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from tqdm import tqdm

from minigpt.atomic import atomic_path, write_json_atomic
from minigpt.errors import MinigptError, os_error
from minigpt.tokenizer import (
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerFileDamaged,
    check_tokenizer_settings,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)

PREPARED_FORMAT = 1
"""Version of the prepared folder's layout (meta.json's "format")."""
DEFAULT_SOURCE = "pystdlib"
DEFAULT_DATA_DIR = Path("data")
VAL_FRACTION = 0.1
TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"

# ---------------------------------------------------------------------------- built-in datasets


@dataclass
class BuiltinDataset:
    """A named corpus: `documents(data_dir, progress)` returns its documents (downloading if it must)."""

    description: str
    documents: Callable[[Path, bool], list[str]]


STDLIB_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The running Python's standard-library .py files, test suites and site-packages left out, sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]  # prune: never walk into them
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def pystdlib_documents(data_dir: Path, progress: bool = True) -> list[str]:
    files = stdlib_files()
    if not files:
        raise MinigptError(
            "found no standard-library .py files in this Python",
            hint="point minigpt at a text file or folder instead",
        )
    return [read_text(path) for path in files]


SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_URL_ENV = "MINIGPT_SHAKESPEARE_URL"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shakespeare_path(data_dir: Path) -> Path:
    return Path(data_dir) / "shakespeare" / "input.txt"


def fetch_shakespeare(data_dir: Path, url: str | None = None, progress: bool = True) -> Path:
    """Download tiny shakespeare once into data_dir/shakespeare/input.txt, checksum verified.

    The URL is `url`, else $MINIGPT_SHAKESPEARE_URL, else the char-rnn address.
    The file appears only when complete and correct; a failure leaves nothing behind.
    """
    path = shakespeare_path(data_dir)
    if path.exists():
        if _sha256_file(path) != SHAKESPEARE_SHA256:
            raise MinigptError(
                f"{path} is not tiny shakespeare (its sha256 does not match)",
                hint="delete it to download it again, or put the right file there",
            )
        return path
    url = url or os.environ.get(SHAKESPEARE_URL_ENV) or SHAKESPEARE_URL
    by_hand = f"download {SHAKESPEARE_URL} by hand and put it at {path} (sha256 {SHAKESPEARE_SHA256[:16]}...)"
    made_folder = not path.parent.exists()
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_path(path) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            hasher = hashlib.sha256()
            with (
                open(tmp, "wb") as f,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc="tiny shakespeare",
                    disable=not progress,
                ) as bar,
            ):
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
            if hasher.hexdigest() != SHAKESPEARE_SHA256:
                raise MinigptError(
                    f"the file downloaded from {url} is not tiny shakespeare (wrong sha256)",
                    hint=by_hand,
                )
    except (OSError, HTTPException) as err:  # URLError, refused, timeout, HTTP errors
        reason = getattr(err, "reason", None) or err
        raise MinigptError(
            f"could not download tiny shakespeare from {url} ({reason})", hint=by_hand
        ) from err
    finally:
        if made_folder and path.parent.exists() and not any(path.parent.iterdir()):
            path.parent.rmdir()
    return path


def shakespeare_documents(data_dir: Path, progress: bool = True) -> list[str]:
    return [read_text(fetch_shakespeare(data_dir, progress=progress))]


INDUCTION_ALPHABET = string.ascii_lowercase + string.digits  # 36 symbols


def induction_documents(
    n_documents: int = 6000,
    min_segment: int = 8,
    max_segment: int = 32,
    copies: int = 3,
    alphabet: str = INDUCTION_ALPHABET,
    seed: int = 0,
) -> list[str]:
    """Lines made of one random segment of distinct symbols from `alphabet`, written
    `copies` times.

    The first copy is noise; every later symbol is predictable only by finding the
    same symbol earlier in the line and reading what followed it there. That is the
    job of an induction head (Olsson et al., 2022): a layer-1 head whose keys carry
    the previous token, written there by a previous-token head in layer 0.

    Distinct symbols, so that "the symbol before me" names the one place to copy
    from (with repeats, layer 0 learns a fuzzier key smeared over several tokens);
    segments up to 32 long, as long as the halves of `inspect-heads --repeated 32`.
    docs/induction.md tells how these choices were measured.
    """
    if not (1 <= min_segment <= max_segment and copies >= 2 and n_documents >= 1):
        raise MinigptError(
            "induction documents need n_documents >= 1, 1 <= min_segment <= max_segment "
            "and copies >= 2"
        )
    symbols = sorted(set(alphabet) - {"\n"})
    if len(symbols) < max_segment:
        raise MinigptError(
            f"the alphabet has {len(symbols)} distinct symbols, fewer than max_segment "
            f"({max_segment})",
            hint="each segment uses distinct symbols: lower max_segment or add symbols",
        )
    rng = random.Random(seed)
    documents = []
    for _ in range(n_documents):
        length = rng.randint(min_segment, max_segment)
        segment = "".join(rng.sample(symbols, length))
        documents.append(segment * copies + "\n")
    return documents


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "pystdlib": BuiltinDataset(
        "the .py sources of this Python's standard library (no download)", pystdlib_documents
    ),
    "shakespeare": BuiltinDataset(
        "tiny shakespeare, 1.1M characters (downloaded once into data/)", shakespeare_documents
    ),
    "induction": BuiltinDataset(
        "synthetic lines with a repeated random segment, for induction heads",
        lambda data_dir, progress: induction_documents(),
    ),
}


# ---------------------------------------------------------------------------- reading sources


# UTF-32's little-endian mark begins with UTF-16's, so it is looked for first
WIDE_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def read_text(path: Path) -> str:
    """Read a UTF-8 text file; refuse unreadable, binary, UTF-16 or non-UTF-8 files in one sentence.

    A UTF-8 byte-order mark is UTF-8 and stays in the text, as a plain decode keeps it.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:  # permission denied, vanished since it was listed
        raise os_error(err, "read", path) from None
    _refuse_wide_or_binary(path, raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MinigptError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
            hint="convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out with glob",
            param="glob",
        ) from None


def _refuse_wide_or_binary(path: Path, raw: bytes) -> None:
    """UTF-16 and UTF-32 text, and binary files, named as what they are."""
    wide = _wide_encoding(raw)
    if wide is not None:
        encoding, evidence = wide
        raise MinigptError(
            f"{path} looks like {encoding} text ({evidence}), not UTF-8",
            hint=f"convert it, e.g. `iconv -f {encoding.lower()} -t utf-8`, "
            "or leave it out with glob",
            param="glob",
        )
    nul = raw.find(b"\x00")
    if nul != -1:
        raise MinigptError(
            f"{path} looks binary (it has a NUL byte at offset {nul}), not text",
            hint="point minigpt at text files, or narrow the folder with glob",
            param="glob",
        )


def _wide_encoding(raw: bytes) -> tuple[str, str] | None:
    """(encoding, what gives it away) when `raw` looks like UTF-16 or UTF-32 text."""
    for mark, encoding in WIDE_BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            return encoding, "it starts with a byte-order mark"
    # without a mark, ASCII written as UTF-16 has a NUL in every pair, and only there
    sample = raw[:4096]
    if len(sample) < 8 or len(raw) % 2:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) == len(odd) and 0 not in even:
        return "UTF-16LE", "every other byte is NUL"
    if even.count(0) == len(even) and 0 not in odd:
        return "UTF-16BE", "every other byte is NUL"
    return None


def read_prompt_file(path: str | Path) -> str:
    """A prompt file's text, or one clear sentence why not (missing, empty, not UTF-8)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise MinigptError(f"prompt file {path} does not exist", hint="check the path") from err
    except IsADirectoryError as err:
        raise MinigptError(f"prompt file {path} is a directory", hint="pass a text file") from err
    except UnicodeDecodeError as err:
        raise MinigptError(
            f"prompt file {path} is not UTF-8 text", hint="save it as UTF-8"
        ) from err
    except OSError as err:
        raise MinigptError(f"cannot read prompt file {path}: {err.strerror}") from err
    if not text:
        raise MinigptError(
            f"prompt file {path} is empty",
            hint="put some text in it, or leave out prompt_file",
            param="prompt_file",
        )
    return text


def read_prompts(prompts: Sequence[str] = (), prompt_files: Sequence[str | Path] = ()) -> list[str]:
    """The prompts given as text and as files (one prompt each), in that order."""
    return [*prompts, *(read_prompt_file(path) for path in prompt_files)]


@dataclass
class Corpus:
    """The documents of a source, and names for it."""

    name: str  # short, for the prepared folder's name
    source: str  # what the user asked for, as they would write it again
    kind: str  # "builtin", "file" or "folder"
    documents: list[str]
    path: Path | None = None  # absolute and resolved, for a file or folder: found from anywhere


def load_corpus(
    source: str | Path = DEFAULT_SOURCE,
    data_dir: Path = DEFAULT_DATA_DIR,
    glob: str = "*.txt",
    progress: bool = True,
) -> Corpus:
    """Read a source: a built-in dataset name (these win over same-named paths), a file, or a folder."""
    text = str(source)
    if text in BUILTIN_DATASETS:
        documents = BUILTIN_DATASETS[text].documents(Path(data_dir), progress)
        return Corpus(text, text, "builtin", documents)
    if not text:  # Path("") is the working directory, which nobody means by it
        raise _no_source(text)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~someone" with no such user: a plain name, then
        path = Path(text)
    mode = _source_mode(path)
    if mode is None:
        raise _no_source(text, path)
    if stat.S_ISREG(mode):
        return Corpus(_slug(path.stem), str(path), "file", [read_text(path)], path.resolve())
    if stat.S_ISDIR(mode):
        return _load_folder(path, glob, progress)
    raise MinigptError(
        f"{path} is neither a text file nor a folder (a pipe, a socket or a device?)",
        hint="save the text to a file and give that file",
    )


def _source_mode(path: Path) -> int | None:
    """st_mode of what `path` leads to, None where nothing is; a path that cannot be
    followed (permission denied, a loop of links) is an error."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in it
        return None
    except OSError as err:
        raise os_error(err, "read", path) from None


def _no_source(text: str, path: Path | None = None) -> MinigptError:
    if path is not None and path.is_symlink():
        return MinigptError(
            f"{path} is a symbolic link to {os.readlink(path)}, which does not exist",
            hint="point the link at a text file or folder, or give the file itself",
        )
    names = ", ".join(BUILTIN_DATASETS)
    return MinigptError(
        f"no file, folder or built-in dataset named {text!r}",
        hint=f"give a path to a text file or folder, or one of the built-in datasets: {names}",
    )


def check_glob(glob: str) -> None:
    """A folder's glob names files inside it: not empty, not absolute, no '..' part."""
    if not isinstance(glob, str) or not glob.strip():
        raise MinigptError(
            f"glob {glob!r} is empty",
            hint="choose the files with a pattern, e.g. glob '*.txt' or '**/*.md'",
            param="glob",
        )
    # both separators: a backslash is a folder on Windows and an ordinary character here
    parts = PurePosixPath(glob.replace("\\", "/")).parts
    if glob.startswith(("/", "\\")) or PureWindowsPath(glob).is_absolute():
        problem = "is absolute"
    elif ".." in parts:
        problem = "has a '..' part"
    else:
        return
    raise MinigptError(
        f"glob {glob!r} {problem}; it must name files inside the folder",
        hint="give the folder itself as the source, and a pattern relative to it such as '*.txt'",
        param="glob",
    )


def _load_folder(path: Path, glob: str, progress: bool) -> Corpus:
    """Every file under `path` matching `glob` (recursively), sorted by relative path."""
    check_glob(glob)
    try:
        files = sorted(
            (p for p in path.rglob(glob) if _is_regular_file(p)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
    except (NotImplementedError, ValueError) as err:  # pathlib refuses the pattern
        raise MinigptError(
            f"glob {glob!r} is not a pattern minigpt can use ({err})",
            hint="use a pattern relative to the folder, e.g. glob '*.txt' or '**/*.md'",
            param="glob",
        ) from None
    if not files:
        raise MinigptError(
            f"the folder {path} has no files matching {glob!r}",
            hint="choose the files with glob, e.g. glob '*.py'",
            param="glob",
        )
    documents = [
        read_text(p) for p in tqdm(files, desc="reading", disable=not progress or len(files) < 200)
    ]
    resolved = path.resolve()
    return Corpus(_slug(resolved.name), str(path), "folder", documents, resolved)


def _is_regular_file(path: Path) -> bool:
    """Pipes, sockets and devices are left out (reading one could block forever); a file
    that cannot even be looked at is kept, so that reading it says why."""
    try:
        return path.is_file()
    except OSError:
        return True


def _slug(name: str) -> str:
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._")
    return slug[:40] or "corpus"


def content_hash(documents: list[str]) -> str:
    """sha256 over the documents, each length-prefixed so boundaries count."""
    hasher = hashlib.sha256()
    for doc in documents:
        raw = doc.encode("utf-8")
        hasher.update(len(raw).to_bytes(8, "little"))
        hasher.update(raw)
    return hasher.hexdigest()


def split_documents(
    documents: list[str], val_fraction: float = VAL_FRACTION
) -> tuple[list[str], list[str]]:
    """The last `val_fraction` of the corpus as validation.

    One document: cut at that fraction of its characters. Several: whole documents
    from the end until they hold at least that fraction; train keeps at least one.
    """
    if len(documents) == 1:
        text = documents[0]
        cut = int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    total = sum(len(doc) for doc in documents)
    first_val, val_chars = len(documents), 0
    while first_val > 1 and val_chars < val_fraction * total:
        first_val -= 1
        val_chars += len(documents[first_val])
    return documents[:first_val], documents[first_val:]


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


def write_tokens(path: Path, ids: np.ndarray, dtype: np.dtype) -> None:
    """Write ids as `dtype` atomically; an id that does not fit is an error, never wrapped."""
    dtype = np.dtype(dtype)
    if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        bad = int(ids.max()) if ids.max() > np.iinfo(dtype).max else int(ids.min())
        raise MinigptError(
            f"token id {bad} does not fit the token file's {dtype.name}",
            hint="the tokenizer's vocab_size is wrong; prepare again with a fresh tokenizer",
        )
    with atomic_path(path) as tmp:
        ids.astype(dtype).tofile(tmp)


def tokenize_documents(
    tokenizer: Tokenizer, documents: list[str], progress: bool = True, desc: str = "tokenizing"
) -> np.ndarray:
    """Token ids of the documents, joined by the end-of-text id where the tokenizer has one."""
    eot = tokenizer.eot_id
    parts: list[np.ndarray] = []
    batch = 64
    total_chars = sum(len(doc) for doc in documents)
    show = progress and total_chars >= 5_000_000  # a bar only where the wait is noticeable
    with tqdm(total=total_chars, unit="char", unit_scale=True, desc=desc, disable=not show) as bar:
        for start in range(0, len(documents), batch):
            chunk = documents[start : start + batch]
            for i, ids in enumerate(tokenizer.encode_batch(chunk)):
                if eot is not None and (start + i) > 0:
                    parts.append(np.array([eot], dtype=np.int64))
                parts.append(np.asarray(ids, dtype=np.int64))
            bar.update(sum(len(doc) for doc in chunk))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def prepare(
    source: str | Path | None = DEFAULT_SOURCE,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    glob: str = "*.txt",
    progress: bool = True,
    expected_hash: str | None = None,
) -> PreparedData:
    """Tokenise `source` once into data_dir/<name>-<tokenizer>-<hash>/, or reuse that folder.

    `source` is a built-in dataset name, a text file or a folder (read with `glob`);
    None means the default, pystdlib. `tokenizer` is a kind to build for this corpus
    ('char', 'bpe', a tiktoken name), or a ready Tokenizer (a fine-tuned model's own).
    `expected_hash`, where given, is the content hash the corpus must still have (a
    resumed run's). Raises MinigptError for bad input, before anything is written. A
    damaged folder is built again.
    """
    data_dir = Path(data_dir)
    source = DEFAULT_SOURCE if source is None else source
    if isinstance(tokenizer, Tokenizer):
        given, kind = tokenizer, tokenizer.kind
        # the folder is keyed by the tokenizer's content: two BPEs of one size differ
        fingerprint = hashlib.sha256(json.dumps(given.to_json()).encode()).hexdigest()[:16]
        settings_tokenizer, tag = f"{kind}:{fingerprint}", f"{kind}{given.vocab_size}"
    else:
        given, kind = None, tokenizer
        vocab_size = check_tokenizer_settings(tokenizer, vocab_size)
        settings_tokenizer = tokenizer
        tag = tokenizer if vocab_size is None else f"{tokenizer}{vocab_size}"
    corpus = load_corpus(source, data_dir, glob, progress)
    documents = [doc for doc in corpus.documents if doc]  # an empty file adds nothing
    if not documents:
        raise MinigptError(
            f"the corpus {corpus.source} is empty", hint="give it some text to learn from"
        )
    corpus_hash = content_hash(documents)
    check_corpus_unchanged(corpus, corpus_hash, expected_hash)
    settings = {
        "format": PREPARED_FORMAT,
        "tokenizer": settings_tokenizer,
        "vocab_size": vocab_size,
        "val_fraction": VAL_FRACTION,
    }
    key = hashlib.sha256((corpus_hash + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    out_dir = data_dir / f"{corpus.name}-{tag}-{key[:12]}"
    remove_stale_temp_folders(data_dir)
    reused = _reuse_prepared(out_dir, corpus)
    if reused is not None:
        return reused
    meta = {
        "format": PREPARED_FORMAT,
        "source": corpus.source,
        "source_kind": corpus.kind,
        "source_path": _source_path(corpus),
        "glob": glob if corpus.kind == "folder" else None,
        "content_hash": corpus_hash,
        "settings": settings,
    }
    _build_prepared(out_dir, documents, given or kind, vocab_size, meta, progress)
    return load_prepared(out_dir)


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
    documents: list[str],
    tokenizer: str | Tokenizer,
    vocab_size: int | None,
    meta: dict,
    progress: bool,
) -> None:
    """Train the tokenizer (unless one is given), tokenise both splits, complete `meta`
    and write the folder."""
    kind = tokenizer.kind if isinstance(tokenizer, Tokenizer) else tokenizer
    if kind == "char":
        # documents without an end-of-text token between them at least end with a newline
        documents = [doc if doc.endswith("\n") else doc + "\n" for doc in documents]
    train_docs, val_docs = split_documents(documents)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        # char: the vocabulary comes from the whole corpus so val has no unseen characters;
        # bpe: merges are learned from the training split only, so val is truly held out.
        fit_texts = documents if kind == "char" else train_docs
        tok = train_tokenizer(kind, fit_texts, vocab_size)
    dtype = token_dtype(tok.vocab_size)
    train_ids = tokenize_documents(tok, train_docs, progress, "tokenizing train")
    val_ids = tokenize_documents(tok, val_docs, progress, "tokenizing val")
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    meta.update(
        {
            "tokenizer": tok.to_json(),
            "tokenizer_kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype.name,
            "documents": len(documents),
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "characters": sum(len(doc) for doc in documents),
            "bytes": n_bytes,
            "train_tokens": int(len(train_ids)),
            "val_tokens": int(len(val_ids)),
            "bytes_per_token": n_bytes / max(1, len(train_ids) + len(val_ids)),
        }
    )
    _write_prepared(out_dir, tok, train_ids, val_ids, dtype, meta)


def _write_prepared(
    out_dir: Path,
    tok: Tokenizer,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    dtype: np.dtype,
    meta: dict,
) -> None:
    """Build the folder under a temporary name, then rename it into place in one step.

    Whatever stops it (an error, Ctrl-C) removes the temporary folder on the way out;
    only a kill leaves it, for the next prepare to clear.
    """
    tmp_dir = make_temp_dir(out_dir)
    try:
        write_tokens(tmp_dir / TRAIN_FILE, train_ids, dtype)
        write_tokens(tmp_dir / VAL_FILE, val_ids, dtype)
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
"""A temporary folder whose owner cannot be asked is stale after a day: writing one
takes seconds to minutes (everything is tokenised before it is made)."""
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
) -> PreparedData:
    """The data a resumed run was trained on, and nothing else.

    run_data is the run's config.json "prepared_data" (its folder and the corpus's
    content hash). A corpus file or folder whose content changed is refused before
    anything is written; the run's prepared folder is used when the source is gone
    (or is a built-in dataset, which a new Python may change). Relative paths are
    also looked for from the run's project, so a run resumes from another working
    directory or in a copied project. A run directory is data, not instructions: an
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
        source, tokenizer, vocab_size, data_dir, glob, progress, expected_hash=expected_hash
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


# ---------------------------------------------------------------------------- batches


class Batcher:
    """Random windows of block_size + 1 tokens: x is the first block_size, y the last (shifted by one).

    Start positions come from a `torch.Generator` seeded with `seed`; its state is
    what `state_dict()` saves, so a restored batcher yields exactly the batches the
    original would have yielded next.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
    ):
        if block_size < 1 or batch_size < 1:
            raise MinigptError(
                f"block_size and batch_size must be at least 1 (got {block_size} and {batch_size})"
            )
        check_block_size(len(tokens), block_size, "the token file")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.n_starts = len(tokens) - block_size  # window [s, s + block_size] must fit
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)  # (T + 1,)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (x, y), each int64 (batch_size, block_size); y[:, t] is the token after x[:, t]."""
        starts = torch.randint(self.n_starts, (self.batch_size,), generator=self.generator)
        index = starts.numpy()[:, None] + self._offsets  # (B, T + 1)
        window = torch.from_numpy(self.tokens[index].astype(np.int64))  # (B, T + 1), one gather
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            window = window.to(self.device)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict:
        """The generator state (a uint8 tensor): safe with torch.load(weights_only=True)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
