"""Atomic file writes: a crash or a kill never leaves a half-written file.

Every file that matters (weights, configs, tokenizers, prepared data) is written
to a temporary name in the same folder, flushed to disk, then moved into place
with `os.replace`, which is atomic on POSIX and Windows. A reader sees either the
old file or the new one, never a mix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minigpt.errors import MinigptError, os_error


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`.

    On any exception (KeyboardInterrupt included) the temporary file is removed
    and `path` is left as it was. A write the machine refuses (a full disk, a
    read-only folder, a path under a file) becomes a MinigptError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise os_error(err, "write", path) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600), and some writers (safetensors) create
        # the file anew with that mode: give it the mode a plain open() would
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None and _disk_full(err, path.parent):  # numpy: "N requested and M written"
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        raise os_error(err, "write", path) from err
    except Exception as err:
        # torch.save and safetensors report a full disk as their own errors
        if not isinstance(err, MinigptError) and _disk_full(err, path.parent):
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise os_error(full, "write") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _disk_full(err: Exception, folder: Path, margin: int = 1 << 20) -> bool:
    """Whether a failed write failed for want of space: the error says so (as
    safetensors does, "os error 28"), or the disk is all but full."""
    if "No space left" in str(err) or "os error 28" in str(err):
        return True
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
