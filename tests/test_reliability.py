"""Reliability of the run directory and the trainer under abuse, in-process:
a second trainer on a locked run, divergence never saved, a changed corpus on resume,
what resume reproduces, damaged run files, output paths, absurd sizes and numbers.

Every case checks the promise a user relies on: one sentence (a MinigptError, which
the CLI prints with exit code 2), nothing half-written, the previous run intact.
Process-level cases (two processes at once, signals, a full disk, permissions as a
non-root user) are in tests/e2e/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt import checkpoint, optim
from minigpt import train as trainer
from minigpt.checkpoint import (
    BEST_WEIGHTS,
    CONFIG_FILE,
    LAST_WEIGHTS,
    METRICS_FILE,
    TRAINER_STATE,
    RunLock,
    load_run,
)
from minigpt.config import build_config, load_config
from minigpt.errors import MinigptError
from minigpt.model import GPT, GPTConfig


@pytest.fixture
def corpus(tmp_path, tiny_train) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(tiny_train.text)  # the same tiny corpus and model as the trainer's tests
    return path


@pytest.fixture
def config_for(tiny_train):
    def build(tmp_path: Path, corpus: Path, *extra: str, out: str = "run"):
        sets = [*tiny_train.sets, f"data.data_dir={tmp_path / 'data'}", *extra]
        return build_config(None, sets, data=str(corpus), out=str(tmp_path / out))

    return build


@pytest.fixture
def train_run(config_for):
    def run(tmp_path: Path, corpus: Path, *extra: str, out: str = "run", **kwargs):
        return trainer.train(config_for(tmp_path, corpus, *extra, out=out), **kwargs)

    return run


def resume(tmp_path: Path, *sets: str, out: str = "run", **flags):
    config = build_config(None, list(sets), resume=str(tmp_path / out), **flags)
    return trainer.train(config, resume=True)


def losses(run_dir: Path) -> dict[int, float]:
    return dict(checkpoint.iter_losses(run_dir))


def finite_file(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


# --------------------------------------------------------------------------- one trainer per run


def test_a_locked_run_dir_refuses_a_second_trainer_and_names_the_holder(
    train_run, tmp_path, corpus
):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(MinigptError, match=r"in use by another training run \(pid \d+"):
            train_run(tmp_path, corpus, "train.max_iters=2")
        assert not (out / CONFIG_FILE).exists()  # refused before writing anything
    result = train_run(tmp_path, corpus, "train.max_iters=2")  # released: it runs
    assert result.step == 2
    with RunLock(out):  # and --resume is refused too while another holds it
        with pytest.raises(MinigptError, match="in use"):
            resume(tmp_path, max_iters=4)


def test_a_refused_fresh_run_leaves_no_directory_behind(train_run, tmp_path, corpus):
    with pytest.raises(MinigptError):
        train_run(tmp_path, corpus, "model.block_size=100000", out="fresh")
    assert not (tmp_path / "fresh").exists()


def test_the_lock_removes_a_killed_writers_temporary_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".trainer.pt.abc123.tmp").write_bytes(b"half")
    (out / "keep.txt").write_text("mine")
    with RunLock(out):
        assert (out / ".lock").exists()
    # nothing of a run was written: its lock file goes too, so the folder reads as no run
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# --------------------------------------------------------------------------- divergence


def test_divergence_never_saves_a_non_finite_state_and_the_kept_one_resumes(
    train_run, tmp_path, corpus
):
    diverge = ["train.lr=1e6", "train.min_lr=0", "train.warmup_iters=0", "train.grad_clip=0"]
    with pytest.raises(MinigptError, match=r"training stopped and .*still holds step \d+"):
        train_run(tmp_path, corpus, *diverge, "train.eval_interval=1", "train.max_iters=50")
    out = tmp_path / "run"
    saved = checkpoint.load_trainer_state(out / TRAINER_STATE)
    assert all(torch.isfinite(t).all() for t in saved.model.values())
    assert finite_file(out / LAST_WEIGHTS) and finite_file(out / BEST_WEIGHTS)
    result = resume(tmp_path, "train.lr=1e-3", "train.min_lr=1e-4")  # a lower lr goes on
    assert result.step == 50 and finite_file(out / LAST_WEIGHTS)


@pytest.mark.parametrize(
    "setting",
    [
        "train.min_lr=nan",
        "train.weight_decay=nan",
        "train.grad_clip=nan",
        "train.max_time=nan",
        "train.max_time=inf",
        "train.lr=inf",
        "train.beta2=nan",
        "model.dropout=nan",
        "model.init_std=inf",
    ],
)
def test_non_finite_numbers_are_refused_everywhere_in_the_config(setting):
    with pytest.raises(MinigptError, match="finite"):
        load_config(None, [setting])


@pytest.mark.parametrize("seed", [-1, 2**63, 99999999999999999999999])
def test_a_seed_out_of_range_is_refused(seed):
    with pytest.raises(MinigptError, match="train.seed must be from 0"):
        load_config(None, [f"train.seed={seed}"])


# --------------------------------------------------------------------------- resume


def test_resume_refuses_a_corpus_that_changed_and_leaves_the_run_as_it_was(
    train_run, tiny_train, tmp_path, corpus
):
    train_run(tmp_path, corpus, "train.max_iters=4")
    config_before = (tmp_path / "run" / CONFIG_FILE).read_text()
    corpus.write_text(tiny_train.text.replace("Point", "Vector"))
    with pytest.raises(MinigptError, match="has changed since the run started"):
        resume(tmp_path, max_iters=8)
    assert (tmp_path / "run" / CONFIG_FILE).read_text() == config_before


def test_resume_from_another_working_directory_finds_a_relative_corpus(
    tiny_train, tmp_path, corpus, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    sets = [*tiny_train.sets, "data.data_dir=data", "train.max_iters=4"]
    trainer.train(build_config(None, sets, data="corpus.txt", out="run"))
    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert Path(config["prepared_data"]["dir"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resume(tmp_path, max_iters=6).step == 6
    assert not (elsewhere / "data").exists()  # the run's own prepared folder was reused
    corpus.write_text(
        tiny_train.text.replace("Point", "Vector")
    )  # and its content is still checked
    with pytest.raises(MinigptError, match="has changed since the run started"):
        resume(tmp_path, max_iters=8)


def test_resume_of_a_project_copied_elsewhere_finds_its_corpus_and_data(
    tiny_train, tmp_path, corpus, monkeypatch
):
    """config.json's absolute paths point at the old place; relative ones are taken from
    the run's project, and the run's own prepared folder there is reused."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "corpus.txt").write_text(tiny_train.text)
    monkeypatch.chdir(project)
    sets = [*tiny_train.sets, "data.data_dir=data", "train.max_iters=4"]
    trainer.train(build_config(None, sets, data="corpus.txt", out="checkpoints/run"))
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    shutil.rmtree(project)
    (copy / "sub").mkdir()
    monkeypatch.chdir(copy / "sub")
    config = build_config(None, [], resume="../checkpoints/run", max_iters=6)
    assert trainer.train(config, resume=True).step == 6
    assert sorted(p.name for p in (copy / "sub").iterdir()) == []  # nothing prepared here


