"""The optimizer and the learning-rate schedule, as nanoGPT has them.

AdamW, with weight decay on the matrices only; the learning rate rises linearly for
warmup_iters steps, then follows a cosine down to min_lr, over steps (up to
lr_decay_iters, default max_iters) or over seconds of training (up to max_time).
The trainer sets each step's rate itself (`lr_at`), so a resumed run needs no
scheduler state: the step and the elapsed time are enough.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt.config import RunConfig, TrainConfig


def make_optimizer(model: nn.Module, config: RunConfig, device: torch.device):
    """AdamW with weight decay on matrices (dim >= 2) only: not on biases or LayerNorm gains."""
    train = config.train
    params = [p for p in model.parameters() if p.requires_grad]
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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
