"""The built-in corpora, chosen by name where a file or folder could be given.

    pystdlib     the .py sources of this Python's standard library (no download)
    shakespeare  tiny shakespeare, downloaded once into the data folder, checksum verified
    induction    generated lines with a repeated random segment, for induction heads

`load_source` is what `minigpt prepare SOURCE` and `minigpt eval --data SOURCE` read:
a built-in dataset's documents are made in memory; anything else is a file or a
folder, read by corpus.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import string
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from minigpt.atomic import atomic_path
from minigpt.console import progress_bar
from minigpt.corpus import AUTO_GLOB, DEFAULT_FIELD, Corpus, load_corpus, read_text
from minigpt.errors import MinigptError
from minigpt.signals import check

DEFAULT_SOURCE = "pystdlib"


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
                progress_bar(total=total, desc="tiny shakespeare", show=progress, in_bytes=True) as bar,
            ):
                while chunk := response.read(1 << 16):
                    check()  # a signal stops the download between two chunks
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


def load_source(
    source: str | Path = DEFAULT_SOURCE,
    data_dir: Path = Path("data"),
    glob: str = AUTO_GLOB,
    progress: bool = True,
    text_field: str = DEFAULT_FIELD,
) -> Corpus:
    """Find a source: a built-in dataset name (these win over same-named paths), a file,
    or a folder. Reads nothing but a built-in dataset (which is made in memory) and the
    folder's listing: `Corpus.documents()` reads the text."""
    text = str(source)
    if text in BUILTIN_DATASETS:
        texts = BUILTIN_DATASETS[text].documents(Path(data_dir), progress)
        return Corpus(text, text, "builtin", texts=texts, n_bytes=sum(map(len, texts)))
    return load_corpus(source, glob, text_field, dataset_names=list(BUILTIN_DATASETS))
