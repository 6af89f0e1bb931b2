"""Prompts read from files: `--prompt-file` (the whole file is one prompt) and
`--prompts-file` (one prompt a line, for `generate` to sample as one batch).

A prompts file is read the way corpus.py reads text: UTF-8 only, a UTF-16 or binary
file named as what it is. Its format follows its name:

    prompts.jsonl       one prompt a line: a JSON string, or an object with a "prompt" string
    any other name      one prompt a line, as it is (a trailing "\\r" of a Windows line dropped)

Blank lines are skipped, so a trailing newline is not a prompt; a JSON line can still
hold a prompt with newlines in it ("a\\nb"), or the empty prompt (""), which starts
where a new document would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from minigpt.corpus import refuse_wide_or_binary
from minigpt.errors import MinigptError

MAX_PROMPTS = 10_000
"""Prompts one file may hold: more is a corpus given by mistake, not a batch."""
MAX_PROMPTS_BYTES = 64 << 20
"""A prompts file's size at most: read whole, so it is bounded before it is read."""


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


def one_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """generate's prompt: --prompt or --prompt-file (not both); '' when neither is given."""
    if prompt is not None and prompt_file is not None:
        raise MinigptError(
            "--prompt and --prompt-file were both given", hint="pass the prompt one way"
        )
    prompts = read_prompts(
        [prompt] if prompt is not None else [], [prompt_file] if prompt_file is not None else []
    )
    return prompts[0] if prompts else ""


def batch_prompts(
    prompts_file: str | None, others: dict[str, object], num_samples: int, use_kv_cache: bool
) -> list[str] | None:
    """--prompts-file's prompts (None without it), once the options it excludes are
    refused: others maps each such option to its value (None or False: not given)."""
    if prompts_file is None:
        return None
    given = [option for option, value in others.items() if value not in (None, False)]
    if given:
        raise MinigptError(
            f"--prompts-file and {given[0]} were both given",
            hint=f"--prompts-file reads every prompt from the file: leave out {given[0]}",
        )
    if num_samples > 1:
        raise MinigptError(
            "--num-samples does not apply to --prompts-file: each prompt gets one sample",
            hint="repeat a prompt in the file for more samples of it (each line has its own seed)",
        )
    if not use_kv_cache:
        raise MinigptError(
            "--no-kv-cache does not apply to --prompts-file, which decodes every prompt as"
            " one batch in the KV cache",
            hint="leave out --no-kv-cache",
        )
    return read_prompts_file(prompts_file)


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of a prompts file, in file order (see the module docstring); any
    fault is one sentence naming the file (and the line), with param "prompts_file"."""
    path = Path(path)
    text = _prompts_text(path, _prompts_bytes(path))
    jsonl = path.suffix == ".jsonl"
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if len(prompts) == MAX_PROMPTS:
            raise _refused(
                path, f"holds more than {MAX_PROMPTS:,} prompts", "split it into several files"
            )
        prompts.append(_json_prompt(path, number, line) if jsonl else line)
    if not prompts:
        hint = 'one JSON string or {"prompt": ...} a line' if jsonl else "one prompt a line"
        raise _refused(path, "holds no prompts (it is empty or blank)", f"write {hint}")
    return prompts


def _refused(path: Path, problem: str, hint: str) -> MinigptError:
    return MinigptError(f"prompts_file {path} {problem}", hint=hint, param="prompts_file")


def _prompts_bytes(path: Path) -> bytes:
    """The file's bytes, read at most MAX_PROMPTS_BYTES (+1, to know it is larger)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPTS_BYTES + 1)
    except FileNotFoundError:
        raise _refused(path, "does not exist", "check the path") from None
    except IsADirectoryError:
        raise _refused(path, "is a folder", "give a text file with one prompt a line") from None
    except OSError as err:  # a permission, a path through a file
        reason = err.strerror or type(err).__name__
        hint = "check the path and its permissions"
        raise _refused(path, f"cannot be read ({reason})", hint) from None
    if len(raw) > MAX_PROMPTS_BYTES:
        raise _refused(
            path, f"is larger than {MAX_PROMPTS_BYTES >> 20} MiB", "split it into several files"
        )
    return raw


def _prompts_text(path: Path, raw: bytes) -> str:
    """raw as UTF-8 (a leading byte-order mark dropped), checked as corpus.py checks text."""
    try:
        refuse_wide_or_binary(path, raw, len(raw))
    except MinigptError as err:  # its hint is a corpus's: say what to do with a prompts file
        raise MinigptError(
            f"prompts_file {err}", hint="save it as UTF-8 text", param="prompts_file"
        ) from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise _refused(
            path,
            f"line {line} is not UTF-8 (byte 0x{raw[err.start]:02x})",
            "save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`",
        ) from None


def _json_prompt(path: Path, number: int, line: str) -> str:
    """A .jsonl line's prompt: a JSON string, or an object's "prompt" string."""
    hint = 'write one JSON string or {"prompt": "..."} a line'
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise _refused(path, f"line {number} is not JSON ({err})", hint) from None
    if isinstance(record, dict):
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            keys = ", ".join(map(repr, list(record)[:8])) or "none"
            raise _refused(path, f'line {number} has no "prompt" string (its keys: {keys})', hint)
    elif isinstance(record, str):
        prompt = record
    else:
        raise _refused(path, f"line {number} is JSON but neither a string nor an object", hint)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800-\udfff) is no character
        problem = f"line {number} holds an unpaired UTF-16 surrogate escape, which is no character"
        raise _refused(path, problem, "fix or drop that line") from None
    return prompt
