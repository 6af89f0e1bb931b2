"""`minigpt train` as a process: Ctrl-C / SIGTERM save and exit 130 / 143, kill -9 at
random moments never leaves a broken run, and torchrun with 2 gloo processes matches
one process with twice the gradient accumulation."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint
from minigpt import train as trainer
from minigpt.checkpoint import LAST_WEIGHTS, TRAINER_STATE, load_run
from minigpt.config import load_config


def tiny_args(tmp_path: Path, text: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(text)
    sets = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16"]
    sets += ["train.batch_size=4", "train.eval_iters=1", "train.log_interval=1"]
    sets += ["train.warmup_iters=2", "train.lr=1e-2", "train.min_lr=1e-3", "train.threads=1"]
    sets += [f"data.data_dir={tmp_path / 'data'}"]
    args = ["--data", str(corpus), "--device", "cpu"]
    for item in sets:
        args += ["--set", item]
    return args


def env() -> dict:
    repo = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "minigpt", "train", *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_the_last_state_and_exits(code_text, wait_for_steps, tmp_path, signum, code):
    out = tmp_path / "run"
    args = [*tiny_args(tmp_path, code_text), "--out", str(out), "--max-iters", "100000"]
    args += ["--set", "train.eval_interval=100000"]
    proc = start(args, tmp_path)
    wait_for_steps(out, proc, 3)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"resume with: minigpt train --resume {out}" in stderr
    assert "Traceback" not in stderr
    state = checkpoint.load_trainer_state(out / TRAINER_STATE)
    assert state.step >= 3  # saved at the signal, not only the step-0 state
    assert state.step == max(step for step, _ in checkpoint.iter_losses(out))
    load_run(out, weights_file=LAST_WEIGHTS)


def test_kill9_at_random_moments_leaves_a_loadable_run(
    code_text, wait_for_steps, tmp_path, run_minigpt
):
    out = tmp_path / "run"
    args = [*tiny_args(tmp_path, code_text), "--set", "train.eval_interval=1"]  # saves every step
    first = run_minigpt("train", *args, "--out", out, "--max-iters", 3, cwd=tmp_path, env=env())
    assert first.returncode == 0, first.stderr
    rng = random.Random(0)
    last_step = 3
    for _ in range(3):
        proc = start([*args, "--resume", str(out), "--max-iters", "100000"], tmp_path)
        wait_for_steps(out, proc, last_step + 1)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the middle of saving, or not
        proc.kill()
        proc.communicate()
        # whatever moment the kill hit, the run loads and the state resumes
        run = load_run(out)
        assert run.model.config.n_layer == 1
        load_run(out, weights_file=LAST_WEIGHTS)
        state = checkpoint.load_trainer_state(out / TRAINER_STATE)
        assert state.step >= last_step
        last_step = state.step
    # and the run resumes cleanly after the last kill
    done = run_minigpt(
        "train", *args, "--resume", out, "--max-iters", last_step + 2, cwd=tmp_path, env=env()
    )
    assert done.returncode == 0, done.stderr
    assert checkpoint.load_trainer_state(out / TRAINER_STATE).step == last_step + 2
    steps = [step for step, _ in checkpoint.iter_losses(out)]
    assert steps == list(range(1, last_step + 3))  # killed steps were re-run, not duplicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torchrun_two_gloo_processes_match_one_with_twice_the_accumulation(
    code_text, tmp_path, optimizer
):
    args = [*tiny_args(tmp_path, code_text), "--set", f"train.optimizer={optimizer}"]
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    steps = "4"
    launcher = ["--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launcher += ["--master_port", str(_free_port())]
    train = ["train", *args, "--out", str(ddp_out), "--max-iters", steps]
    train += ["--set", "train.grad_accum=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "minigpt", *train],
        cwd=tmp_path,
        env={**env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done (reached max_iters)") == 1  # only rank 0 prints

    sets = [a for a in args[args.index("--set") :] if a != "--set"]
    sets += [f"data.source={tmp_path / 'corpus.txt'}", "train.device=cpu"]
    sets += [f"train.out_dir={single_out}", f"train.max_iters={steps}", "train.grad_accum=2"]
    config = load_config(None, sets)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        trainer.train(config, progress=False)
    finally:
        os.chdir(cwd)
    ddp_losses = dict(checkpoint.iter_losses(ddp_out))
    single_losses = dict(checkpoint.iter_losses(single_out))
    assert sorted(ddp_losses) == [1, 2, 3, 4]
    for step in ddp_losses:
        assert abs(ddp_losses[step] - single_losses[step]) < 1e-5, step
    # the weights after the last step agree as well
    a = checkpoint.load_trainer_state(ddp_out / TRAINER_STATE).model
    b = checkpoint.load_trainer_state(single_out / TRAINER_STATE).model
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
