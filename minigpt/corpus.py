"""Corpora: reading the documents of a file or a folder one at a time.

A source is a file or a folder (or a built-in dataset name, see datasets.py). A
folder is every file under it matching a glob, recursively, in sorted order. The
default glob, "auto", takes the folder's .txt, .jsonl or .parquet files, whichever
one kind it has. Each format gives documents:

    .txt (or any other name)  one document per file
    .jsonl                    one document per line: a JSON object's "text" field
    .parquet                  one document per row: the "text" column (needs pyarrow)

(`text_field` names another field or column.) `Corpus.documents()` yields them one at a
time, so a corpus of any size streams through `prepare` in bounded memory: a text
file larger than PIECE_BYTES comes as a `LargeDocument`, its text in pieces.

Text must be UTF-8: a file that is not (or that holds NUL bytes, i.e. binary, or
is UTF-16) is refused with the file and byte offset named, rather than silently
corrupted.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from minigpt.errors import MinigptError, first_line, os_error

AUTO_GLOB = "auto"
"""A folder's default glob: its .txt, .jsonl or .parquet files, whichever one kind it has."""
DEFAULT_FIELD = "text"
TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
FORMAT_SUFFIXES = {".txt": TEXT, ".jsonl": JSONL, ".parquet": PARQUET}
"""The suffixes "auto" looks for; any other file is read as text."""
PIECE_BYTES = 8 << 20
"""A text file larger than this is read, checked and decoded in pieces of this size."""

# ---------------------------------------------------------------------------- checking text


# UTF-32's little-endian mark begins with UTF-16's, so it is looked for first
WIDE_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def read_text(path: Path) -> str:
    """Read a UTF-8 text file whole; refuse unreadable, binary, UTF-16 or non-UTF-8 files
    in one sentence.

    A UTF-8 byte-order mark is UTF-8 and stays in the text, as a plain decode keeps it.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:  # permission denied, vanished since it was listed
        raise os_error(err, "read", path) from None
    refuse_wide_or_binary(path, raw, len(raw))
    return _decode(path, raw, 0)


def _decode(path: Path, raw: bytes, offset: int) -> str:
    """raw as UTF-8; `offset` is where raw starts in the file, for the error's byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MinigptError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{offset + err.start})",
            hint="convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out with glob",
            param="glob",
        ) from None


def refuse_wide_or_binary(path: Path, head: bytes, size: int) -> None:
    """UTF-16 and UTF-32 text, and binary files, named as what they are, from the first
    bytes of a file of `size` bytes."""
    wide = _wide_encoding(head, size)
    if wide is not None:
        encoding, evidence = wide
        raise MinigptError(
            f"{path} looks like {encoding} text ({evidence}), not UTF-8",
            hint=f"convert it, e.g. `iconv -f {encoding.lower()} -t utf-8`, "
            "or leave it out with glob",
            param="glob",
        )
    _refuse_nul(path, head, 0)


def _refuse_nul(path: Path, raw: bytes, offset: int) -> None:
    nul = raw.find(b"\x00")
    if nul != -1:
        raise MinigptError(
            f"{path} looks binary (it has a NUL byte at offset {offset + nul}), not text",
            hint="point minigpt at text files, or narrow the folder with glob",
            param="glob",
        )


def _wide_encoding(head: bytes, size: int) -> tuple[str, str] | None:
    """(encoding, what gives it away) when a file that starts with `head` looks like
    UTF-16 or UTF-32 text."""
    for mark, encoding in WIDE_BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return encoding, "it starts with a byte-order mark"
    # without a mark, ASCII written as UTF-16 has a NUL in every pair, and only there
    sample = head[:4096]
    if len(sample) < 8 or size % 2:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) == len(odd) and 0 not in even:
        return "UTF-16LE", "every other byte is NUL"
    if even.count(0) == len(even) and 0 not in odd:
        return "UTF-16BE", "every other byte is NUL"
    return None


def _utf8_complete(raw: bytes) -> int:
    """The length of raw's prefix that ends on a whole UTF-8 character: a piece cut
    from a file may end inside one (at most 3 of its bytes), to be joined to the next."""
    start = len(raw) - 1
    while start >= max(0, len(raw) - 4) and raw[start] & 0xC0 == 0x80:  # continuation bytes
        start -= 1
    if start < 0:
        return len(raw)
    lead = raw[start]
    needed = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 1
    return start if len(raw) - start < needed else len(raw)


# ---------------------------------------------------------------------------- documents


