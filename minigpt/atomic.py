"""Atomic writes: a crash or a kill never leaves a half-written file or folder.

Every file that matters (weights, configs, tokenizers, prepared data) is written
to a temporary name in the same folder, flushed to disk, then moved into place
with `os.replace`, which is atomic on POSIX and Windows. A reader sees either the
old file or the new one, never a mix.

A whole folder (prepared data, an imported run, an exported model) is built the
same way: in a temporary folder (`make_temp_dir`) moved into place when it is
complete (`staged_folder`), so a kill leaves the old folder or the new one. The
temporary name says which host and process own it (`.NAME.HOST.PID.RANDOM.tmp`),
so that the leftovers of a killed writer can be told from the work of a live one
and cleared (`remove_stale_temp_folders`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Collection, Iterator
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


# ---------------------------------------------------------------------------- temporary folders

STALE_AFTER_S = 24 * 3600
"""A temporary folder whose owner cannot be asked (on another host) is stale after a day
untouched: a live owner touches it more often than that while it works, however long."""
# .NAME.HOST.PID.RANDOM.tmp: the folder it stands for, its owner, 8 random hex digits;
# OLD_TEMP_NAME is the older .NAME.RANDOM.tmp of tempfile.mkdtemp, NAME ending in the 12
# hex digits of a prepared folder's key. Nothing else is touched.
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
OLD_TEMP_NAME = re.compile(r"\..+-[0-9a-f]{12}\.[a-z0-9_]{8}\.tmp")


def _host_tag() -> str:
    """This host's name with only letters, digits and '-', so the name's dots stay separators."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _temp_path(out_dir: Path, inside: bool = False) -> Path:
    """A temporary name for `out_dir`, beside it (or inside it)."""
    owner = f"{_host_tag()}.{os.getpid()}"
    name = out_dir.name or Path.cwd().name or "folder"  # "." has no name of its own
    folder = out_dir if inside else out_dir.parent
    return folder / f".{name}.{owner}.{secrets.token_hex(4)}.tmp"


def make_temp_dir(out_dir: Path, inside: bool = False) -> Path:
    """A fresh temporary folder beside `out_dir` (or inside it), named for its owner
    (see TEMP_NAME).

    Made with mkdir's mode, 0o777 less the umask, so the folder renamed into place has
    the modes of any folder (mkdtemp's would be 0o700: private to one user).
    """
    folder = out_dir if inside else out_dir.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            path = _temp_path(out_dir, inside)
            try:
                path.mkdir()
                return path
            except FileExistsError:  # 32 random bits taken already: draw again
                continue
    except OSError as err:  # named for the folder it is in, not for the hidden name it tried
        raise os_error(OSError(err.errno, err.strerror), "write in", folder) from None


@contextmanager
def staged_folder(
    out_dir: Path, replaces: Collection[str] = (), last: str | None = None
) -> Iterator[Path]:
    """Yield an empty folder to write `out_dir`'s files in; on success they replace it.

    A new out_dir is staged beside it and renamed into place in one step. An existing
    one (a folder being replaced, or a mount point, whose parent is another filesystem)
    is staged inside it, so that every move stays on its filesystem: each file is moved
    in with os.replace, `last` (the file that says the folder is complete) removed first
    and moved in last, then the files named in `replaces` that this write did not make
    are removed (an earlier write's, which would pair with the new ones). The stale
    staging folders of killed writers are cleared first. On any exception the staging
    folder goes and out_dir is left as it was.
    """
    out_dir = Path(out_dir)
    inside = out_dir.is_dir()
    remove_stale_temp_folders(out_dir if inside else out_dir.parent)
    staging = make_temp_dir(out_dir, inside)
    try:
        yield staging
        try:
            if inside:
                _move_files_in(staging, out_dir, replaces, last)
            else:
                os.rename(staging, out_dir)
        except OSError as err:
            raise os_error(err, "write", out_dir) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_files_in(staging: Path, out_dir: Path, replaces: Collection[str], last: str | None):
    """Swap the staged files in for out_dir's old ones with renames only: the old files
    go into the staging folder (`last` first, so that the folder reads as incomplete
    until the new one is in), the new ones come out of it (`last` last), and the old
    ones are deleted with it afterwards. A delete frees the file's blocks, which takes a
    while for a large one; a rename does not, so the swap is over in an instant."""
    made = sorted(os.listdir(staging), key=lambda name: name == last)
    old = [name for name in {*made, *replaces} if (out_dir / name).is_file()]
    old.sort(key=lambda name: name != last)
    replaced = staging / ".replaced"
    replaced.mkdir()
    for name in old:
        os.replace(out_dir / name, replaced / name)
    for name in made:
        os.replace(staging / name, out_dir / name)


@contextmanager
def no_empty_folders_left(folder: Path) -> Iterator[None]:
    """On an exception, remove the folders down to `folder` that the block made and left
    empty: a refused or stopped command leaves no trace, not even an empty --data-dir."""
    missing = [path for path in [Path(folder), *Path(folder).parents] if not path.exists()]
    try:
        yield
    except BaseException:
        for path in missing:  # the deepest first; one still holding something stays
            try:
                path.rmdir()
            except OSError:
                break
        raise


def out_path(text: str, option: str, example: str = "runs/NAME") -> Path:
    """The folder an output option names; an empty one is refused (Path("") would be
    the current folder, and a command would write into wherever it was started)."""
    if not text.strip():
        raise MinigptError(
            f"{option} must not be empty", hint=f"name a folder, e.g. {option} {example}"
        )
    return Path(text)


def remove_stale_temp_folders(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary folders that killed writers left in `folder`; returns them.

    One made on this host by a process that is gone is stale at once; one whose owner
    cannot be asked (another host, or an older name without a pid) after STALE_AFTER_S.
    """
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or one that cannot be listed: nothing to clear
        return []
    stale = [Path(entry.path) for entry in entries if _is_stale_temp(entry, now)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def remove_leftovers(folder: Path) -> None:
    """What killed writers left in `folder`, for the one process that holds its lock (no
    one else writes there): every temporary file of atomic_path, and the stale temporary
    folders."""
    for leftover in folder.glob(".*.tmp"):
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink(missing_ok=True)
    remove_stale_temp_folders(folder)


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


def discard(path: Path) -> None:
    """Remove a folder (or a link or file in its place); an OSError says why it cannot be.

    A folder is renamed to a temporary name first, so it vanishes in one step: a kill
    while it is being deleted leaves a temporary folder, never a half-deleted one.
    """
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # a link's target is not ours to delete
            return
        doomed = _temp_path(path)
        os.rename(path, doomed)
    except FileNotFoundError:  # someone else removed it first
        return
    shutil.rmtree(doomed, ignore_errors=True)