@pytest.mark.parametrize("section", ["train", "data", "model"])
def test_resume_refuses_a_config_json_whose_section_is_not_a_table(
    train_run, tmp_path, corpus, section
):
    train_run(tmp_path, corpus, "train.max_iters=2")
    edit_config(tmp_path / "run", lambda c: c.update({section: []}))
    with pytest.raises(MinigptError, match=f"'{section}' entry is \\[\\], not a table"):
        resume(tmp_path, max_iters=4)


def test_resume_refuses_an_edited_config_that_names_a_builtin_dataset(train_run, tmp_path, corpus):
    train_run(tmp_path, corpus, "train.max_iters=2")
    edit_config(tmp_path / "run", lambda c: c["data"].update(source="induction"))
    with pytest.raises(MinigptError, match="has changed since the run started"):
        resume(tmp_path, max_iters=4)


def test_resume_refuses_an_edited_config_that_points_at_other_data(
    train_run, tiny_train, tmp_path, corpus
):
    train_run(tmp_path, corpus, "train.max_iters=4")
    path = tmp_path / "run" / CONFIG_FILE
    config = json.loads(path.read_text())
    other = tmp_path / "other.txt"
    other.write_text(tiny_train.text.upper())
    elsewhere = tmp_path / "elsewhere-data"
    config["data"].update(source=str(other), data_dir=str(elsewhere))
    config["prepared_data"]["dir"] = str(tmp_path / "nowhere")
    path.write_text(json.dumps(config))
    with pytest.raises(MinigptError, match="has changed since the run started"):
        resume(tmp_path, max_iters=8)
    assert not elsewhere.exists()  # nothing tokenised, nothing written