@dataclass
class LargeDocument:
    """A document too large to hold twice: its UTF-8 size (known before its text, so
    the content hash can begin), and its text in pieces: read them, in order, before
    asking for the next document (the file closes then)."""

    n_bytes: int
    pieces: Iterator[str]


Document = str | LargeDocument
"""A document is its text, or a LargeDocument read in pieces."""
OnBytes = Callable[[int], object]
"""Told how many bytes of the source were just read: progress bars count them."""


def _ignore(n_bytes: int) -> None:
    pass


@dataclass
class Corpus:
    """A source, named, with what reading it takes; `documents()` reads it."""

    name: str  # short, for the prepared folder's name
    source: str  # what the user asked for, as they would write it again
    kind: str  # "builtin", "file" or "folder"
    path: Path | None = None  # absolute and resolved, for a file or folder: found from anywhere
    files: list[Path] = field(default_factory=list)  # what is read, in order
    format: str = TEXT  # of every file: text, jsonl or parquet
    text_field: str = DEFAULT_FIELD  # the field (jsonl) or column (parquet) of the text
    glob: str | None = None  # a folder's glob, as resolved ("auto" becomes "*.jsonl", ...)
    texts: list[str] | None = None  # documents held in memory (a built-in dataset's)
    n_bytes: int = 0  # the size of what is read: files on disk, or the texts

    def documents(self, on_bytes: OnBytes = _ignore) -> Iterator[Document]:
        """Every document in order, empty ones included (they add nothing to a corpus)."""
        if self.texts is not None:
            for text in self.texts:
                on_bytes(len(text))  # near enough for a progress bar, without encoding twice
                yield text
            return
        read = {TEXT: _text_documents, JSONL: _jsonl_documents, PARQUET: _parquet_documents}
        for path in self.files:
            yield from read[self.format](path, self.text_field, on_bytes)


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as err:  # permission denied, vanished since it was listed
        raise os_error(err, "read", path) from None


def _text_documents(path: Path, field: str, on_bytes: OnBytes) -> Iterator[Document]:
    """A text file is one document: read whole, or in pieces when it is large."""
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size <= PIECE_BYTES:
            raw = _read(f, path)
            refuse_wide_or_binary(path, raw, len(raw))
            on_bytes(len(raw))
            yield _decode(path, raw, 0)
        else:
            yield LargeDocument(size, _text_pieces(f, path, size, on_bytes))


def _read(f, path: Path, n: int = -1) -> bytes:
    try:
        return f.read(n)
    except OSError as err:  # an I/O error, a folder in the file's place
        raise os_error(err, "read", path) from None


def _text_pieces(f, path: Path, size: int, on_bytes: OnBytes) -> Iterator[str]:
    """A large file's text, PIECE_BYTES at a time, checked as read_text checks a whole file.
    A character cut by a piece's end waits for the next piece."""
    offset, carry = 0, b""
    while block := _read(f, path, PIECE_BYTES):
        if offset == 0:
            refuse_wide_or_binary(path, block, size)
        else:
            _refuse_nul(path, block, offset)
        on_bytes(len(block))
        raw = carry + block
        whole = _utf8_complete(raw)
        text = _decode(path, raw[:whole], offset - len(carry))
        carry, offset = raw[whole:], offset + len(block)
        if text:  # a piece of a character's bytes alone waits for the rest
            yield text
    if carry:  # the file ends inside a character
        _decode(path, carry, offset - len(carry))
    if offset != size:
        raise MinigptError(
            f"{path} changed size while it was being read ({size:,} bytes, then {offset:,})",
            hint="prepare it again once nothing is writing to it",
        )


# a JSON escape of a UTF-16 surrogate, the one way a JSON string can hold what is not text
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _jsonl_documents(path: Path, field: str, on_bytes: OnBytes) -> Iterator[Document]:
    """One document per line: the `field` of the JSON object on it. Blank lines are skipped."""
    with _open(path) as f:
        offset = 0
        for number, line in enumerate(f, 1):
            on_bytes(len(line))
            if line.strip():
                text = _jsonl_text(path, number, _decode(path, line, offset), field)
                if SURROGATE_ESCAPE.search(line):  # rare: only then is encoding it worth it
                    _refuse_surrogates(path, number, field, text)
                yield text
            offset += len(line)


def _jsonl_text(path: Path, number: int, line: str, field: str) -> str:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise MinigptError(
            f"{where} is not JSON ({err})",
            hint="a .jsonl file holds one JSON object per line",
        ) from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(repr, list(record)[:8])) if isinstance(record, dict) else None
        has = f"its keys: {keys}" if keys else "it is not an object with fields"
        raise MinigptError(
            f"{where} has no {field!r} field ({has})",
            hint="name the field that holds the text with text_field, e.g. text_field content",
            param="text_field",
        )
    text = record[field]
    if not isinstance(text, str):
        raise MinigptError(
            f"{where}: its {field!r} field is {type(text).__name__}, not text",
            hint="name the field that holds the text with text_field",
            param="text_field",
        )
    return text


