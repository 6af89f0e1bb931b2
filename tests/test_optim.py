"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import re

import pytest
import torch

from minigpt import optim
from minigpt.config import load_config
from minigpt.errors import MinigptError
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


def muon_setup(*extra: str):
    config = load_config(
        None,
        ["model.vocab_size=65", "model.n_layer=2", "model.n_embd=16", "model.n_head=2",
         "model.bias=true", "train.optimizer=muon", "train.lr=1e-3", "train.muon_lr=0.02",
         *extra],
    )  # fmt: skip
    model = GPT(config.model)
    return config, model, optim.make_optimizer(model, config, torch.device("cpu"))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    config, model, optimizer = muon_setup()
    in_muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    block_matrices = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    assert in_muon == block_matrices and in_muon
    in_adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert in_adamw == {id(p) for p in model.parameters()} - block_matrices
    assert id(model.tok_emb.weight) in in_adamw  # the embedding, and the tied LM head
    decay, no_decay = optimizer.adamw.param_groups
    assert decay["weight_decay"] == config.train.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.dim() == 1 for p in no_decay["params"])  # gains and biases


def test_the_schedule_moves_muons_lr_in_step_with_adamws():
    config, _, optimizer = muon_setup()
    optim.set_lr(optimizer, config.train.lr / 2)  # halfway down the schedule
    (muon_group,) = optimizer.muon.param_groups
    assert muon_group["lr"] == pytest.approx(config.train.muon_lr / 2)
    assert all(g["lr"] == pytest.approx(config.train.lr / 2) for g in optimizer.adamw.param_groups)


def test_a_muon_step_moves_each_matrix_by_an_orthogonalised_update():
    """With momentum and weight decay off, W - W' is lr times Newton-Schulz's output for
    the gradient: its singular values sit near 1 (roughly orthogonal), where the raw
    gradient's are dominated by a few directions."""
    extra = ["train.muon_momentum=0", "train.muon_weight_decay=0"]
    config, model, optimizer = muon_setup(*extra)
    weight = model.blocks[0].attn.out_proj.weight  # square, so no shape adjustment
    before = weight.detach().clone()
    x = torch.randint(0, 65, (4, 8))
    _, loss = model(x, x)
    loss.backward()
    gradient = torch.linalg.svdvals(weight.grad)
    optimizer.step()
    update = torch.linalg.svdvals((before - weight.detach()) / config.train.muon_lr)
    assert float(update.max()) < 1.5 and float(update.median()) > 0.5, update
    spread = update.max() / update.median()
    assert spread < 2 < gradient.max() / gradient.median(), (update, gradient)


def test_muon_on_a_torch_without_it_names_the_version_needed(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(MinigptError, match=r"needs torch 2\.9 or newer") as caught:
        muon_setup()
    assert "adamw" in caught.value.hint


def test_a_resume_with_another_optimizer_is_refused_saying_which():
    config, _, optimizer = muon_setup()
    optim.check_same_optimizer(optimizer.state_dict(), config.train, "trainer.pt")
    adamw = load_config(None, ["train.optimizer=adamw"]).train
    with pytest.raises(MinigptError, match="holds the state of muon") as caught:
        optim.check_same_optimizer(optimizer.state_dict(), adamw, "trainer.pt")
    assert "train.optimizer='muon'" in caught.value.hint


@pytest.mark.parametrize(
    "setting, words",
    [
        ("train.optimizer=sgd", "train.optimizer must be one of adamw, muon"),
        ("train.muon_adjust_lr=none", "train.muon_adjust_lr must be one of"),
        ("train.muon_momentum=1.0", "train.muon_momentum must be in [0, 1)"),
        ("train.muon_lr=0", "train.muon_lr must be positive"),
        ("train.muon_weight_decay=-1", "train.muon_weight_decay must not be negative"),
    ],
)
def test_bad_muon_settings_are_refused(setting, words):
    with pytest.raises(MinigptError, match=re.escape(words)):
        load_config(None, [setting])
