"""The pieces a transformer block is made of besides attention.

- Norms: `nn.LayerNorm` (GPT-2) or `RMSNorm` (Llama, nanochat), picked by `make_norm`.
- Positions: `LearnedPositions` adds a learned vector per position to the tokens
  (GPT-2); `RotaryPositions` adds nothing and gives the angles that turn Q and K in
  every attention layer instead (`apply_rope`).
- Feed-forward: `MLP` (n_embd -> 4 n_embd -> GELU or ReLU² -> n_embd) or `SwiGLU`.

Which of each a model uses is decided once, when the model is built, so the forward
pass never asks.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from minigpt.model import GPTConfig

Rope = tuple[Tensor, Tensor]
"""cos and sin of the rotary angles, each (T, d_head / 2)."""


class RMSNorm(nn.Module):
    """x / rms(x) * gain over the last dimension: LayerNorm without the mean and the
    bias (Zhang & Sennrich, 2019), as Llama and nanochat use it."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # the mean of squares in float32, whatever x's dtype
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * scale * self.weight.float()).to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    """The block's and the final normalisation: LayerNorm (GPT-2) or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


# --- positions -------------------------------------------------------------------------


class LearnedPositions(nn.Embedding):
    """GPT-2's positions: row p of a (block_size, n_embd) table is added to the token
    at position p. The table has block_size rows, so no input may be longer."""

    def forward(self, x: Tensor, positions: Tensor) -> tuple[Tensor, None]:
        """x (B, T, n_embd), positions (T,) or (B, T) -> (x + their rows, no rotary angles)."""
        return x + super().forward(positions), None

    def rope(self, positions: Tensor) -> None:
        """No rotary angles: the positions were added to x."""
        return None


class RotaryPositions(nn.Module):
    """Rotary positions (Su et al., 2021): nothing is added to x; instead every layer
    turns each head's Q and K by an angle proportional to the position, so the score
    of a query at m and a key at n depends on m and n only through m - n."""

    def __init__(self, d_head: int, theta: float):
        super().__init__()
        self.d_head, self.theta = d_head, theta

    def forward(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Rope]:
        """x (B, T, n_embd), positions (T,) -> (x as it is, cos and sin of the angles)."""
        return x, self.rope(positions)

    def rope(self, positions: Tensor) -> Rope:
        """cos and sin of the angles of positions (T,), each (T, d_head / 2)."""
        return rope_angles(positions, self.d_head, self.theta)


def rope_angles(positions: Tensor, d_head: int, theta: float) -> Rope:
    """cos and sin of position p times frequency theta^(-2i / d_head), each (T, d_head / 2),
    for positions (T,): the rotation of each pair of features at each position.

    Positions (B, T), where each sequence of a batch sits at its own place (continuous
    batching, `minigpt.batching`), give (B, 1, T, d_head / 2): one row per sequence,
    the same for all its heads."""
    inv_freq = theta ** -(torch.arange(0, d_head, 2, device=positions.device) / d_head)
    angles = positions.float()[..., None] * inv_freq  # (T, d_head / 2) or (B, T, d_head / 2)
    if positions.dim() == 2:
        angles = angles[:, None]  # (B, 1, T, d_head / 2): broadcast over the heads
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, d_head) feature pair (i, i + d_head / 2) by angle (T, d_head / 2).

    A query at position m and a key at n rotated so give q_m . k_n that depends on m
    and n only through m - n: positions enter attention as offsets.
    """
    x1, x2 = x.chunk(2, dim=-1)  # each (..., T, d_head / 2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# --- feed-forward ----------------------------------------------------------------------


def relu_squared(x: Tensor) -> Tensor:
    return F.relu(x).square()


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu2": relu_squared,
}
"""The gelu MLP's nonlinearity, by `GPTConfig.activation`."""


class MLP(nn.Module):
    """Position-wise feed-forward: n_embd -> 4 n_embd -> GELU (or ReLU²) -> n_embd."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # GPT-2 was trained with the tanh approximation of GELU, which differs from the
        # exact one by up to ~1e-3 per activation: an imported model keeps the one it had.
        # ReLU² (So et al., 2021) is the GPT-2 speedrun's: cheap, and sparse.
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class SwiGLU(nn.Module):
    """Position-wise feed-forward of Llama: (silu(x W1) * x W3) W2 (Shazeer, 2020).

    Three matrices instead of two, so the hidden width is 8/3 n_embd instead of 4 n_embd
    (`GPTConfig.mlp_hidden`): about the parameters of the GELU MLP."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden
        self.fc_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)  # W1
        self.fc_up = nn.Linear(config.n_embd, hidden, bias=config.bias)  # W3
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)  # W2
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.silu(self.fc_gate(x)) * self.fc_up(x)))
