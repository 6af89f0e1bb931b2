"""heads_run.py: what inspect-heads inspects on a run, and where it measures importance:
the run's own validation data (found by data.find_run_data) or else the prompt."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from minigpt import heads, heads_run
from minigpt.checkpoint import load_run, write_run_files


def test_prompt_cropping_and_empty(tiny):
    _, tokenizer = tiny
    seqs, notes = heads_run.prompt_sequences(tokenizer, ["a" * 40], block_size=32)
    assert seqs[0].numel() == 32 and "cropped" in notes[0]
    with pytest.raises(ValueError, match="empty"):
        heads_run.prompt_sequences(tokenizer, [""], block_size=32)
    with pytest.raises(ValueError, match="from 2 to 16"):
        heads_run.check_repeated(17, 32)


def test_importance_uses_the_runs_validation_data(tiny, tmp_path):
    from minigpt.checkpoint import load_run
    from minigpt.prepare import prepare

    model, tokenizer = tiny
    source = tmp_path / "corpus.txt"
    source.write_text("the quick brown fox jumps over the lazy dog\n" * 80)
    prepared = prepare(str(source), "char", data_dir=tmp_path / "data", progress=False)
    recorded = {"dir": str(prepared.dir), "content_hash": prepared.meta["content_hash"]}
    run_dir = write_run_files(
        tmp_path / "run", model, tokenizer, extra_config={"prepared_data": recorded}
    )
    inspection = heads_run.inspect_run(load_run(run_dir), repeated=8)
    assert inspection.importance_source.startswith("8 validation batches of 4 x 32 tokens")
    assert not inspection.notes
    # without the prepared folder, the probe is used and the user is told
    no_data = write_run_files(tmp_path / "run2", model, tokenizer)
    inspection = heads_run.inspect_run(load_run(no_data), repeated=8)
    assert "validation data was not found" in inspection.notes[0]


def importance_source(run_dir, prepared_data) -> str:
    """Where inspect_run measured importance for a run whose config.json says prepared_data."""
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prepared_data": prepared_data}))
    return heads_run.inspect_run(load_run(run_dir), repeated=4).importance_source


def test_only_this_runs_own_prepared_data_is_used(tiny, tmp_path, monkeypatch):
    """A run directory is data: its prepared_data may name any folder on the machine."""
    from minigpt.prepare import prepare

    model, tokenizer = tiny
    source = tmp_path / "corpus.txt"
    source.write_text("the quick brown fox jumps over the lazy dog\n" * 80)
    own = prepare(str(source), "char", data_dir=tmp_path / "data", progress=False)
    source.write_text("hello there, general kenobi\n" * 80)  # another tokenizer's corpus
    other = prepare(str(source), "char", data_dir=tmp_path / "data", progress=False)
    run_dir = write_run_files(tmp_path / "run", model, tokenizer)
    own_hash = own.meta["content_hash"]
    used = "validation batches"
    assert used in importance_source(run_dir, {"dir": str(own.dir), "content_hash": own_hash})
    monkeypatch.chdir(tmp_path)  # a relative dir is still found from the working directory
    relative = os.path.relpath(own.dir, tmp_path)
    assert used in importance_source(run_dir, {"dir": relative, "content_hash": own_hash})
    for bad in [
        {"dir": str(own.dir)},  # no content hash to check it against
        {"dir": str(own.dir), "content_hash": "0" * 64},  # another corpus
        {"dir": str(other.dir), "content_hash": other.meta["content_hash"]},  # another tokenizer
        {"dir": "/", "content_hash": own_hash},  # not prepared data at all
        {"dir": str(tmp_path / "missing"), "content_hash": own_hash},
        {"dir": 7, "content_hash": own_hash},
        "not a table",
        ["a", "list"],
    ]:
        assert "no validation data found" in importance_source(run_dir, bad), bad


def test_a_token_file_with_ids_past_the_tokenizer_is_not_used(tiny_gpt, tiny, tmp_path):
    """A padded model (vocab 64) and val.bin holding ids 40: the embedding would take them,
    the tokenizer (28 ids) could not have written them. The probe stays in the tokenizer."""
    from minigpt.prepare import prepare

    _, tokenizer = tiny
    model = tiny_gpt(64, block_size=32, n_head=3, n_embd=24)
    source = tmp_path / "corpus.txt"
    source.write_text("the quick brown fox jumps over the lazy dog\n" * 80)
    prepared = prepare(str(source), "char", data_dir=tmp_path / "data", progress=False)
    val = prepared.val_path.read_bytes()
    prepared.val_path.write_bytes(bytes([40, 0]) * (len(val) // 2))  # uint16 ids: 40
    recorded = {"dir": str(prepared.dir), "content_hash": prepared.meta["content_hash"]}
    run_dir = write_run_files(tmp_path / "run", model, tokenizer)
    assert "no validation data found" in importance_source(run_dir, recorded)
    probes = heads.repeated_probe(tokenizer, 20, count=50)
    assert probes.max() < tokenizer.vocab_size


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_named_as_prepared_data_is_not_read(tiny, tmp_path):
    """Reading a FIFO blocks until someone writes: a hostile config must not hang us."""
    model, tokenizer = tiny
    folder = tmp_path / "trap"
    folder.mkdir()
    os.mkfifo(folder / "meta.json")
    (folder / "val.bin").write_bytes(b"\0\0" * 100)

    done = threading.Event()

    def unblock():  # if the FIFO is opened after all, let its readers go after 5 s
        done.wait(5)
        while not done.wait(0.1):
            try:  # non-blocking: with no reader waiting this fails instead of waiting
                os.close(os.open(folder / "meta.json", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=unblock, daemon=True).start()
    run_dir = write_run_files(tmp_path / "run", model, tokenizer)
    started = time.perf_counter()
    try:
        source = importance_source(run_dir, {"dir": str(folder), "content_hash": "x"})
    finally:
        done.set()
    assert "no validation data" in source and time.perf_counter() - started < 4


def test_a_context_of_one_token_is_refused_for_its_shape(tiny_gpt, tiny, tmp_path):
    _, tokenizer = tiny
    model = tiny_gpt(tokenizer.vocab_size, block_size=1)
    run = load_run(write_run_files(tmp_path / "run", model, tokenizer))
    for asked in ({}, {"prompts": ["abc"]}, {"repeated": 2}):
        with pytest.raises(ValueError, match="context of at least 2 tokens; this one has 1") as err:
            heads_run.inspect_run(run, **asked)
        assert err.value.param is None and "repeated" not in str(err.value)


@pytest.mark.parametrize("block_size", [2, 3])
def test_a_context_too_short_for_the_probe_names_the_probe_or_the_users_repeated(
    tiny_gpt, tiny, tmp_path, block_size
):
    _, tokenizer = tiny
    model = tiny_gpt(tokenizer.vocab_size, block_size=block_size)
    run = load_run(write_run_files(tmp_path / "run", model, tokenizer))
    with pytest.raises(
        ValueError,
        match=f"probe needs a context of at least 4 tokens; this model's is {block_size}",
    ) as err:
        heads_run.inspect_run(run)
    assert err.value.param == "prompts" and "repeated" not in err.value.hint
    with pytest.raises(
        ValueError,
        match=f"repeated 2 does not fit: the shortest probe is 2 x 2 tokens, and this model's context is {block_size}",
    ):
        heads_run.inspect_run(run, repeated=2)
    assert heads_run.inspect_run(run, prompts=["abcdef"]).source == "the prompt"
