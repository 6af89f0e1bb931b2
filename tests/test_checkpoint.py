"""checkpoint.py's refusals of what is not a run's: a trainer.pt that is no torch.save
archive, a config.json that is a Hugging Face checkpoint's or of no kind; and the run
lock, which leaves nothing in a folder it was refused in."""

import json

import pytest

from minigpt import checkpoint
from minigpt.checkpoint import RunLock, load_trainer_state, read_config
from minigpt.errors import MinigptError


@pytest.mark.parametrize(
    "content", [b"hello\n", bytes(range(256)) * 8, b"\x80\x04K\x05."], ids=["text", "bytes", "int"]
)
def test_a_trainer_state_that_is_no_archive_is_named_so(tmp_path, content):
    path = tmp_path / "trainer.pt"
    path.write_bytes(content)
    with pytest.raises(MinigptError) as err:
        load_trainer_state(path)
    assert str(err.value) == f"{path} is not a trainer state file (damaged or truncated?)"
    assert "model.safetensors" in err.value.hint  # where the weights still are


def test_a_hugging_face_config_is_named_as_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(
        MinigptError, match="is a Hugging Face checkpoint, not a minigpt run"
    ) as err:
        read_config(tmp_path)
    assert err.value.hint == f"import it first: minigpt import {tmp_path} --out runs/NAME"
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 8}))
    with pytest.raises(MinigptError, match="has no format_version, so .* is not a minigpt run"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(MinigptError, match="has run format version 99"):
        read_config(tmp_path)


def test_the_lock_leaves_no_file_in_a_folder_that_holds_no_run(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with RunLock(hf):
        assert (hf / checkpoint.LOCK_FILE).exists()
    assert sorted(p.name for p in hf.iterdir()) == ["config.json"]
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        (run / "config.json").write_text(json.dumps({"format_version": 1}))
    assert (run / checkpoint.LOCK_FILE).exists()  # a run keeps its lock file
