"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from minigpt import optim
from minigpt.config import load_config
from minigpt.model import GPT


def test_lr_schedule_warmup_then_cosine():
    config = load_config(
        None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_iters=10", "train.max_iters=110"]
    )
    lrs = [optim.lr_at(step, config) for step in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))  # warmup rises
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway down the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=False))
    assert lrs[110] == lrs[119] == pytest.approx(0.1)
    by_time = ["train.max_time=100", "train.decay_by_time=true"]
    timed = load_config(
        None, ["train.lr=1.0", "train.min_lr=0.0", "train.warmup_iters=0", *by_time]
    )
    assert optim.lr_at(5, timed, elapsed=50.0) == pytest.approx(0.5)
    assert optim.lr_at(5, timed, elapsed=100.0) == pytest.approx(0.0)


def test_weight_decay_on_matrices_only():
    config = load_config(
        None, ["model.vocab_size=65", "model.n_layer=1", "model.n_embd=16", "model.n_head=2"]
    )
    model = GPT(config.model)
    optimizer = optim.make_optimizer(model, config, torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == config.train.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.dim() == 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    n_params = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == n_params


def test_a_changed_schedule_is_named_on_resume():
    before = load_config(None, ["train.max_iters=15"]).train
    assert optim.schedule_change(before, before, 15) is None
    pinned = load_config(None, ["train.max_iters=15", "train.lr_decay_iters=30"]).train
    longer = load_config(None, ["train.max_iters=30", "train.lr_decay_iters=30"]).train
    assert optim.schedule_change(pinned, longer, 15) is None  # the decay end did not move
    line = optim.schedule_change(before, load_config(None, ["train.max_iters=30"]).train, 15)
    assert "step 15 -> step 30" in line and "from step 16" in line
