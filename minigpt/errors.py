"""The one exception type for bad input.

Every module raises `MinigptError` for anything a user can get wrong (a bad shape,
a missing file, an unknown config key). It is a `ValueError`, so library callers
can catch it the usual way, and it carries a hint that the CLI prints under the
message before exiting with code 2. Anything else that escapes is a bug.

Library modules speak in the library's words: an error about an argument names
it as the function does (`top_k must be at least 1`) and says which one in
`param`. The command line owns its own words and renames `param` to its option
(`--top-k must be at least 1`), so neither side has to know the other's names.
"""

import errno
import os
import re
from pathlib import Path


class MinigptError(ValueError):
    """Bad input: `str(err)` is one clear sentence, `err.hint` says what to do.

    param: the name of the argument at fault, as the library spells it, where one is.
    """

    def __init__(self, message: str, hint: str | None = None, param: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.param = param

    def renamed(self, names: dict[str, str]) -> tuple[str, str | None]:
        """(message, hint) with `param` written as names[param], e.g. top_k -> --top-k."""
        message, hint = str(self), self.hint
        if self.param in names:
            word = re.compile(rf"(?<![\w-]){re.escape(self.param)}\b")  # whole words only
            message = word.sub(names[self.param], message)
            hint = word.sub(names[self.param], hint) if hint else hint
        return message, hint


# errno -> what the user can do about it
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space (earlier files were left as they were)",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EACCES: "check the permissions of the file and its folder",
    errno.EPERM: "check the permissions of the file and its folder",
    errno.EROFS: "the filesystem is read-only: choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file should be: choose another path",
    errno.EEXIST: "something is already at that path: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def os_error(err: OSError, verb: str = "use", path: object = None) -> MinigptError:
    """An OSError (a full disk, a permission, a path under a file) as one sentence and
    a hint: these are facts about the user's machine, not bugs, so they are reported
    like bad input. `verb` says what failed ("write", "read", "create"); `path` is
    named when the error does not name a file itself."""
    filename = err.filename or path
    if err.errno in (errno.EEXIST, errno.ENOTDIR) and filename:
        a_file = file_in_path(filename)
        if a_file is not None:  # mkdir's "File exists" for a path that runs through a file
            return MinigptError(
                f"{a_file} is a file, not a folder", hint="choose another path, or move the file"
            )
    what = f" {filename}" if filename else ""
    reason = err.strerror or str(err) or type(err).__name__
    return MinigptError(
        f"cannot {verb}{what}: {reason}",
        hint=_OS_HINTS.get(err.errno or 0, "check the path and the disk"),
    )


def file_in_path(path: object) -> Path | None:
    """The first part of `path` (itself included) that exists and is not a folder, or None:
    where a folder was to be made, or looked into, and a file is in the way."""
    path = Path(os.fsdecode(path))
    for part in [*reversed(path.parents), path]:
        if os.path.lexists(part) and not part.is_dir():
            return part
    return None


def first_line(err: BaseException, limit: int = 100) -> str:
    """The first line of an exception's message (some have none), for one-line errors
    about what a library (safetensors, torch, pyarrow) could not read."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
