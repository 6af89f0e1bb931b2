"""The GPT: token + position embeddings, a stack of pre-norm blocks, a tied LM head.

    idx (B, T) -> tok_emb + pos_emb (B, T, n_embd)                       `GPT.embed`
               -> n_layer x Block: x + Attn(LN(x)), then x + MLP(LN(x))  `GPT.run_blocks`
               -> LN -> lm_head (B, T, vocab_size), cross-entropy        `GPT.logits_and_loss`

The defaults are GPT-2's. Options of today's small GPTs (nanochat, Llama) can be
turned on one at a time to see what each changes: rotary positions instead of
pos_emb (`position="rope"`), RMSNorm (`norm`), a SwiGLU MLP (`mlp`), grouped-query
attention (`n_kv_head`) and QK-norm (`qk_norm`).

`GPT.forward` is these three steps; they are public so that a caller (the head
inspector) can restart the blocks from any layer's residual stream.

Each block's attention is `minigpt.attention.MultiHeadAttention` (or the textbook
wrapper form when `GPTConfig.attention == "wrapper"`; both save the same weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.attention import (
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    RMSNorm,
    causal_mask,
    rope_for_input,
)
from minigpt.device import check_memory
from minigpt.errors import MinigptError
from minigpt.kv_cache import KVCache
from minigpt.loss import lm_head_loss

ATTENTION_FORMS = ("fused", "wrapper")
ACTIVATIONS = ("gelu", "gelu_tanh")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
SWIGLU_MULTIPLE = 64
"""SwiGLU's hidden width is 8/3 n_embd rounded up to a multiple of this (Llama's rule,
with 64 where Llama has 256, which is too coarse for widths of a few hundred)."""


@dataclass
class GPTConfig:
    """The shape of a GPT. Every field is saved in a run's config.json.

    The defaults are the default run's model (`minigpt train` with no config, and
    configs/default.toml): small enough to train in minutes on a laptop CPU.
    """

    vocab_size: int = 0
    """Token ids the model knows; 0 means the tokenizer's vocab size (a larger value pads, e.g. 50304 for GPT-2)."""
    block_size: int = 128
    """Context length: the most positions the model attends over."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; n_embd must be divisible by it."""
    n_embd: int = 128
    """Width of the residual stream (d_model); each head is n_embd / n_head wide."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings while training."""
    bias: bool = False
    """Biases in the linear layers and LayerNorms (GPT-2 has them)."""
    attention: str = "fused"
    """'fused' (one QKV matmul + SDPA, fast) or 'wrapper' (one module per head, textbook)."""
    init_std: float = 0.02
    """Std of the normal init of weights (GPT-2: 0.02); residual projections get / sqrt(2 n_layer)."""
    activation: str = "gelu"
    """The MLP's nonlinearity: 'gelu' (exact, erf) or 'gelu_tanh' (the tanh approximation GPT-2 was trained with)."""
    layer_norm_eps: float = 1e-5
    """The epsilon added to the variance in every LayerNorm or RMSNorm (GPT-2: 1e-5)."""
    position: str = "learned"
    """'learned' (a pos_emb row added per position, GPT-2) or 'rope' (Q and K rotated by position)."""
    rope_theta: float = 10000.0
    """The base of the rotary frequencies theta^(-2i / d_head) (used with position='rope')."""
    norm: str = "layernorm"
    """'layernorm' (GPT-2) or 'rmsnorm' (no mean, no bias: Llama, nanochat)."""
    mlp: str = "gelu"
    """'gelu' (n_embd -> 4 n_embd -> n_embd) or 'swiglu' (silu(x W1) * x W3, then W2; hidden
    width 8/3 n_embd rounded up to a multiple of 64, so the parameters stay about the same)."""
    n_kv_head: int = 0
    """Heads of K and V (grouped-query attention); 0 means n_head. n_head must be a multiple."""
    qk_norm: bool = False
    """RMSNorm of every head's Q and K before the scores (OLMo 2, Qwen3, nanochat)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            least = 0 if name == "vocab_size" else 1  # vocab_size 0: the tokenizer's size
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                what = "a positive integer" if least else "0 or a positive integer"
                raise MinigptError(
                    f"model.{name} must be {what}, got {value!r}",
                    hint=f"set model.{name} to a whole number of at least {least}",
                )
        for name in ("dropout", "init_std", "layer_norm_eps"):
            value = getattr(self, name)
            if not _is_finite_number(value):
                raise MinigptError(f"model.{name} must be a finite number, got {value!r}")
        if not isinstance(self.bias, bool):
            raise MinigptError(f"model.bias must be true or false, got {self.bias!r}")
        if self.n_embd % self.n_head != 0:
            raise MinigptError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                hint=f"pick n_embd as a multiple of n_head, e.g. {self.n_head * max(1, self.n_embd // self.n_head)}",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise MinigptError(
                f"model.dropout must be in [0, 1), got {self.dropout}",
                hint="use 0.0 for no dropout, 0.1-0.2 for small data",
            )
        if self.attention not in ATTENTION_FORMS:
            raise MinigptError(
                f"model.attention must be one of {ATTENTION_FORMS}, got {self.attention!r}",
                hint="use 'fused' unless you are studying the per-head form",
            )
        if not self.init_std > 0:
            raise MinigptError(f"model.init_std must be positive, got {self.init_std}")
        if self.activation not in ACTIVATIONS:
            raise MinigptError(
                f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}",
                hint="'gelu_tanh' is GPT-2's (Hugging Face calls it gelu_new); 'gelu' is exact",
            )
        if not self.layer_norm_eps > 0:
            raise MinigptError(
                f"model.layer_norm_eps must be positive, got {self.layer_norm_eps}",
                hint="GPT-2 uses 1e-5",
            )
        for name, allowed in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise MinigptError(
                    f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}",
                    hint=f"'{allowed[0]}' is GPT-2's; '{allowed[1]}' is the modern option",
                )
        if not (_is_finite_number(self.rope_theta) and self.rope_theta > 0):
            raise MinigptError(
                f"model.rope_theta must be a positive number, got {self.rope_theta!r}",
                hint="10000 is the usual base",
            )
        if self.position == "rope" and self.d_head % 2:
            raise MinigptError(
                f"model.position='rope' needs an even head size, got "
                f"n_embd / n_head = {self.d_head}",
                hint="rotary embeddings turn pairs of features: pick n_embd / n_head even",
            )
        kv = self.n_kv_head
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 0 or kv > self.n_head:
            raise MinigptError(
                f"model.n_kv_head must be from 0 (n_head) to n_head={self.n_head}, got {kv!r}",
                hint="0 gives every query head its own K and V",
            )
        if kv and self.n_head % kv:
            raise MinigptError(
                f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={kv}",
                hint="each group of query heads shares one K/V head: pick a divisor of n_head",
            )
        if not isinstance(self.qk_norm, bool):
            raise MinigptError(f"model.qk_norm must be true or false, got {self.qk_norm!r}")
        if self.mlp == "swiglu" and self.activation != "gelu":
            raise MinigptError(
                f"model.activation={self.activation!r} is the gelu MLP's; SwiGLU uses SiLU",
                hint="leave model.activation out with model.mlp='swiglu'",
            )

    def num_params(self) -> int:
        """Parameters of the GPT this config builds (the tied LM head counted once),
        computed without building it: so an absurd shape is refused before any memory
        is allocated."""
        C, b = self.n_embd, int(self.bias)
        d_kv = self.kv_heads * self.d_head
        norm = C + (b * C if self.norm == "layernorm" else 0)  # gain (and LayerNorm's bias)
        attention = (C + 2 * d_kv) * C + C * C + b * (C + 2 * d_kv + C)  # W_qkv, W_o
        attention += 2 * self.d_head if self.qk_norm else 0  # the Q and K gains
        hidden = self.mlp_hidden
        if self.mlp == "swiglu":  # W1, W3 (C -> hidden) and W2 (hidden -> C)
            mlp = 3 * C * hidden + b * (2 * hidden + C)
        else:
            mlp = 2 * C * hidden + b * (hidden + C)
        positions = self.block_size * C if self.position == "learned" else 0
        per_layer = attention + mlp + 2 * norm
        return self.vocab_size * C + positions + self.n_layer * per_layer + norm

    @property
    def kv_heads(self) -> int:
        """Heads of K and V: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4 n_embd, or SwiGLU's 8/3 n_embd rounded up to SWIGLU_MULTIPLE."""
        if self.mlp == "swiglu":
            return -(-8 * self.n_embd // 3 // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE
        return 4 * self.n_embd

    def module_bytes(self) -> int:
        """Bytes the built module holds in float32: its weights and the causal masks
        (one bool block_size² mask per attention module; the wrapper has one per head)."""
        masks_per_layer = self.n_head if self.attention == "wrapper" else 1
        return 4 * self.num_params() + self.n_layer * masks_per_layer * self.block_size**2

    def with_vocab(self, tokenizer_vocab_size: int) -> GPTConfig:
        """This shape for a tokenizer of `tokenizer_vocab_size` ids: 0 takes the tokenizer's size."""
        if self.vocab_size == 0:
            return replace(self, vocab_size=tokenizer_vocab_size)
        if self.vocab_size < tokenizer_vocab_size:
            raise MinigptError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer_vocab_size} tokens",
                hint="leave model.vocab_size at 0 to use the tokenizer's size",
            )
        return self

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    def describe(self) -> str:
        """The shape in a few words, e.g. '4 layers x 4 heads x 128 wide, ctx 128, vocab 65'."""
        return (
            f"{self.n_layer:,} layers x {self.n_head:,} heads x {self.n_embd:,} wide, "
            f"ctx {self.block_size:,}, vocab {self.vocab_size:,} ({float(self.num_params()):.3g} parameters)"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config.json") -> GPTConfig:
        """The config saved as a dict (config.json's "model"), checked key by key."""
        if not isinstance(values, dict):
            raise MinigptError(
                f"{where} has no model config (its 'model' entry is {values!r})",
                hint="the file is damaged or was not written by minigpt train",
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MinigptError(
                f"unknown model config keys: {', '.join(unknown)}",
                hint=f"valid keys are {', '.join(sorted(known))}",
            )
        return cls(**values)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def make_norm(config: GPTConfig) -> nn.Module:
    """The block's and the final normalisation: LayerNorm (GPT-2) or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


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


class MLP(nn.Module):
    """Position-wise feed-forward: n_embd -> 4 n_embd -> GELU -> n_embd."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # GPT-2 was trained with the tanh approximation of GELU, which differs from the
        # exact one by up to ~1e-3 per activation: an imported model keeps the one it had.
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        attention_cls = (
            MultiHeadAttention if config.attention == "fused" else MultiHeadAttentionWrapper
        )
        self.ln_attn = make_norm(config)
        self.attn = attention_cls(
            config.n_embd,
            config.n_embd,
            config.block_size,
            config.n_head,
            qkv_bias=config.bias,
            out_bias=config.bias,
            dropout=config.dropout,
            layer_idx=layer_idx,
            check_inputs=False,  # GPT.forward checks its input once for every layer
            n_kv_head=config.kv_heads,
            qk_norm=config.qk_norm,
            rope_theta=config.rope_theta if config.position == "rope" else None,
            norm_eps=config.layer_norm_eps,
        )
        self.ln_mlp = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(
        self,
        x: Tensor,
        gate: Tensor | None,
        kv_cache: KVCache | None,
        need_weights: bool,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, n_embd) -> (x (B, T, n_embd), A (B, H, T, T_k) or None); the
        arguments are the attention's (`GPT.run_blocks` passes every one)."""
        attn_out, weights = self.attn(self.ln_attn(x), gate, kv_cache, need_weights, rope)
        x = x + attn_out
        x = x + self.mlp(self.ln_mlp(x))
        return x, weights


class GPT(nn.Module):
    """A decoder-only transformer language model (GPT-2 architecture)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size == 0:
            raise MinigptError(
                "model.vocab_size is 0 (the tokenizer's size), which a model cannot be built with",
                hint="resolve it first with config.with_vocab(tokenizer.vocab_size)",
            )
        check_memory(config.module_bytes(), torch.device("cpu"), f"a model of {config.describe()}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":  # with rope, positions turn Q and K instead
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017): the output embedding is the input one.
        # Saves vocab_size * n_embd parameters and trains better on small data.
        self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @classmethod
    def for_weights(cls, config: GPTConfig, device: str | torch.device = "cpu") -> GPT:
        """A model whose every weight is about to be loaded: built on the meta device and
        given uninitialised memory, so no weight is drawn at random only to be
        overwritten (for GPT-2 small that drawing is 2 s of every command's start-up)."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        model.lm_head.weight = model.tok_emb.weight  # to_empty gave each its own tensor
        for module in model.modules():  # M, the one buffer: derived, so never loaded
            if isinstance(getattr(module, "mask", None), Tensor):
                module.mask = causal_mask(module.context_length).to(model.device)
        return model

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases; residual projections
        (attention W^O and the MLP's output) scaled by 1/sqrt(2 n_layer) so the
        residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    @property
    def device(self) -> torch.device:
        """Where the weights live (inputs and caches must be made there)."""
        return self.tok_emb.weight.device

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (the token
        embedding is counted once, as the tied LM head uses it)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.position == "learned":
            return n - self.pos_emb.weight.numel()
        return n

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache for this model, on its device, in its activation dtype."""
        return KVCache(
            self.config.n_layer,
            batch_size,
            self.config.kv_heads,
            max_len or self.config.block_size,
            self.config.d_head,
            device=self.device,
            dtype=dtype or self.tok_emb.weight.dtype,
            # rotary positions: attention sees offsets only, so the window can slide
            rolling=self.config.position == "rope",
        )

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        head_gates: Tensor | None = None,
        last_only: bool = False,
        loss_chunk: int = 0,
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        targets: (B, T) next-token ids; -1 marks positions to ignore in the loss.
        kv_cache: continue from the positions it holds; this call's are appended.
        head_gates: (n_layer, H) or (n_layer, B, H) multipliers of each head's output.
        last_only: compute logits for the last position only (B, 1, vocab_size), as
            sampling needs; saves the large vocab matmul on every other position.
        loss_chunk: with targets, make the logits this many positions at a time for
            the loss and return None for them (`minigpt.loss`: a fraction of the memory).
        """
        x = self.embed(idx, kv_cache.pos if kv_cache is not None else 0)  # (B, T, n_embd)
        if kv_cache is not None:
            B, T = idx.shape
            c = self.config
            kv_cache.check_fits(c.n_layer, B, c.kv_heads, c.d_head, T)
        x, _ = self.run_blocks(x, head_gates=head_gates, kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return self.logits_and_loss(x, targets, last_only, loss_chunk=loss_chunk)

    def decode_step(self, idx: Tensor, kv_cache: KVCache) -> Tensor:
        """One new token per sample, idx (B, 1), at the cache's device-side position ->
        logits (B, vocab_size), in shapes that never change from step to step: what a
        CUDA graph can capture and replay. Call kv_cache.start_static() after filling
        the cache, and advance its `pos` after each step. Only the fused attention
        takes this path; the same tokens as `forward` with the cache (tests hold it)."""
        self.check_static_decode()
        x = self.tok_emb(idx)  # (B, 1, n_embd)
        if self.config.position == "learned":
            x = x + self.pos_emb(kv_cache.position)
        x = self.drop(x)
        kv_cache.begin_step()
        x, _ = self.run_blocks(x, kv_cache=kv_cache)
        kv_cache.end_step()
        logits, _ = self.logits_and_loss(x, None, last_only=True)  # (B, 1, vocab_size)
        return logits[:, -1, :]

    def check_static_decode(self) -> None:
        """Refuse the static decode step where it cannot run: the wrapper attention
        keeps one module per head and appends to the cache at a host-side position."""
        if self.config.attention != "fused":
            raise MinigptError(
                "static_decode (a static-shape step) needs the fused attention, not the wrapper",
                hint="decode without static_decode, or convert the model to the fused form",
                param="static_decode",
            )

    def forward_with_attention(
        self, idx: Tensor, targets: Tensor | None = None, head_gates: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """Like forward, also returning every layer's attention weights A, each (B, H, T, T)."""
        x = self.embed(idx)  # (B, T, n_embd)
        x, attention = self.run_blocks(x, head_gates=head_gates, need_weights=True)
        logits, loss = self.logits_and_loss(x, targets)
        return logits, loss, attention

    def embed(self, idx: Tensor, pos: int = 0) -> Tensor:
        """Token ids idx (B, T) at positions pos.. -> the residual stream x (B, T, n_embd).

        This is where token ids enter the model, so their shape is checked here.
        """
        if idx.dim() != 2:
            raise MinigptError(
                f"GPT expects token ids of shape (batch, tokens), got {tuple(idx.shape)}",
                hint="add a batch dimension with idx[None]",
                param="idx",
            )
        T = idx.size(1)
        # Rotary positions have no end: past block_size each query sees the last
        # block_size positions (a sliding window, what the rolling KV cache computes).
        if pos + T > self.config.block_size and self.config.position == "learned":
            raise MinigptError(
                f"{pos + T} positions exceed the model's block_size={self.config.block_size}",
                hint="crop the input to its last block_size tokens",
                param="idx",
            )
        x = self.tok_emb(idx)  # (B, T, n_embd)
        if self.config.position == "learned":
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))  # (T, n_embd)
        return self.drop(x)

    def run_blocks(
        self,
        x: Tensor,
        start_layer: int = 0,
        end_layer: int | None = None,
        head_gates: Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Blocks start_layer..end_layer-1 (default: to the last) on the residual stream
        x (B, T, n_embd): (x after them, each block's A (B, H, T, T_k) or None).

        head_gates: (n_layer, H) or (n_layer, B, H), indexed by layer, as in `forward`.
        kv_cache: each block appends its keys and values; the caller advances it.
        """
        rope = self.rope_for(x, kv_cache)  # once, for every layer
        if head_gates is not None and head_gates.size(0) != self.config.n_layer:
            raise MinigptError(
                f"head_gates has {head_gates.size(0)} layers, the model has {self.config.n_layer}",
                hint="pass head_gates of shape (n_layer, n_head)",
                param="head_gates",
            )
        attention = []
        for layer in range(start_layer, self.config.n_layer if end_layer is None else end_layer):
            gate = head_gates[layer] if head_gates is not None else None
            x, weights = self.blocks[layer](x, gate, kv_cache, need_weights, rope)
            attention.append(weights)
        return x, attention

    def rope_for(self, x: Tensor, kv_cache: KVCache | None) -> tuple[Tensor, Tensor] | None:
        """cos and sin of the rotary positions of x's tokens, computed once for every
        layer (`attention.rope_for_input`); None with learned positions."""
        c = self.config
        return rope_for_input(x, kv_cache, c.d_head, c.rope_theta) if c.position == "rope" else None

    def logits_and_loss(
        self,
        x: Tensor,
        targets: Tensor | None = None,
        last_only: bool = False,
        reduction: Literal["mean", "none"] = "mean",
        loss_chunk: int = 0,
    ) -> tuple[Tensor | None, Tensor | None]:
        """The residual stream after the last block x (B, T, n_embd) -> (logits
        (B, T, vocab_size), loss or None): the final norm, the tied LM head, cross-entropy.

        targets: (B, T) next-token ids; -1 marks positions to ignore in the loss.
        reduction: "mean" gives the mean loss over positions, "none" each position's
            loss (B, T) (0 where ignored).
        loss_chunk: > 0 with targets and the mean: (None, the same loss), the logits
            made loss_chunk positions at a time and never all at once (`minigpt.loss`).
        """
        x = self.ln_f(x)
        if loss_chunk > 0 and targets is not None and reduction == "mean" and not last_only:
            return None, lm_head_loss(
                x.flatten(0, 1), self.lm_head.weight, targets.flatten(), loss_chunk
            )
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction=reduction
        )
        return logits, loss if reduction == "mean" else loss.view(targets.shape)
