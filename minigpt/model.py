"""The GPT: token embeddings and positions, a stack of pre-norm blocks, a tied LM head.

    idx (B, T) -> tok_emb (B, T, n_embd), + pos_emb (learned positions)
               -> n_layer x Block: x + Attn(LN(x)), then x + MLP(LN(x))
               -> LN -> lm_head (B, T, vocab_size), cross-entropy

The defaults are GPT-2's. Options of today's small GPTs (nanochat, Llama) can be
turned on one at a time to see what each changes: rotary positions instead of
pos_emb (`position="rope"`), RMSNorm (`norm`), a SwiGLU MLP (`mlp`), grouped-query
attention (`n_kv_head`) and QK-norm (`qk_norm`). Each is a choice of module made in
`__init__` (`minigpt.layers`), so `forward` reads the same whatever the options.

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

from minigpt.attention import MultiHeadAttention, MultiHeadAttentionWrapper, causal_mask
from minigpt.device import check_memory
from minigpt.errors import MinigptError
from minigpt.kv_cache import KVCache
from minigpt.layers import MLP, LearnedPositions, Rope, RotaryPositions, SwiGLU, make_norm
from minigpt.loss import lm_head_loss

ATTENTION_FORMS = ("fused", "wrapper")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu2")
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
    """The MLP's nonlinearity: 'gelu' (exact, erf), 'gelu_tanh' (the tanh approximation GPT-2 was trained with) or 'relu2' (ReLU squared, the GPT-2 speedrun's)."""
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
        check_config(self)

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
        """Bytes the built module holds in float32: its weights, and the textbook form's
        causal masks (one bool block_size² mask per head)."""
        masks_per_layer = self.n_head if self.attention == "wrapper" else 0
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


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        attention = MultiHeadAttention if config.attention == "fused" else MultiHeadAttentionWrapper
        self.ln_attn = make_norm(config)
        self.attn = attention(
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
            norm_eps=config.layer_norm_eps,
        )
        self.ln_mlp = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(
        self, x: Tensor, rope: Rope | None = None, kv_cache: KVCache | None = None,
        gate: Tensor | None = None, need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """x (B, T, n_embd) -> (x (B, T, n_embd), A (B, H, T, T_k) or None); the
        arguments are the attention's (`MultiHeadAttention.forward`)."""
        attn_out, weights = self.attn(self.ln_attn(x), rope, kv_cache, gate, need_weights)
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
        if config.position == "learned":  # a learned vector added per position (GPT-2)
            self.pos_emb = LearnedPositions(config.block_size, config.n_embd)
        else:  # nothing added: Q and K are turned by their position in every layer
            self.pos_emb = RotaryPositions(config.d_head, config.rope_theta)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017): the output embedding is the input one.
        # Saves vocab_size * n_embd parameters and trains better on small data.
        self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

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
        kv_cache: continue from the positions it holds; this call's are written to it.
        head_gates: (n_layer, H) or (n_layer, B, H) multipliers of each head's output.
        last_only: compute logits for the last position only (B, 1, vocab_size), as
            sampling needs; saves the large vocab matmul on every other position.
        loss_chunk: with targets, make the logits this many positions at a time for
            the loss and return None for them (`minigpt.loss`: a fraction of the memory).
        """
        positions = self.positions_of(idx, kv_cache, head_gates)  # (T,)
        x, rope = self.pos_emb(self.tok_emb(idx), positions)  # (B, T, n_embd); rope or None
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            gate = head_gates[layer] if head_gates is not None else None
            x, _ = block(x, rope, kv_cache, gate)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return self.logits_and_loss(x, targets, last_only, loss_chunk=loss_chunk)

    def positions_of(
        self, idx: Tensor, kv_cache: KVCache | None = None, head_gates: Tensor | None = None
    ) -> Tensor:
        """The positions (T,) of idx's tokens: 0.. , or those after the cache's. This is
        where token ids enter the model, so they (and the cache and the gates) are
        checked here, once, before any layer writes to the cache."""
        if idx.dim() != 2:
            raise MinigptError(
                f"GPT expects token ids of shape (batch, tokens), got {tuple(idx.shape)}",
                hint="add a batch dimension with idx[None]",
                param="idx",
            )
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        # Rotary positions have no end: past block_size each query sees the last
        # block_size positions (a sliding window, what the rolling KV cache computes).
        if pos + T > self.config.block_size and self.config.position == "learned":
            raise MinigptError(
                f"{pos + T} positions exceed the model's block_size={self.config.block_size}",
                hint="crop the input to its last block_size tokens",
                param="idx",
            )
        if head_gates is not None and head_gates.size(0) != self.config.n_layer:
            raise MinigptError(
                f"head_gates has {head_gates.size(0)} layers, the model has {self.config.n_layer}",
                hint="pass head_gates of shape (n_layer, n_head)",
                param="head_gates",
            )
        if kv_cache is None:
            return torch.arange(T, device=idx.device)
        c = self.config
        kv_cache.check_fits(c.n_layer, B, c.kv_heads, c.d_head, T)
        return kv_cache.positions(T)

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

    # --- the forward pass in steps, for looking inside ----------------------------------

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids idx (B, T) -> the residual stream entering layer 0, x (B, T, n_embd)."""
        x, _ = self.pos_emb(self.tok_emb(idx), self.positions_of(idx))
        return self.drop(x)

    def run_blocks(
        self,
        x: Tensor,
        start_layer: int = 0,
        end_layer: int | None = None,
        head_gates: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Blocks start_layer..end_layer-1 (default: to the last) on the residual stream
        x (B, T, n_embd) of positions 0..T-1: (x after them, each block's A or None).

        head_gates: (n_layer, H) or (n_layer, B, H), indexed by layer, as in `forward`.
        Restarting from any layer is what the head inspector's ablations need.
        """
        # x's first feature stands in for token ids (B, T): the checks forward makes
        positions = self.positions_of(x[..., 0], head_gates=head_gates)  # (T,) 0..T-1
        rope = self.pos_emb.rope(positions)
        attention = []
        for layer in range(start_layer, self.config.n_layer if end_layer is None else end_layer):
            gate = head_gates[layer] if head_gates is not None else None
            x, weights = self.blocks[layer](x, rope, None, gate, need_weights)
            attention.append(weights)
        return x, attention

    def forward_with_attention(
        self, idx: Tensor, targets: Tensor | None = None, head_gates: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """Like forward, also returning every layer's attention weights A, each (B, H, T, T)."""
        x, attention = self.run_blocks(self.embed(idx), head_gates=head_gates, need_weights=True)
        logits, loss = self.logits_and_loss(x, targets)
        return logits, loss, attention

    # --- building, counting, caching ----------------------------------------------------

    @classmethod
    def for_weights(cls, config: GPTConfig, device: str | torch.device = "cpu") -> GPT:
        """A model whose every weight is about to be loaded: built on the meta device and
        given uninitialised memory, so no weight is drawn at random only to be
        overwritten (for GPT-2 small that drawing is most of every command's start-up)."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        model.lm_head.weight = model.tok_emb.weight  # to_empty gave each its own tensor
        for module in model.modules():  # M of the textbook heads: derived, so never loaded
            if isinstance(getattr(module, "mask", None), Tensor):
                module.mask = causal_mask(module.context_length, model.device)
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


# --- checking a config ------------------------------------------------------------------


def check_config(config: GPTConfig) -> None:
    """Raise a clear error, naming the `model.` key, for a shape a GPT cannot have."""
    _check_sizes(config)
    _check_choices(config)


def _check_sizes(config: GPTConfig) -> None:
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = getattr(config, name)
        least = 0 if name == "vocab_size" else 1  # vocab_size 0: the tokenizer's size
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            what = "a positive integer" if least else "0 or a positive integer"
            raise MinigptError(
                f"model.{name} must be {what}, got {value!r}",
                hint=f"set model.{name} to a whole number of at least {least}",
            )
    for name in ("dropout", "init_std", "layer_norm_eps"):
        value = getattr(config, name)
        if not _is_finite_number(value):
            raise MinigptError(f"model.{name} must be a finite number, got {value!r}")
    if not isinstance(config.bias, bool):
        raise MinigptError(f"model.bias must be true or false, got {config.bias!r}")
    if config.n_embd % config.n_head != 0:
        raise MinigptError(
            f"model.n_embd={config.n_embd} is not divisible by model.n_head={config.n_head}",
            hint=f"pick n_embd as a multiple of n_head, e.g. {config.n_head * max(1, config.n_embd // config.n_head)}",
        )
    if not 0.0 <= config.dropout < 1.0:
        raise MinigptError(
            f"model.dropout must be in [0, 1), got {config.dropout}",
            hint="use 0.0 for no dropout, 0.1-0.2 for small data",
        )
    if not config.init_std > 0:
        raise MinigptError(f"model.init_std must be positive, got {config.init_std}")
    if config.activation not in ACTIVATIONS:
        raise MinigptError(
            f"model.activation must be one of {ACTIVATIONS}, got {config.activation!r}",
            hint="'gelu_tanh' is GPT-2's (Hugging Face calls it gelu_new); 'gelu' is exact; "
            "'relu2' is ReLU squared",
        )
    if not config.layer_norm_eps > 0:
        raise MinigptError(
            f"model.layer_norm_eps must be positive, got {config.layer_norm_eps}",
            hint="GPT-2 uses 1e-5",
        )



def _check_choices(config: GPTConfig) -> None:
    if config.attention not in ATTENTION_FORMS:
        raise MinigptError(
            f"model.attention must be one of {ATTENTION_FORMS}, got {config.attention!r}",
            hint="use 'fused' unless you are studying the per-head form",
        )
    for name, allowed in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
        if getattr(config, name) not in allowed:
            raise MinigptError(
                f"model.{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}",
                hint=f"'{allowed[0]}' is GPT-2's; '{allowed[1]}' is the modern option",
            )
    if not (_is_finite_number(config.rope_theta) and config.rope_theta > 0):
        raise MinigptError(
            f"model.rope_theta must be a positive number, got {config.rope_theta!r}",
            hint="10000 is the usual base",
        )
    if config.position == "rope" and config.d_head % 2:
        raise MinigptError(
            f"model.position='rope' needs an even head size, got "
            f"n_embd / n_head = {config.d_head}",
            hint="rotary embeddings turn pairs of features: pick n_embd / n_head even",
        )
    kv = config.n_kv_head
    if not isinstance(kv, int) or isinstance(kv, bool) or kv < 0 or kv > config.n_head:
        raise MinigptError(
            f"model.n_kv_head must be from 0 (n_head) to n_head={config.n_head}, got {kv!r}",
            hint="0 gives every query head its own K and V",
        )
    if kv and config.n_head % kv:
        raise MinigptError(
            f"model.n_head={config.n_head} is not a multiple of model.n_kv_head={kv}",
            hint="each group of query heads shares one K/V head: pick a divisor of n_head",
        )
    if not isinstance(config.qk_norm, bool):
        raise MinigptError(f"model.qk_norm must be true or false, got {config.qk_norm!r}")
    if config.mlp == "swiglu" and config.activation != "gelu":
        raise MinigptError(
            f"model.activation={config.activation!r} is the gelu MLP's; SwiGLU uses SiLU",
            hint="leave model.activation out with model.mlp='swiglu'",
        )


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
