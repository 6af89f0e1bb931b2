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

import re


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
