"""The optimizer and the learning-rate schedule, as nanoGPT has them, and Muon.

AdamW, with weight decay on the matrices only; the learning rate rises linearly for
warmup_iters steps, then follows a cosine down to min_lr, over steps (up to
lr_decay_iters, default max_iters) or over seconds of training (up to max_time).
The trainer sets each step's rate itself (`lr_at`), so a resumed run needs no
scheduler state: the step and the elapsed time are enough.

With train.optimizer = "muon", `torch.optim.Muon` (Keller Jordan's MomentUm
Orthogonalized by Newton-Schulz, as the GPT-2 speedrun and nanochat use it) trains
every matrix inside the blocks: momentum SGD whose update of each weight matrix is
replaced by the nearest orthogonal matrix, a few Newton-Schulz iterations away. An
orthogonal update changes the matrix by the same amount in every direction, where
a raw gradient is dominated by a few. The embeddings (a lookup table, and through
the tied LM head also the output layer), the norms' gains and the biases are not
such matrices, so AdamW keeps them, with the settings above.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt.config import RunConfig, TrainConfig
from minigpt.errors import MinigptError
from minigpt.model import GPT


def make_optimizer(model: GPT, config: RunConfig, device: torch.device):
    """AdamW with weight decay on matrices (dim >= 2) only: not on biases or LayerNorm
    gains; with train.optimizer = "muon", Muon for the blocks' matrices and AdamW for
    the rest (`MuonAndAdamW`)."""
    train = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer != "muon":
        return _adamw(params, train, device)
    matrices = [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]
    in_muon = {id(p) for p in matrices}
    muon = _muon_class()(
        [{"params": matrices, "lr_scale": train.muon_lr / train.lr}],
        lr=train.muon_lr,
        momentum=train.muon_momentum,
        weight_decay=train.muon_weight_decay,
        adjust_lr_fn=train.muon_adjust_lr,
    )
    adamw = _adamw([p for p in params if id(p) not in in_muon], train, device)
    return MuonAndAdamW(muon, adamw)


def _adamw(params: list[nn.Parameter], train: TrainConfig, device: torch.device):
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = {"lr": train.lr, "betas": (train.beta1, train.beta2)}
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=device.type != "cpu" or None, **kwargs)


MUON_TORCH = "2.9"
"""The first torch with torch.optim.Muon."""


def _muon_class() -> type[torch.optim.Optimizer]:
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise MinigptError(
            f"train.optimizer='muon' needs torch {MUON_TORCH} or newer (torch.optim.Muon); "
            f"this is torch {torch.__version__}",
            hint=f"pip install -U 'torch>={MUON_TORCH}', or train with train.optimizer='adamw'",
        )
    return muon


class MuonAndAdamW:
    """Muon and AdamW stepped as one optimizer: the calls the trainer makes (step,
    zero_grad, state_dict, load_state_dict) go to both, and `param_groups` lists
    both's groups, so the schedule sets every group's lr (`set_lr`)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        """Every parameter's state (Muon's momentum, AdamW's moments)."""
        return {**self.muon.state, **self.adamw.state}

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def check_same_optimizer(saved: dict, train: TrainConfig, where: str) -> None:
    """A resumed run's optimizer state (trainer.pt's) must be the one train.optimizer makes."""
    saved_name = "muon" if "muon" in saved else "adamw"
    if saved_name != train.optimizer:
        raise MinigptError(
            f"{where} holds the state of {saved_name}, and this run asks for "
            f"train.optimizer={train.optimizer!r}",
            hint=f"resume with train.optimizer={saved_name!r}, or start a new run from "
            "this one's weights with --init-from",
        )


def lr_at(step: int, config: RunConfig, elapsed: float = 0.0) -> float:
    """Linear warmup for warmup_iters steps, then cosine decay to min_lr.

    The decay runs over steps up to lr_decay_iters (default max_iters), or over
    elapsed seconds up to max_time when decay_by_time is set.
    """
    train = config.train
    if step < train.warmup_iters:
        return train.lr * (step + 1) / (train.warmup_iters + 1)
    if train.decay_by_time:
        ratio = min(1.0, elapsed / train.max_time)
    else:
        decay_iters = train.lr_decay_iters or train.max_iters
        if step >= decay_iters:
            return train.min_lr
        ratio = (step - train.warmup_iters) / max(1, decay_iters - train.warmup_iters)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train.lr - train.min_lr)


def set_lr(optimizer: torch.optim.Optimizer | MuonAndAdamW, lr: float) -> None:
    """Set the schedule's lr: AdamW's groups take it as it is, Muon's scaled by
    muon_lr / lr (its `lr_scale`), so both follow one warmup and decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def schedule_change(before: TrainConfig, now: TrainConfig, step: int) -> str | None:
    """One line when a resumed run's lr schedule differs from the one it was started
    with (a new max_iters moves the end of the cosine decay), else None. Resume
    reproduces a run exactly only when the schedule is unchanged."""
    old, new = _schedule(before), _schedule(now)
    changed = [f"{key} {old[key]} -> {new[key]}" for key in old if old[key] != new[key]]
    if not changed:
        return None
    return (
        f"the lr schedule changed on resume ({', '.join(changed)}): from step {step + 1} "
        "the lr follows the new one, so this run differs from one trained with these "
        "settings from the start"
    )


def _schedule(train: TrainConfig) -> dict[str, object]:
    """What `lr_at` depends on."""
    decay_end = (
        f"{train.max_time} s"
        if train.decay_by_time
        else f"step {train.lr_decay_iters or train.max_iters}"
    )
    return {
        "lr": train.lr,
        "min_lr": train.min_lr,
        "warmup_iters": train.warmup_iters,
        "decay ends at": decay_end,
    }