def test_an_interrupted_run_resumed_with_the_same_config_equals_the_straight_run(
    train_run, tmp_path, corpus
):
    """What the README promises: stop a run (Ctrl-C, SIGTERM, a kill after a save) and
    resume it, and the losses are those of the run that was never stopped."""
    straight = train_run(tmp_path, corpus, "train.max_iters=30", out="straight")
    stops = {"done": False}

    def stop_after_an_evaluation(line: str) -> None:
        if line.startswith("step") and "10:" in line and not stops["done"]:
            stops["done"] = True
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler only sets its flag

    cut = train_run(
        tmp_path,
        corpus,
        "train.max_iters=30",
        "train.eval_interval=10",
        out="cut",
        log=stop_after_an_evaluation,
    )
    assert cut.signal == 2 and 10 <= cut.step < 30
    resumed = resume(tmp_path, out="cut")
    assert resumed.step == 30
    assert losses(tmp_path / "cut") == losses(straight.run_dir)


def test_resume_with_a_new_max_iters_says_the_schedule_changed_and_follows_it(
    train_run, tmp_path, corpus
):
    train_run(tmp_path, corpus, "train.max_iters=15")
    lines: list[str] = []
    config = build_config(None, [], resume=str(tmp_path / "run"), max_iters=30)
    trainer.train(config, resume=True, log=lines.append)
    changed = [line for line in lines if "lr schedule changed" in line]
    assert len(changed) == 1 and "step 15 -> step 30" in changed[0]
    records = checkpoint.read_metrics(tmp_path / "run" / METRICS_FILE)
    lr_16 = next(r["lr"] for r in records if r["step"] == 16)
    assert lr_16 == pytest.approx(optim.lr_at(15, config))


def test_resume_with_a_pinned_decay_and_a_new_max_iters_says_nothing(train_run, tmp_path, corpus):
    train_run(tmp_path, corpus, "train.max_iters=15", "train.lr_decay_iters=30")
    lines: list[str] = []
    config = build_config(None, [], resume=str(tmp_path / "run"), max_iters=30)
    trainer.train(config, resume=True, log=lines.append)
    assert not [line for line in lines if "schedule" in line]


# --------------------------------------------------------------------------- damaged run files


@pytest.fixture
def run_dir(train_run, tmp_path, corpus) -> Path:
    train_run(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=2")
    return tmp_path / "run"


def edit_config(run_dir: Path, edit) -> None:
    path = run_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model"].update(n_embd=32), r"n_embd|does not match"),
        (lambda c: c["model"].update(block_size=64), "does not match"),
        (lambda c: c.pop("model"), "no model config"),
        (lambda c: c.update(model=5), "no model config"),
        (lambda c: c["model"].update(dropout="x"), "model.dropout must be a finite number"),
        (lambda c: c["model"].update(bias="yes"), "model.bias must be true or false"),
        (lambda c: c["model"].update(n_layer=10**23), "more than the"),
    ],
)
def test_a_config_json_that_does_not_fit_the_weights_is_one_sentence(run_dir, edit, message):
    edit_config(run_dir, edit)
    with pytest.raises(MinigptError, match=message):
        load_run(run_dir)


