"""The one exception type for bad input.

Every module raises `MinigptError` for anything a user can get wrong (a bad shape,
a missing file, an unknown config key). It is a `ValueError`, so library callers
can catch it the usual way, and it carries a hint that the CLI prints under the
message before exiting with code 2. Anything else that escapes is a bug.
"""


class MinigptError(ValueError):
    """Bad input: `str(err)` is one clear sentence, `err.hint` says what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint
