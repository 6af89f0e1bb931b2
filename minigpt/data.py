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
never leaves a half-prepared folder that a later run would trust.

Text must be UTF-8: a file that is not (or that holds NUL bytes, i.e. binary) is
refused with the file and byte offset named, rather than silently corrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minigpt.atomic import atomic_path, write_json_atomic
from minigpt.errors import MinigptError
from minigpt.tokenizer import (
    TOKENIZER_FILE,
    Tokenizer,
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


def read_text(path: Path) -> str:
    """Read a UTF-8 text file; refuse binary or non-UTF-8 files in one sentence."""
    raw = Path(path).read_bytes()
    if b"\x00" in raw:
        raise MinigptError(
            f"{path} looks binary (it has NUL bytes), not text",
            hint="point minigpt at text files, or narrow the folder with glob",
            param="glob",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MinigptError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
            hint="convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out with glob",
            param="glob",
        ) from None


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
    path = Path(source).expanduser()
    if path.is_file():
        return Corpus(_slug(path.stem), str(path), "file", [read_text(path)])
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob(glob) if p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise MinigptError(
                f"the folder {path} has no files matching {glob!r}",
                hint="choose the files with glob, e.g. glob '*.py'",
                param="glob",
            )
        documents = [
            read_text(p)
            for p in tqdm(files, desc="reading", disable=not progress or len(files) < 200)
        ]
        return Corpus(_slug(path.resolve().name), str(path), "folder", documents)
    names = ", ".join(BUILTIN_DATASETS)
    raise MinigptError(
        f"no file, folder or built-in dataset named {text!r}",
        hint=f"give a path to a text file or folder, or one of the built-in datasets: {names}",
    )


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
    tokenizer: str = "char",
    vocab_size: int | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    glob: str = "*.txt",
    progress: bool = True,
) -> PreparedData:
    """Tokenise `source` once into data_dir/<name>-<tokenizer>-<hash>/, or reuse that folder.

    `source` is a built-in dataset name, a text file or a folder (read with `glob`);
    None means the default, pystdlib. Raises MinigptError for bad input, before
    anything is written.
    """
    data_dir = Path(data_dir)
    source = DEFAULT_SOURCE if source is None else source
    vocab_size = check_tokenizer_settings(tokenizer, vocab_size)
    corpus = load_corpus(source, data_dir, glob, progress)
    documents = [doc for doc in corpus.documents if doc]  # an empty file adds nothing
    if not documents:
        raise MinigptError(
            f"the corpus {corpus.source} is empty", hint="give it some text to learn from"
        )
    corpus_hash = content_hash(documents)
    settings = {
        "format": PREPARED_FORMAT,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "val_fraction": VAL_FRACTION,
    }
    key = hashlib.sha256((corpus_hash + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    tag = tokenizer if vocab_size is None else f"{tokenizer}{vocab_size}"
    out_dir = data_dir / f"{corpus.name}-{tag}-{key[:12]}"
    if (out_dir / META_FILE).exists():
        return load_prepared(out_dir, reused=True)

    if tokenizer == "char":
        # documents without an end-of-text token between them at least end with a newline
        documents = [doc if doc.endswith("\n") else doc + "\n" for doc in documents]
    train_docs, val_docs = split_documents(documents)
    # char: the vocabulary comes from the whole corpus so val has no unseen characters;
    # bpe: merges are learned from the training split only, so val is truly held out.
    fit_texts = documents if tokenizer == "char" else train_docs
    tok = train_tokenizer(tokenizer, fit_texts, vocab_size)
    dtype = token_dtype(tok.vocab_size)
    train_ids = tokenize_documents(tok, train_docs, progress, "tokenizing train")
    val_ids = tokenize_documents(tok, val_docs, progress, "tokenizing val")

    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    meta = {
        "format": PREPARED_FORMAT,
        "source": corpus.source,
        "source_kind": corpus.kind,
        "glob": glob if corpus.kind == "folder" else None,
        "content_hash": corpus_hash,
        "settings": settings,
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
    _write_prepared(out_dir, tok, train_ids, val_ids, dtype, meta)
    return load_prepared(out_dir)


def _write_prepared(
    out_dir: Path,
    tok: Tokenizer,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    dtype: np.dtype,
    meta: dict,
) -> None:
    """Build the folder under a temporary name, then rename it into place in one step."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        write_tokens(tmp_dir / TRAIN_FILE, train_ids, dtype)
        write_tokens(tmp_dir / VAL_FILE, val_ids, dtype)
        save_tokenizer(tok, tmp_dir / TOKENIZER_FILE)
        write_json_atomic(tmp_dir / META_FILE, meta)  # last: its presence marks a complete folder
        if out_dir.exists():  # a leftover without meta.json, or another process won the race
            if (out_dir / META_FILE).exists():
                return
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not (out_dir / META_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_prepared(directory: str | Path, reused: bool = False) -> PreparedData:
    """Open a prepared folder (as written by `prepare`)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinigptError(
            f"{directory} is not prepared data (no {META_FILE})",
            hint="run `minigpt prepare` on the corpus first",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MinigptError(
            f"{directory / META_FILE} is damaged", hint="delete the folder and prepare again"
        ) from None
    tokenizer_path = directory / TOKENIZER_FILE
    tok = (
        load_tokenizer(tokenizer_path)
        if tokenizer_path.exists()
        else tokenizer_from_json(meta["tokenizer"])
    )
    return PreparedData(
        dir=directory,
        train_path=directory / TRAIN_FILE,
        val_path=directory / VAL_FILE,
        meta=meta,
        tokenizer=tok,
        dtype=np.dtype(meta["dtype"]),
        reused=reused,
    )


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
