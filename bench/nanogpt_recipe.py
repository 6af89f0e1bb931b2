"""nanoGPT's training recipe, re-typed here as the peer that bench/train.py and
bench/gpu.py time beside `minigpt train` in the same run.

nanoGPT is not a dependency (and the GPU machines cannot download it), so this file
follows its published recipe, in our own code, closely enough that the two time the
same work:

- the model: token + learned position embeddings, pre-norm blocks of LayerNorm
  (optional bias), one fused QKV Linear, `scaled_dot_product_attention(is_causal=True)`
  with dropout while training, an exact-GELU MLP of 4 x n_embd; final LayerNorm;
  an output layer tied to the token embedding; the loss is `F.cross_entropy` over
  all positions' logits;
- the optimizer: AdamW (beta1 0.9, the config's beta2: 0.95 for GPT-2, 0.99 for
  shakespeare-char), weight decay on the >= 2-d weights only, fused on CUDA, foreach
  elsewhere; linear warm-up and cosine decay (`lr_at`, its get_lr);
- the loop: bf16 autocast on CUDA (none on a CPU), `torch.compile` when asked, TF32
  matmuls; each micro-batch's loss divided by the accumulation steps; the next batch
  drawn while the GPU still runs the forward pass; a fresh `np.memmap` of the token
  file and one slice per row for each batch, pinned and copied without blocking on
  CUDA; the gradient clipped at 1.0; `zero_grad(set_to_none=True)`; the loss read
  on the host (`.item()`) only every `log_interval` steps.

What it leaves out does not take time per step: GradScaler (disabled for bf16),
checkpoints and logging. Its evaluation (`estimate_loss`) runs only when asked, and
is left out of the rates.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.model import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be left out (nn.LayerNorm's bias could not, in the
    torch versions nanoGPT was written for)."""

    def __init__(self, n_embd: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RecipeGPT(nn.Module):
    """nanoGPT's model for a minigpt GPTConfig (GPT-2 options only)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # residual projections scaled down by depth, as GPT-2
                std = 0.02 / math.sqrt(2 * c.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = idx.size(1)
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


@dataclass
class Recipe:
    """The optimizer and schedule settings of one nanoGPT config (defaults: train.py's,
    for GPT-2 124M; `SHAKESPEARE_CHAR` is config/train_shakespeare_char.py's)."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 10  # train.py's 2000 is longer than a benchmark; not a speed matter
    lr_decay_iters: int = 0  # 0: the run's steps
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0


SHAKESPEARE_CHAR = Recipe(lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99)


def recipe_optimizer(model: nn.Module, device: torch.device, recipe: Recipe) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, recipe.beta2), **extra)


def get_batch(path: Path, block_size: int, batch_size: int, device: torch.device):
    """x, y (batch_size, block_size) int64: random windows of the uint16 token file.
    The memmap is opened afresh every call, as nanoGPT does (it avoids a memory leak)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    starts = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack(
        [torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in starts]
    )
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
            device, non_blocking=True
        )
    return x.to(device), y.to(device)


def lr_at(it: int, recipe: Recipe, decay_iters: int) -> float:
    """nanoGPT's get_lr: linear warm-up, then cosine decay to min_lr."""
    if it < recipe.warmup_iters:
        return recipe.lr * (it + 1) / (recipe.warmup_iters + 1)
    if it > decay_iters:
        return recipe.min_lr
    ratio = (it - recipe.warmup_iters) / max(1, decay_iters - recipe.warmup_iters)
    return recipe.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (recipe.lr - recipe.min_lr)


@torch.no_grad()
def estimate_loss(model: nn.Module, tokens_file: Path, batch: int, eval_iters: int,
                  device: torch.device, autocast) -> float:  # fmt: skip
    """Mean loss over eval_iters random batches of a split, in eval mode (no dropout)."""
    model.eval()
    total = 0.0
    for _ in range(eval_iters):
        x, y = get_batch(tokens_file, model.config.block_size, batch, device)
        with autocast:
            _, loss = model(x, y)
        total += loss.item()
    model.train()
    return total / eval_iters


def train_loop_rate(
    config: GPTConfig,
    tokens_file: Path,
    batch: int,
    accum: int,
    steps: int,
    device: torch.device,
    compile: bool,
    recipe: Recipe | None = None,
    first_timed: int = 10,
    log_interval: int = 10,
    seed: int = 1337,
    val_file: Path | None = None,
    eval_interval: int = 0,
    eval_iters: int = 20,
) -> dict:
    """ms/step and tokens/s of the recipe's loop from step `first_timed` to `steps` (the
    steps before it compile and warm up), read every `log_interval` steps, when the
    host waits for the GPU; and the last loss read. With `val_file` and
    `eval_interval`, also the validation loss every eval_interval steps (nanoGPT's
    estimate_loss; its time is left out of the rates)."""
    recipe = recipe or Recipe()
    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = RecipeGPT(config).to(device)
    optimizer = recipe_optimizer(model, device, recipe)
    step_model = torch.compile(model) if compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    decay_iters = recipe.lr_decay_iters or steps
    x, y = get_batch(tokens_file, config.block_size, batch, device)
    loss_read, read_times, val_losses, paused = float("nan"), {}, {}, 0.0
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, recipe, decay_iters)
        for _ in range(accum):
            with autocast:
                _, loss = step_model(x, y)
                loss = loss / accum
            x, y = get_batch(tokens_file, config.block_size, batch, device)  # while the GPU works
            loss.backward()
        if recipe.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_interval == 0:
            loss_read = loss.item() * accum  # the host waits for the GPU here only
            read_times[step] = time.perf_counter() - paused
        if val_file is not None and eval_interval and step % eval_interval == 0:
            started = time.perf_counter()
            val_losses[step] = estimate_loss(model, val_file, batch, eval_iters, device, autocast)
            paused += time.perf_counter() - started
    result = {"recipe_loss": loss_read} | step_rates(
        "recipe_", read_times, batch * accum * config.block_size, first_timed
    )
    if val_losses:
        result["recipe_val_losses"] = val_losses
    return result


def step_rates(prefix: str, read_times: dict[int, float], tokens_per_step: int,
               first_timed: int) -> dict:  # fmt: skip
    """ms/step and tokens/s from the times at which steps finished (step -> seconds), from
    step `first_timed` on: over the whole span, and in the fastest window between two
    readings (on a shared machine, the one least slowed by other work)."""
    steps = sorted(step for step in read_times if step >= first_timed)
    spans = [(b - a, read_times[b] - read_times[a]) for a, b in itertools.pairwise(steps)]
    mean = (read_times[steps[-1]] - read_times[steps[0]]) / (steps[-1] - steps[0])
    best = min(seconds / n for n, seconds in spans)
    return {
        f"{prefix}step_ms": mean * 1e3,
        f"{prefix}tokens_per_s": tokens_per_step / mean,
        f"{prefix}best_step_ms": best * 1e3,
        f"{prefix}best_tokens_per_s": tokens_per_step / best,
    }