def _refuse_surrogates(path: Path, number: int, field: str, text: str) -> None:
    try:
        text.encode("utf-8")
        return  # escapes of a pair, which JSON joins into one character
    except UnicodeEncodeError:
        pass
    raise MinigptError(
        f"{path} line {number}: its {field!r} field holds an unpaired UTF-16 surrogate "
        "escape (\\ud800-\\udfff), which is no character",
        hint="fix or drop that line; the text cannot be written as UTF-8",
    )


PARQUET_BATCH_ROWS = 1024
"""Rows read from a Parquet file at a time: memory holds one batch, not the file."""


def _parquet_documents(path: Path, field: str, on_bytes: OnBytes) -> Iterator[Document]:
    """One document per row: the `field` column, read a batch of rows at a time.
    An empty string is an empty document, as an empty file is; a null is refused, as
    JSONL refuses a field that is not text: it is a missing document, not an empty one."""
    parquet = _pyarrow_parquet()
    try:
        table = parquet.ParquetFile(path)
    except Exception as err:  # pyarrow's ArrowInvalid, ArrowIOError, OSError
        raise MinigptError(
            f"{path} is not a Parquet file pyarrow can read ({first_line(err)})",
            hint="check the file, or leave it out with glob",
            param="glob",
        ) from None
    _check_parquet_column(path, table.schema_arrow, field)
    n_rows, size = max(1, table.metadata.num_rows), path.stat().st_size
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        on_bytes(size * batch.num_rows // n_rows)
        for text in batch.column(0).to_pylist():  # a dictionary column gives its values
            if text is None:
                raise MinigptError(
                    f"{path} row {row:,} (counting from 0): its {field!r} column is null, "
                    "not text",
                    hint="fill or drop that row; an empty string is an empty document",
                )
            row += 1
            yield text


def _pyarrow_parquet():
    try:
        import pyarrow.parquet
    except ImportError:
        raise MinigptError(
            "reading .parquet files needs pyarrow, which is not installed",
            hint='install it with `pip install "minigpt[parquet]"` (or `pip install pyarrow`)',
        ) from None
    return pyarrow.parquet


_ARROW_TEXT_TYPES = ("is_string", "is_large_string", "is_string_view")


def _check_parquet_column(path: Path, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        columns = ", ".join(map(repr, schema.names[:8]))
        raise MinigptError(
            f"{path} has no {field!r} column (its columns: {columns})",
            hint="name the column that holds the text with text_field, e.g. text_field content",
            param="text_field",
        )
    kind = schema.field(field).type
    # a dictionary of strings (as FineWeb-style writers store repeated values) is text too
    values = kind.value_type if pa.types.is_dictionary(kind) else kind
    # pyarrow's string_view is new: an older pyarrow has no test for it, nor such columns
    if not any(getattr(pa.types, name, lambda _: False)(values) for name in _ARROW_TEXT_TYPES):
        raise MinigptError(
            f"{path}'s {field!r} column holds {kind}, not text",
            hint="name the column that holds the text with text_field",
            param="text_field",
        )


# ---------------------------------------------------------------------------- sources


def load_corpus(
    source: str | Path,
    glob: str = AUTO_GLOB,
    text_field: str = DEFAULT_FIELD,
    dataset_names: Sequence[str] = (),
) -> Corpus:
    """Find a file or a folder. Reads nothing but the folder's listing:
    `Corpus.documents()` reads the text. `dataset_names` are the built-in datasets (see
    datasets.py) that an error offers when `source` names nothing."""
    text = str(source)
    check_text_field(text_field)
    if not text:  # Path("") is the working directory, which nobody means by it
        raise _no_source(text, None, dataset_names)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~someone" with no such user: a plain name, then
        path = Path(text)
    mode = _source_mode(path)
    if mode is None:
        raise _no_source(text, path, dataset_names)
    if stat.S_ISREG(mode):
        files, fmt = [path], FORMAT_SUFFIXES.get(path.suffix, TEXT)
        name, kind, glob = path.stem, "file", None
    elif stat.S_ISDIR(mode):
        files, fmt, glob = _list_folder(path, glob)
        name, kind = path.resolve().name, "folder"
    else:
        raise MinigptError(
            f"{path} is neither a text file nor a folder (a pipe, a socket or a device?)",
            hint="save the text to a file and give that file",
        )
    if fmt == PARQUET:
        _pyarrow_parquet()  # missing is one sentence now, not after a long listing
    return Corpus(
        _slug(name),
        str(path),
        kind,
        path.resolve(),
        files,
        fmt,
        text_field,
        glob,
        n_bytes=_size(files),
    )


def check_text_field(text_field: str) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise MinigptError(
            f"text_field {text_field!r} is empty",
            hint="name the JSONL field or Parquet column that holds the text, e.g. text",
            param="text_field",
        )


def _size(files: list[Path]) -> int:
    total = 0
    for path in files:
        try:
            total += path.stat().st_size
        except OSError:  # reading it will say why
            pass
    return total


def _source_mode(path: Path) -> int | None:
    """st_mode of what `path` leads to, None where nothing is; a path that cannot be
    followed (permission denied, a loop of links) is an error."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in it
        return None
    except OSError as err:
        raise os_error(err, "read", path) from None


def _no_source(text: str, path: Path | None, dataset_names: Sequence[str]) -> MinigptError:
    if path is not None and path.is_symlink():
        return MinigptError(
            f"{path} is a symbolic link to {os.readlink(path)}, which does not exist",
            hint="point the link at a text file or folder, or give the file itself",
        )
    names = ", ".join(dataset_names)
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


def _list_folder(path: Path, glob: str) -> tuple[list[Path], str, str]:
    """(files, their format, the glob that chose them): every file under `path` matching
    `glob` (recursively), sorted by relative path, all of one format."""
    check_glob(glob)
    if glob == AUTO_GLOB:
        return _auto_files(path)
    files = _matching(path, glob)
    if not files:
        raise MinigptError(
            f"the folder {path} has no files matching {glob!r}",
            hint="choose the files with glob, e.g. glob '*.py'",
            param="glob",
        )
    formats = sorted({FORMAT_SUFFIXES.get(p.suffix, TEXT) for p in files})
    if len(formats) > 1:
        raise MinigptError(
            f"glob {glob!r} selects {' and '.join(formats)} files in {path}; a corpus is one kind",
            hint="choose one kind with glob, e.g. glob '*.jsonl'",
            param="glob",
        )
    return files, formats[0], glob


def _auto_files(path: Path) -> tuple[list[Path], str, str]:
    """The folder's .txt, .jsonl or .parquet files, whichever one kind it has."""
    found = {fmt: [] for fmt in FORMAT_SUFFIXES.values()}
    for file in _matching(path, "*"):
        if file.suffix in FORMAT_SUFFIXES:
            found[FORMAT_SUFFIXES[file.suffix]].append(file)
    kinds = [suffix for suffix, fmt in FORMAT_SUFFIXES.items() if found[fmt]]
    if len(kinds) > 1:
        raise MinigptError(
            f"the folder {path} has {' and '.join(kinds)} files; a corpus is one kind",
            hint=f"choose one kind with glob, e.g. glob '*{kinds[-1]}'",
            param="glob",
        )
    if not kinds:
        raise MinigptError(
            f"the folder {path} has no .txt, .jsonl or .parquet files",
            hint="choose the files with glob, e.g. glob '*.py'",
            param="glob",
        )
    return found[FORMAT_SUFFIXES[kinds[0]]], FORMAT_SUFFIXES[kinds[0]], f"*{kinds[0]}"


def _matching(path: Path, glob: str) -> list[Path]:
    try:
        return sorted(
            (p for p in path.rglob(glob) if _is_regular_file(p)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
    except (NotImplementedError, ValueError) as err:  # pathlib refuses the pattern
        raise MinigptError(
            f"glob {glob!r} is not a pattern minigpt can use ({err})",
            hint="use a pattern relative to the folder, e.g. glob '*.txt' or '**/*.md'",
            param="glob",
        ) from None


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


class ContentHash:
    """sha256 over the documents, each length-prefixed so boundaries count; fed as they
    stream past (`begin` a document with its UTF-8 size, then `update` with its bytes)."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def begin(self, n_bytes: int) -> None:
        self._sha.update(n_bytes.to_bytes(8, "little"))

    def update(self, raw: bytes) -> None:
        self._sha.update(raw)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def content_hash(documents: Iterable[str]) -> str:
    """The content hash of documents held in memory."""
    hasher = ContentHash()
    for doc in documents:
        raw = doc.encode("utf-8")
        hasher.begin(len(raw))
        hasher.update(raw)
    return hasher.hexdigest()
