"""`torchrun` with the default settings trains on any number of processes: each process
runs one micro-batch a step, the run directory records the total, and a resume on
another number of processes sees the same batches. An explicit total that the processes
cannot split is refused with one sentence, and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from minigpt import checkpoint
from minigpt.checkpoint import TRAINER_STATE, read_config


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    launcher = ["--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "minigpt", "train", *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )


def train_args(tmp_path: Path, tiny_train) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_train.text)
    sets = [*tiny_train.sets, f"data.data_dir={tmp_path / 'data'}"]
    return ["--data", str(corpus), *[a for s in sets for a in ("--set", s)]]


def test_two_processes_by_default_resume_on_one_as_one_process_with_two_micro_batches(
    tmp_path, tiny_train, run_minigpt
):
    args = train_args(tmp_path, tiny_train)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    proc = torchrun(2, [*args, "--out", str(ddp), "--max-iters", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes: 128 tokens per step" in proc.stdout  # 4 x 16 on each process
    assert read_config(ddp)["train"]["grad_accum"] == 2

    resumed = run_minigpt("train", "--resume", ddp, "--max-iters", "4", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "128 tokens per step (2 micro-batches)" in resumed.stdout
    straight = run_minigpt(
        "train", *args, "--out", single, "--max-iters", "4", "--set", "train.grad_accum=2",
        cwd=tmp_path,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]

    ddp_losses, single_losses = tiny_train.losses(ddp), tiny_train.losses(single)
    assert [step for step, _ in ddp_losses] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(ddp_losses, single_losses, strict=True):
        assert abs(a - b) < 1e-5, step
    a = checkpoint.load_trainer_state(ddp / TRAINER_STATE).model
    b = checkpoint.load_trainer_state(single / TRAINER_STATE).model
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_a_total_the_processes_cannot_split_is_refused_on_every_rank(tmp_path, tiny_train):
    out = tmp_path / "run"
    args = [*train_args(tmp_path, tiny_train), "--out", str(out), "--max-iters", "2"]
    proc = torchrun(3, [*args, "--set", "train.grad_accum=2"], tmp_path)
    assert proc.returncode != 0
    sentence = "error: 2 micro-batches per optimizer step cannot be split evenly over 3 processes"
    assert proc.stderr.count(sentence) == 3, proc.stderr[-3000:]
    assert "hint: make train.grad_accum a multiple of 3, or 0 for one on each process" in (
        proc.stderr
    )
    assert not out.exists()
