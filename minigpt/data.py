"""A prepared folder: what it holds, loading it checked, and finding a run's own.

`minigpt prepare` (prepare.py) writes a corpus's tokens once into

    data/<name>-<tokenizer>-<hash>/
        train.bin, val.bin   token ids, uint16 when the vocab fits, else uint32
        tokenizer.json       everything needed to encode and decode
        meta.json            tokenizer, token counts, source, content hash, sizes

`load_prepared` opens such a folder and checks it against meta.json: a folder that
is damaged (a truncated token file, an edited meta.json) is a PreparedDataDamaged,
never data, and `prepare` builds it again.

A run records its prepared folder and the corpus's content hash in config.json
("prepared_data"). `find_run_data` is the one place that finds that folder again:
train's resume, inspect-heads and eval all ask it, and each decides what to do
when it is gone (prepare the corpus again, measure on the prompt, or refuse).
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt.bpe_training import bpe_shortfall
from minigpt.errors import MinigptError, os_error
from minigpt.tokenizer import (
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerFileDamaged,
    load_tokenizer,
    tokenizer_from_json,
)

PREPARED_FORMAT = 1
"""Version of the prepared folder's layout (meta.json's "format")."""
DEFAULT_DATA_DIR = Path("data")
TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"
TOKEN_DTYPES = ("uint16", "uint32")


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

    @property
    def warnings(self) -> list[str]:
        """What a user should hear about this folder each time a command prepares or
        reuses it: a BPE that learned fewer tokens than asked (the folder keeps the asked
        size in its name, the cache key that finds it again without learning anew)."""
        settings = self.meta.get("settings")
        asked = settings.get("vocab_size") if isinstance(settings, dict) else None
        shortfall = bpe_shortfall(asked, self.vocab_size) if isinstance(asked, int) else None
        return [shortfall] if shortfall else []


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------- loading

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


# ---------------------------------------------------------------------------- a run's data


def find_run_data(
    run_data: object,
    run_dir: Path,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    *,
    tokenizer: Tokenizer | None = None,
    builtin: str | None = None,
) -> PreparedData | None:
    """The prepared folder a run was trained on, if it is still there and whole; else None.

    run_data is the run's config.json "prepared_data": the folder (`dir`) and the
    content hash of its corpus (`content_hash`). The folder is looked for where `dir`
    says, then in the run's project (see `run_data_folders`). A run directory is data,
    not instructions: a folder counts only if it is genuinely this run's data
    (`_genuine`), so an edited config.json cannot make minigpt read some other folder.
    tokenizer: the folder must have been tokenised by this very tokenizer.
    builtin: the folder must have been prepared from this built-in dataset.
    """
    content_hash = run_data.get("content_hash") if isinstance(run_data, dict) else None
    if not (isinstance(content_hash, str) and content_hash):
        return None
    for folder in run_data_folders(run_data, run_dir, data_dir):
        prepared = _genuine(folder, content_hash, tokenizer, builtin)
        if prepared is not None:
            return prepared
    return None


def run_data_folders(run_data: object, run_dir: Path, data_dir: str | Path) -> list[Path]:
    """Where a run's prepared folder may be: `dir` as config.json records it (a relative
    one from the working directory, then from the run's project), then data_dir/<its
    name> in the run's project (a project moved or copied elsewhere, with its runs)."""
    recorded = run_data.get("dir") if isinstance(run_data, dict) else None
    if not isinstance(recorded, str) or not recorded:
        return []
    projects = project_dirs(run_dir)
    recorded_path = Path(recorded)
    folders = [Path.cwd() / recorded_path, *(base / recorded_path for base in projects)]
    folders += [base / data_dir / recorded_path.name for base in projects]
    return list(dict.fromkeys(folders))  # each once, in order


def project_dirs(run_dir: Path) -> list[Path]:
    """Where a run's relative paths may start from besides the working directory: the
    folder holding the run, and the one above (checkpoints/<run> sits in a project)."""
    run_dir = run_dir.resolve()
    return [run_dir.parent, run_dir.parent.parent]


def _genuine(
    folder: Path, content_hash: str, tokenizer: Tokenizer | None, builtin: str | None
) -> PreparedData | None:
    """The prepared data in `folder` if it is the corpus with this content hash (and, where
    given, this tokenizer's tokens of this built-in dataset); else None.

    Its files must be regular files (a FIFO or a device named by a hostile config would
    block or stream forever), and `load_prepared` must accept the folder.
    """
    tokenizer_file = folder / TOKENIZER_FILE
    try:
        if not all(f.is_file() for f in (folder / META_FILE, folder / VAL_FILE)):
            return None
        if tokenizer_file.exists() and not tokenizer_file.is_file():
            return None
        prepared = load_prepared(folder)
    except (MinigptError, OSError, ValueError, KeyError, TypeError):  # damaged or not data
        return None
    meta = prepared.meta
    if meta.get("content_hash") != content_hash:
        return None
    if builtin is not None and meta.get("source") != builtin:
        return None
    if tokenizer is not None and prepared.tokenizer.to_json() != tokenizer.to_json():
        return None
    return prepared
