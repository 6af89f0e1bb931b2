"""data.py: a prepared folder loaded and checked, a damaged one refused (and rebuilt by
prepare), and a run's own prepared data found again."""

import errno
import json
import os
from pathlib import Path

import pytest

from minigpt import atomic
from minigpt.data import check_block_size, find_run_data, load_prepared
from minigpt.errors import MinigptError
from minigpt.prepare import prepare
from minigpt.tokenizer import CharTokenizer


def test_check_block_size(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x" * 199 + "\n")  # 180 train, 20 val
    prepared = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    val_tokens = len(prepared.val_tokens())
    check_block_size(val_tokens, 19, "the val split")
    with pytest.raises(
        MinigptError, match="the val split .* has 20 tokens, fewer than block_size \\+ 1 = 21"
    ):
        check_block_size(val_tokens, 20, f"the val split of {prepared.meta['source']}")


# ----------------------------------------------------------------------- damaged prepared data


def truncate(path: Path, n_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:-n_bytes])


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(change(meta)))


DAMAGE = {
    "truncated train.bin": (lambda d: truncate(d / "train.bin", 2), "train.bin has .* bytes"),
    "odd-sized train.bin": (lambda d: truncate(d / "train.bin", 1), "train.bin has .* bytes"),
    "val.bin missing": (lambda d: (d / "val.bin").unlink(), "val.bin is missing"),
    "val.bin a folder": (lambda d: (d / "val.bin").unlink() or (d / "val.bin").mkdir(), "val.bin is not a regular file"),
    "meta.json without dtype": (lambda d: edit_meta(d, lambda m: m.pop("dtype") and m), "no valid 'dtype'"),
    "dtype float64": (lambda d: edit_meta(d, lambda m: m | {"dtype": "float64"}), "dtype 'float64'"),
    "dtype nonsense": (lambda d: edit_meta(d, lambda m: m | {"dtype": "fancy"}), "dtype 'fancy'"),
    "train_tokens a string": (lambda d: edit_meta(d, lambda m: m | {"train_tokens": "12"}), "no valid 'train_tokens'"),
    "val_tokens negative": (lambda d: edit_meta(d, lambda m: m | {"val_tokens": -2}), "negative 'val_tokens'"),
    "format from elsewhere": (lambda d: edit_meta(d, lambda m: m | {"format": 99}), "format 99"),
    "meta.json a list": (lambda d: (d / "meta.json").write_text("[1, 2]"), "meta.json is not a JSON object"),
    "meta.json not JSON": (lambda d: (d / "meta.json").write_text("{oops"), "meta.json is not valid JSON"),
    "meta.json deeply nested": (lambda d: (d / "meta.json").write_text("[" * 100_000), "not valid JSON"),
    "meta.json missing": (lambda d: (d / "meta.json").unlink(), "not prepared data"),
    "tokenizer.json damaged": (lambda d: (d / "tokenizer.json").write_text('{"kind": "char", "chars": 5}'), "tokenizer.json is damaged"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE)
def test_load_prepared_refuses_a_damaged_folder(tmp_path, damage, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    prepared = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    do_damage, message = DAMAGE[damage]
    do_damage(prepared.dir)
    with pytest.raises(MinigptError, match=message) as err:
        load_prepared(prepared.dir)
    assert str(prepared.dir) in str(err.value)


@pytest.mark.parametrize("damage", DAMAGE)
def test_prepare_rebuilds_a_damaged_folder(tmp_path, damage, make_text, listing):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    first = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    DAMAGE[damage][0](first.dir)
    again = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert not again.reused and again.dir == first.dir
    assert again.meta == first.meta
    tok = again.tokenizer
    assert tok.decode(again.train_tokens().tolist()) + tok.decode(again.val_tokens().tolist()) == (
        make_text()
    )
    files = ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert listing(tmp_path / "data") == [first.dir.name] + [f"{first.dir.name}/{f}" for f in files]


def test_a_link_in_the_folders_place_is_removed_not_followed(tmp_path, make_text, listing):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    first = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    for name in os.listdir(first.dir):
        os.unlink(first.dir / name)
    first.dir.rmdir()
    first.dir.symlink_to(elsewhere)  # looks like the folder, is not prepared data
    again = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert not again.dir.is_symlink() and not again.reused
    assert listing(elsewhere) == ["keep.txt"]


def test_unreadable_meta_is_an_error_not_a_rebuild(tmp_path, monkeypatch, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    first = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    real_read_text = Path.read_text

    def refuse_meta(path, *args, **kwargs):
        if path.name == "meta.json":  # tests run as root, so chmod cannot refuse
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse_meta)
    with pytest.raises(MinigptError, match="cannot read .*meta.json: Permission denied"):
        load_prepared(first.dir)
    with pytest.raises(MinigptError, match="cannot read .*meta.json: Permission denied"):
        prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    monkeypatch.undo()
    assert load_prepared(first.dir).meta == first.meta  # left as it was


def test_ctrl_c_while_removing_a_damaged_folder_leaves_no_visible_folder(
    tmp_path, monkeypatch, make_text
):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    first = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    truncate(first.dir / "train.bin", 2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    monkeypatch.undo()
    assert [p for p in os.listdir(tmp_path / "data") if not p.startswith(".")] == []
    assert not prepare(corpus, "char", data_dir=tmp_path / "data", progress=False).reused


# ------------------------------------------------------------------------------- a run's data


def test_a_runs_data_is_found_where_recorded_or_in_its_moved_project(
    tmp_path, monkeypatch, make_text
):
    """The one rule that train's resume, inspect-heads and eval share: the folder where
    config.json says, else data_dir/<its name> in the run's project; and only ever the
    corpus with the recorded content hash (and the tokenizer or dataset asked for)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "c.txt").write_text(make_text())
    prepared = prepare(project / "c.txt", "char", data_dir=project / "data", progress=False)
    run_data = {"dir": str(prepared.dir), "content_hash": prepared.meta["content_hash"]}
    assert find_run_data(run_data, project / "checkpoints" / "run").dir == prepared.dir
    moved = tmp_path / "moved"
    project.rename(moved)
    run_dir = moved / "checkpoints" / "run"
    found = find_run_data(run_data, run_dir)
    assert found is not None and found.dir == moved / "data" / prepared.dir.name
    assert find_run_data(run_data, run_dir, tokenizer=found.tokenizer) is not None
    assert find_run_data(run_data, run_dir, tokenizer=CharTokenizer(["a", "b"])) is None
    assert find_run_data(run_data, run_dir, builtin="pystdlib") is None
    assert find_run_data({**run_data, "content_hash": "0" * 64}, run_dir) is None
    assert find_run_data({"dir": str(prepared.dir)}, run_dir) is None
    assert find_run_data("not a table", run_dir) is None
    monkeypatch.chdir(moved)
    relative = {**run_data, "dir": f"data/{prepared.dir.name}"}
    assert find_run_data(relative, tmp_path / "elsewhere" / "run").dir == moved / relative["dir"]


def test_a_bpe_short_of_its_vocab_is_warned_of_each_time_and_kept_under_its_name(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n" * 20)
    first = prepare(corpus, "bpe", 5000, tmp_path / "d", progress=False)
    learned = first.vocab_size
    assert 257 < learned < 5000
    assert first.warnings == [
        f"bpe learned {learned} of the 5,000 tokens asked: "
        "its sample of the corpus has no more pairs to merge"
    ]
    # the folder keeps the size asked in its name: the key that finds it again unlearned
    assert "-bpe5000-" in first.dir.name
    again = prepare(corpus, "bpe", 5000, tmp_path / "d", progress=False)
    assert again.reused and again.dir == first.dir and again.warnings == first.warnings
    assert again.tokenizer.to_json() == first.tokenizer.to_json()
    enough = prepare(corpus, "bpe", learned, tmp_path / "d", progress=False)
    assert enough.vocab_size == learned and enough.warnings == []


def test_a_bpe_that_learns_no_merge_leaves_no_folder(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n" * 20)
    with pytest.raises(MinigptError, match="no merges: its sample of 1 character"):
        prepare(corpus, "bpe", 300, tmp_path / "d" / "e", progress=False, bpe_sample_chars=1)
    assert not (tmp_path / "d").exists()  # not even the folders it would have made


def test_a_refused_prepare_keeps_a_data_dir_that_was_there(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MinigptError, match="is empty"):
        prepare(tmp_path / "empty.txt", "char", None, tmp_path / "d", progress=False)
    assert (tmp_path / "d").is_dir()
