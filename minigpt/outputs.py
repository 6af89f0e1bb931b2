"""The folders commands write: what a folder holds, and which folder a command may
write or replace.

`train` and `import` write a minigpt run, `export` a Hugging Face folder, and each
is given an --out that may already hold something. One check (`check_output`) decides
for all three, in this order:

    a file, or a path through a file         refused
    the command's own source                 refused, even with --force
    a folder of the other kind               refused, even with --force: export would
                                             destroy a run, import and train a
                                             Hugging Face checkpoint
    files of the kind the command writes     refused without --force; with it, replaced

A folder's kind is read from its config.json: a run's has a format_version, a
Hugging Face checkpoint's a model_type. A run writes config.json last, so a run's
own files without one are a write that was stopped (PARTIAL_RUN).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

from minigpt.checkpoint import (
    CONFIG_FILE,
    LAST_WEIGHTS,
    LOCK_FILE,
    METRICS_FILE,
    REPLACED_FILES,
    RUN_FILES,
    TRAINER_STATE,
)
from minigpt.errors import MinigptError, file_in_path
from minigpt.tokenizer import TOKENIZER_FILE

RUN, HF_CHECKPOINT, PARTIAL_RUN = "run", "hf", "partial"
"""What a folder holds (`folder_kind`)."""
_KIND_WORDS = {
    RUN: "a minigpt run",
    HF_CHECKPOINT: "a Hugging Face checkpoint",
    PARTIAL_RUN: f"an incomplete minigpt run (no {CONFIG_FILE})",
}
_WRITES_WORDS = {RUN: "a minigpt run", HF_CHECKPOINT: "a Hugging Face folder"}
_FOREIGN = {RUN: (HF_CHECKPOINT,), HF_CHECKPOINT: (RUN, PARTIAL_RUN)}
"""For each kind a command writes, the kinds of folder it would destroy."""
_SOURCE_OF = {"train": "fine-tune"}  # the only train that has a source: --init-from


def folder_kind(folder: str | Path) -> str | None:
    """What `folder` holds: RUN (config.json with a run format version), HF_CHECKPOINT
    (config.json naming a model_type, as transformers writes it), PARTIAL_RUN (a run's
    own files but no config.json), or None (none of these, or no folder)."""
    folder = Path(folder)
    config = _json_object(folder / CONFIG_FILE)
    if config is not None:
        if "format_version" in config:
            return RUN
        return HF_CHECKPOINT if "model_type" in config else None
    if (folder / CONFIG_FILE).exists():  # unreadable, or not an object: of no kind
        return None
    own = (LOCK_FILE, TRAINER_STATE, LAST_WEIGHTS, METRICS_FILE)
    if any((folder / name).exists() for name in own):
        return PARTIAL_RUN
    tokenizer = _json_object(folder / TOKENIZER_FILE) or {}  # minigpt's names its "kind"
    return PARTIAL_RUN if "kind" in tokenizer else None


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def check_output(
    out_dir: str | Path,
    *,
    command: str,
    writes: str,
    replaces: Collection[str],
    force: bool,
    source: str | Path | None = None,
) -> None:
    """Refuse an output folder `command` must not write, in one sentence naming what it is.

    writes: the kind of folder the command makes (RUN or HF_CHECKPOINT).
    replaces: the files of that kind a folder may hold, which only --force replaces.
    source: what the command reads from, if it is a folder.
    """
    out_dir = Path(out_dir)
    a_file = file_in_path(out_dir)
    if a_file is not None:
        raise MinigptError(f"{a_file} is a file, not a folder", hint="choose another --out")
    kind = folder_kind(out_dir)
    what = _KIND_WORDS.get(kind)
    if source is not None and _same_folder(out_dir, Path(source)):
        raise MinigptError(
            f"{out_dir} is {f'{what}, ' if what else ''}the source of this "
            f"{_SOURCE_OF.get(command, command)}; "
            f"writing {_WRITES_WORDS[writes]} there would destroy it",
            hint="choose another --out",
        )
    if kind in _FOREIGN[writes]:
        raise MinigptError(
            f"{out_dir} is {what}; {command} writes {_WRITES_WORDS[writes]} and would destroy it",
            hint="choose another --out",
        )
    present = [name for name in replaces if (out_dir / name).exists()]
    if force or not present:
        return
    if kind == PARTIAL_RUN:
        raise MinigptError(
            f"{out_dir} holds {what}: the files of a write that was stopped",
            hint="replace it with --force, or choose another --out",
        )
    held = "a run" if kind == RUN else "a model" if writes == HF_CHECKPOINT else "files of a run"
    trained = kind == RUN and "train" in (_json_object(out_dir / CONFIG_FILE) or {})
    resume = f"continue it with `minigpt train --resume {out_dir}`, " if trained else ""
    raise MinigptError(
        f"{out_dir} already holds {held} ({', '.join(present[:3])})",
        hint=f"{resume if command == 'train' else ''}overwrite it with --force, "
        "or choose another --out",
    )


def _same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one folder (through links or bind mounts too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist, so they are not one
        return False


def check_out_dir(
    out_dir: str | Path, resume: bool, force: bool, source: str | Path | None = None
) -> None:
    """Train's --out: a fresh run is refused over another run unless --force, and over
    its own source (what --init-from names) or a Hugging Face checkpoint even then; any
    run is refused where a folder stands in the place of one of its files."""
    out_dir = Path(out_dir)
    for name in REPLACED_FILES:
        if (out_dir / name).is_dir():
            raise MinigptError(
                f"{out_dir / name} is a directory where the run's {name} belongs",
                hint="move it away, or choose another --out",
            )
    if not resume:
        check_output(
            out_dir, command="train", writes=RUN, replaces=RUN_FILES, force=force, source=source
        )
