"""outputs.py: what a folder holds, and which output folder each command may write, or
replace with --force."""

import json
import os

import pytest

from minigpt.errors import MinigptError
from minigpt.outputs import HF_CHECKPOINT, PARTIAL_RUN, RUN, check_output, folder_kind

RUN_NAMES = ("config.json", "tokenizer.json", "model.safetensors")


def folder(path, config=None, **files):
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def test_what_a_folder_holds(tmp_path):
    assert folder_kind(folder(tmp_path / "run", {"format_version": 1, "model": {}})) == RUN
    assert folder_kind(folder(tmp_path / "hf", {"model_type": "gpt2"})) == HF_CHECKPOINT
    half = folder(tmp_path / "half", tokenizer_json='{"kind": "char", "chars": ["a"]}')
    assert folder_kind(half) == PARTIAL_RUN
    assert folder_kind(folder(tmp_path / "locked")) is None
    (tmp_path / "locked" / ".lock").write_text("")
    assert folder_kind(tmp_path / "locked") == PARTIAL_RUN
    hf_tokenizer = folder(tmp_path / "tok", tokenizer_json='{"version": "1.0", "model": {}}')
    assert folder_kind(hf_tokenizer) is None  # an export cut short is no run
    assert folder_kind(folder(tmp_path / "other", [1, 2])) is None
    assert folder_kind(tmp_path / "missing") is None


def check(out, writes=RUN, force=False, source=None, command="import"):
    check_output(
        out, command=command, writes=writes, replaces=RUN_NAMES, force=force, source=source
    )


def test_force_replaces_only_what_the_command_writes(tmp_path):
    run = folder(tmp_path / "run", {"format_version": 1, "train": {}})
    hf = folder(tmp_path / "hf", {"model_type": "gpt2"})
    check(run, force=True)
    check(hf, writes=HF_CHECKPOINT, force=True, command="export")
    with pytest.raises(MinigptError, match="run is a minigpt run; export writes a Hugging Face"):
        check(run, writes=HF_CHECKPOINT, force=True, command="export")
    with pytest.raises(
        MinigptError, match="hf is a Hugging Face checkpoint; train writes a minigpt"
    ):
        check(hf, force=True, command="train")
    with pytest.raises(MinigptError, match="already holds a run") as err:
        check(run, command="train")
    assert f"--resume {run}" in err.value.hint
    with pytest.raises(MinigptError, match="already holds a run") as err:
        check(run, command="import")
    assert "--resume" not in err.value.hint and "--force" in err.value.hint


def test_the_source_is_refused_through_a_link_too(tmp_path):
    run = folder(tmp_path / "run", {"format_version": 1})
    os.symlink(run, tmp_path / "link")
    for out in (run, tmp_path / "link", tmp_path / "." / "run"):
        with pytest.raises(MinigptError, match="is a minigpt run, the source of this export"):
            check(out, writes=HF_CHECKPOINT, force=True, source=run, command="export")
    check(tmp_path / "elsewhere", writes=HF_CHECKPOINT, source=run, command="export")


def test_a_half_written_run_is_named_and_replaced_with_force(tmp_path):
    half = folder(tmp_path / "half", tokenizer_json='{"kind": "char"}')
    (half / ".lock").write_text("")
    with pytest.raises(MinigptError, match="holds an incomplete minigpt run") as err:
        check(half)
    assert "--resume" not in err.value.hint
    check(half, force=True)