def test_weights_with_nan_are_refused_at_load(run_dir):
    state = load_file(str(run_dir / BEST_WEIGHTS))
    name = next(iter(state))
    state[name] = torch.full_like(state[name], math.nan)
    save_file(state, str(run_dir / BEST_WEIGHTS))
    with pytest.raises(MinigptError, match="NaN or infinite weights"):
        load_run(run_dir)


@pytest.mark.parametrize("cut", [0, 0.5])
def test_an_empty_or_truncated_trainer_state_is_one_sentence(run_dir, cut):
    path = run_dir / TRAINER_STATE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(MinigptError, match="damaged or truncated") as err:
        checkpoint.load_trainer_state(path)
    assert "--force" not in (err.value.hint or "")  # never advise overwriting the weights


@pytest.mark.parametrize(
    "junk",
    [b"[1, 2]\n", b'{"step": "x", "loss": 1.0}\n', b"\xff\xfe not utf-8\n", b'{"step": 3'],
)
def test_resume_survives_a_metrics_file_with_junk_lines(tmp_path, run_dir, junk):
    with open(run_dir / METRICS_FILE, "ab") as f:
        f.write(junk)
    assert resume(tmp_path, max_iters=6).step == 6
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_run_files_have_ordinary_modes(run_dir):
    """Files keep the mode a plain open() gives (0644 under umask 022), so a run can be
    shared; mkstemp's private 0600 must not leak through any writer."""
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (BEST_WEIGHTS, LAST_WEIGHTS, TRAINER_STATE, CONFIG_FILE, "tokenizer.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_file_given_as_the_run_dir_is_named_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    with pytest.raises(MinigptError, match="is a file, not a run directory"):
        load_run(path)


# --------------------------------------------------------------------------- output paths


def test_out_paths_that_cannot_hold_a_run_are_refused_before_writing(
    train_run, config_for, tmp_path, corpus
):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MinigptError, match="afile is a file, not a folder"):
        train_run(tmp_path, corpus, "train.max_iters=2", out="afile/run")
    with pytest.raises(MinigptError, match="afile is a file, not a folder"):
        trainer.train(config_for(tmp_path, corpus, "train.max_iters=2", out="afile"), force=True)
    assert afile.read_text() == "x"
    (tmp_path / "run" / BEST_WEIGHTS).mkdir(parents=True)
    with pytest.raises(MinigptError, match="is a directory where the run's model.safetensors"):
        train_run(tmp_path, corpus, "train.max_iters=2", force=True)


def test_a_data_dir_that_is_a_file_is_one_sentence(train_run, tmp_path, corpus):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(MinigptError):
        train_run(tmp_path, corpus, "train.max_iters=2")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- absurd sizes


@pytest.mark.parametrize(
    "setting",
    [
        "model.n_layer=1e23",
        "model.n_embd=1000000000",
        "model.vocab_size=10000000000",
        "model.block_size=10000000",
        "train.batch_size=1000000000",
    ],
)
def test_a_run_that_cannot_fit_in_memory_is_refused_before_allocating(
    train_run, tmp_path, corpus, setting
):
    extra = ["model.n_head=1"] if "n_embd" in setting else []
    with pytest.raises(MinigptError, match=r"needs at least .* more than the .* of memory"):
        train_run(tmp_path, corpus, setting, *extra, "train.max_iters=2")
    assert not (tmp_path / "run").exists()


def test_the_parameter_estimate_is_exact():
    for config in (
        GPTConfig(vocab_size=65),
        GPTConfig(vocab_size=100, bias=True, n_layer=2),
        GPTConfig(vocab_size=7, n_head=2, n_embd=32, attention="wrapper", bias=True),
    ):
        assert config.num_params() == GPT(config).num_params(non_embedding=False)


def test_too_many_micro_batches_are_refused():
    with pytest.raises(MinigptError, match="micro-batches per optimizer step"):
        from minigpt.config import micro_steps

        micro_steps(load_config(None, ["train.grad_accum=100000000"]))
