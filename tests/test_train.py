"""The trainer: run directory, exact resume, bad input, NaN stop.

Everything trains tiny models for a few steps on a small corpus written to tmp_path.
The process-level checks (signals, kill -9, torchrun) are in e2e/test_train_process.py.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from minigpt import checkpoint, console, optim
from minigpt import model as model_module
from minigpt import train as trainer
from minigpt.checkpoint import BEST_WEIGHTS, LAST_WEIGHTS, TRAINER_STATE, load_run
from minigpt.config import load_config, resume_config
from minigpt.errors import MinigptError
from minigpt.model import GPT


@pytest.fixture(scope="module")
def data(tiny_train_data) -> trainer.TrainData:
    return tiny_train_data


@pytest.fixture
def tiny_config(tiny_train):
    """A run config of the tiny model writing to out_dir, with more `--set` items."""

    def make(out_dir, *extra: str):
        return load_config(None, [*tiny_train.sets, f"train.out_dir={out_dir}", *extra])

    return make


def losses(run_dir) -> list[tuple[int, float]]:
    return list(checkpoint.iter_losses(run_dir))


def test_train_writes_a_loadable_run_dir(tiny_config, tmp_path, data, capsys):
    out = tmp_path / "run"
    result = trainer.train(
        tiny_config(out, "train.max_iters=6", "train.eval_interval=3"), data=data, progress=False
    )
    assert result.step == 6 and result.stop_reason == "max_iters"
    assert result.tokens_seen == 6 * 4 * 16
    files = ("config.json", "tokenizer.json", BEST_WEIGHTS, LAST_WEIGHTS, TRAINER_STATE)
    for name in (*files, "metrics.jsonl", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp")), "no temporary files are left behind"
    run = load_run(out)
    assert run.tokenizer.to_json() == data.tokenizer.to_json()
    assert run.model.config.vocab_size == data.tokenizer.vocab_size
    assert run.config["train"]["max_iters"] == 6 and run.config["data"]["source"]
    records = checkpoint.read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert result.best_val_loss == min(r["val_loss"] for r in evals)
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6]
    assert capsys.readouterr().out == ""  # the library prints nothing; the CLI prints this:
    printed = console.train_summary(result)
    assert f"minigpt generate {out}" in printed and "best val loss" in printed
    # the best weights are those of the best evaluation; the last ones those of step 6
    last = load_run(out, weights_file=LAST_WEIGHTS).model
    state = checkpoint.load_trainer_state(out / TRAINER_STATE)
    assert state.step == 6
    for name, tensor in last.state_dict().items():
        assert torch.equal(tensor, state.model[name]), name


def test_compiled_training_is_one_graph_with_each_models_own_static_shapes(tiny_config,
    tmp_path, data, monkeypatch
):
    """train.compile: the model compiles as one graph (no graph break), and a second model
    of another shape in the same process gets kernels for its own sizes, not symbolic
    ones (torch.compile's default would mark the sizes that changed as dynamic)."""
    graphs = []  # per graph dynamo hands over: whether any size in it is symbolic

    def record(graph_module, example_inputs):
        sizes = [s for t in example_inputs if isinstance(t, torch.Tensor) for s in t.shape]
        symbolic = [x for x in (*sizes, *example_inputs) if isinstance(x, torch.SymInt)]
        graphs.append(bool(symbolic))
        return graph_module.forward  # run the captured graph as it is: no inductor

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=record, **kw))
    torch._dynamo.reset()  # nothing compiled by an earlier test counts
    try:
        for width, block in ((16, 16), (32, 8)):
            shape = [f"model.n_embd={width}", f"model.block_size={block}"]
            config = tiny_config(tmp_path / f"run{width}", *shape, "train.compile=true",
                                 "train.max_iters=2", "train.eval_interval=2")  # fmt: skip
            assert trainer.train(config, data=data, progress=False).step == 2
    finally:
        torch._dynamo.reset()
    assert graphs == [False, False]


def test_training_with_a_chunked_loss_follows_the_same_losses(tiny_config, tmp_path, data, monkeypatch):
    """train.loss_chunk changes how the loss is computed, not what: the same losses step
    by step (up to float rounding), and the same evaluation."""
    chunk_sizes = []  # of every chunked loss computed, in training and evaluation
    chunked_loss = model_module.lm_head_loss

    def spy(x, weight, targets, chunk):
        chunk_sizes.append(chunk)
        return chunked_loss(x, weight, targets, chunk)

    monkeypatch.setattr(model_module, "lm_head_loss", spy)
    results = {}
    for chunk in (0, 7):
        out = tmp_path / f"chunk{chunk}"
        config = tiny_config(out, "train.max_iters=4", "train.eval_interval=4",
                             f"train.loss_chunk={chunk}")  # fmt: skip
        results[chunk] = trainer.train(config, data=data, progress=False), losses(out)
    assert set(chunk_sizes) == {7} and len(chunk_sizes) == 4 + 2 * 2  # steps, eval batches
    (plain, plain_losses), (chunked, chunked_losses) = results[0], results[7]
    assert [s for s, _ in chunked_losses] == [1, 2, 3, 4]
    assert [v for _, v in chunked_losses] == pytest.approx([v for _, v in plain_losses], rel=1e-5)
    assert chunked.best_val_loss == pytest.approx(plain.best_val_loss, rel=1e-5)


def test_eval_batches_are_fixed(tiny_config, tmp_path, data):
    # lr tiny, so the weights hardly move: two evaluations of the same batches agree closely
    out = tmp_path / "run"
    tiny_lr = ["train.lr=1e-9", "train.min_lr=0", "train.warmup_iters=0"]
    config = tiny_config(out, "train.max_iters=4", "train.eval_interval=2", *tiny_lr)
    trainer.train(config, data=data, progress=False)
    evals = [r for r in checkpoint.read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert abs(evals[0]["val_loss"] - evals[1]["val_loss"]) < 1e-5
    assert abs(evals[0]["train_loss"] - evals[1]["train_loss"]) < 1e-5


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_extending_a_run_with_a_pinned_decay_end_is_bit_identical(
    tiny_config, tmp_path, data, optimizer
):
    """6 steps, then a resume to 10, equal 10 straight when lr_decay_iters pins the
    schedule (else the new max_iters moves the cosine decay: test_reliability.py).
    Dropout on and two micro-batches per step: the RNG and both batch streams must be
    restored, and the optimizer's state (Muon's momentum and AdamW's moments) with them."""
    common = ["train.grad_accum=2", "model.dropout=0.1", f"train.optimizer={optimizer}"]
    common += ["train.eval_interval=4", "train.lr_decay_iters=10"]
    straight = tmp_path / "straight"
    trainer.train(tiny_config(straight, *common, "train.max_iters=10"), data=data, progress=False)
    split = tmp_path / "split"
    trainer.train(tiny_config(split, *common, "train.max_iters=6"), data=data, progress=False)
    config = resume_config(split, {"train": {"max_iters": 10}})
    assert config.train.max_iters == 10 and config.model.dropout == 0.1
    result = trainer.train(config, resume=True, data=data, progress=False)
    assert result.step == 10
    assert losses(split) == losses(straight)  # exact float equality, step by step
    assert len(losses(split)) == 10
    metrics = checkpoint.read_metrics(split / "metrics.jsonl")
    best = {r["step"]: r["val_loss"] for r in metrics if "val_loss" in r}
    assert set(best) == {4, 6, 8, 10}
    resumed = checkpoint.load_trainer_state(split / TRAINER_STATE).optimizer
    assert_same_state(resumed, checkpoint.load_trainer_state(straight / TRAINER_STATE).optimizer)


def assert_same_state(a, b) -> None:
    """Two optimizer state dicts equal bit for bit, at any depth."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


def test_muons_state_round_trips_through_trainer_pt(tiny_config, tmp_path, data):
    """What trainer.pt holds loads into a fresh optimizer and comes back out the same."""
    out = tmp_path / "run"
    config = tiny_config(out, "train.optimizer=muon", "train.max_iters=3", "train.eval_interval=3")
    trainer.train(config, data=data, progress=False)
    saved = checkpoint.load_trainer_state(out / TRAINER_STATE)
    model = GPT(load_run(out).model.config)
    model.load_state_dict(saved.model)
    fresh = optim.make_optimizer(model, config, torch.device("cpu"))
    fresh.load_state_dict(saved.optimizer)
    assert len(fresh.muon.state) and len(fresh.adamw.state)
    assert_same_state(fresh.state_dict(), saved.optimizer)


def test_muon_trains_compiled_under_bfloat16_autocast(tiny_config, tmp_path, data):
    """torch.compile, bf16 autocast and two micro-batches a step: the loss falls."""
    settings = ["train.optimizer=muon", "train.compile=true", "train.dtype=bfloat16"]
    settings += ["train.grad_accum=2", "train.max_iters=8", "train.eval_interval=8"]
    settings += ["train.warmup_iters=0", "train.lr=3e-3"]
    torch._dynamo.reset()
    try:
        trainer.train(tiny_config(tmp_path / "run", *settings), data=data, progress=False)
    finally:
        torch._dynamo.reset()
    steps = losses(tmp_path / "run")
    assert all(math.isfinite(loss) for _, loss in steps)
    assert steps[-1][1] < steps[0][1]


def test_resuming_with_another_optimizer_is_refused(tiny_config, tmp_path, data):
    out = tmp_path / "run"
    trainer.train(tiny_config(out, "train.max_iters=2", "train.eval_interval=2"), data=data,
                  progress=False)  # fmt: skip
    config = resume_config(out, {"train": {"max_iters": 4, "optimizer": "muon"}})
    with pytest.raises(MinigptError, match="holds the state of adamw"):
        trainer.train(config, resume=True, data=data, progress=False)


def test_out_dir_with_another_run_is_refused(tiny_config, tmp_path, data):
    out = tmp_path / "run"
    trainer.train(tiny_config(out, "train.max_iters=2"), data=data, progress=False)
    before = (out / TRAINER_STATE).read_bytes()
    with pytest.raises(MinigptError, match="already holds a run") as info:
        trainer.train(tiny_config(out, "train.max_iters=2"), data=data, progress=False)
    assert "--resume" in info.value.hint and "--force" in info.value.hint
    assert (out / TRAINER_STATE).read_bytes() == before  # nothing lost
    result = trainer.train(
        tiny_config(out, "train.max_iters=3", "train.seed=5"), data=data, progress=False, force=True
    )
    assert result.step == 3 and [s for s, _ in losses(out)] == [1, 2, 3]


def test_resume_refuses_bad_trainer_state(tiny_config, tmp_path, data):
    out = tmp_path / "run"
    trainer.train(tiny_config(out, "train.max_iters=2"), data=data, progress=False)
    path = out / TRAINER_STATE
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(MinigptError, match="damaged or truncated"):
        trainer.train(resume_config(out), resume=True, data=data, progress=False)

    torch.save({"format_version": 1, "payload": argparse.Namespace(x=1)}, path)  # pickled object
    with pytest.raises(MinigptError, match="refusing to unpickle"):
        checkpoint.load_trainer_state(path)

    torch.save({"step": 3}, path)  # plain, but not a trainer state
    with pytest.raises(MinigptError, match="not a minigpt trainer state"):
        checkpoint.load_trainer_state(path)

    path.unlink()
    with pytest.raises(MinigptError, match="no state to resume"):
        trainer.train(resume_config(out), resume=True, data=data, progress=False)


def test_resume_refuses_model_changes(tiny_config, tmp_path, data):
    out = tmp_path / "run"
    trainer.train(tiny_config(out, "train.max_iters=1"), data=data, progress=False)
    with pytest.raises(MinigptError, match="keeps its model config"):
        resume_config(out, {"model": {"n_layer": 3}})
    with pytest.raises(MinigptError, match="does not exist"):
        resume_config(tmp_path / "missing")


def test_block_size_larger_than_a_split(tiny_config, tmp_path, data):
    small = trainer.TrainData(data.tokenizer, data.train_tokens, data.val_tokens[:10])
    with pytest.raises(MinigptError, match="val split"):
        trainer.train(tiny_config(tmp_path / "run"), data=small, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("read_every", [1, 5])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, data, monkeypatch, read_every):
    # read_every=5 is the GPU's way (the loss stays on the device between reads): the
    # NaN of step 6 is found at the read before step 8's save, and named by its step.
    out = tmp_path / "run"
    calls = {"n": 0}

    class ReadEvery(trainer.LossLog):
        def __init__(self, device, _read_every):
            super().__init__(device, read_every)

    monkeypatch.setattr(trainer, "LossLog", ReadEvery)

    class PoisonedGPT(GPT):
        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if self.training:
                calls["n"] += 1
                if calls["n"] > 5:
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(trainer, "GPT", PoisonedGPT)
    with pytest.raises(MinigptError, match="loss became nan at step 6") as info:
        trainer.train(
            tiny_config(out, "train.max_iters=20", "train.eval_interval=4"),
            data=data,
            progress=False,
        )
    assert "train.lr" in info.value.hint
    state = checkpoint.load_trainer_state(out / TRAINER_STATE)
    assert state.step == 4
    assert all(torch.isfinite(t).all() for t in state.model.values())
    load_run(out)


def test_cli_errors_exit_2(tmp_path, minigpt_cli):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = \n")
    for argv, expected in (
        ([str(bad)], "line 2"),
        (["--set", "train.lrr=1"], "train.lr"),
        (["--set", "model.n_head=3", "--set", "model.n_embd=64"], "divisible"),
        (["--resume", str(tmp_path / "nothing")], "does not exist"),
    ):
        code, _, err = minigpt_cli("train", *argv)
        assert code == 2
        assert expected in err and "Traceback" not in err


def test_signal_flag_result_exit_codes(tmp_path):
    result = trainer.TrainResult(tmp_path, 7, math.inf, 0, 1.0, "signal", signal=15)
    assert result.exit_code == 143
    assert f"minigpt train --resume {tmp_path}" in console.resume_hint(result)
    assert trainer.TrainResult(tmp_path, 7, 1.0, 0, 1.0, "signal", signal=2).exit_code == 130


def test_config_json_records_train_and_data(tiny_config, tmp_path, data):
    out = tmp_path / "run"
    trainer.train(tiny_config(out, "train.max_iters=1"), data=data, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["format_version"] == 1
    assert saved["tokenizer"] == {"kind": "char", "vocab_size": data.tokenizer.vocab_size}
    assert set(saved) >= {"model", "train", "data"}
