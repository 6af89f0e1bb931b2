"""Multi-head causal attention, the module every transformer block is built from.

For each head h, with X the block input (B, T, d_in):

    Q_h = X W^Q_h          K_h = X W^K_h          V_h = X W^V_h         each (B, T, d_head)
    A_h = softmax(Q_h K_h^T / sqrt(d_head) + M)                          (B, T, T)
    Context_h = A_h V_h                                                  (B, T, d_head)
    Out = concat(Context_1, ..., Context_H) W^O                          (B, T, d_out)

where M is -inf above the diagonal (no token sees the future) and 0 elsewhere.

Three classes, read in this order:

- `CausalAttention`: one head, the formula above written out line by line.
- `MultiHeadAttentionWrapper`: the textbook form, `n_head` independent
  `CausalAttention` heads in a ModuleList, outputs concatenated, then W^O.
- `MultiHeadAttention`: one fused QKV projection, heads split by view/transpose,
  `F.scaled_dot_product_attention` (SDPA) as the fast path. This is what the model runs.

Both multi-head forms share one state-dict layout (`qkv.weight`, `out_proj.weight`, ...),
so either loads the other's weights, and `to_wrapper` / `from_wrapper` are exact.

Options of today's small GPTs, each off by default (GPT-2's attention):

- grouped-query attention (`n_kv_head` < n_head): n_head / n_kv_head query heads
  share one K_h and V_h. The cache keeps n_kv_head heads, so it shrinks as much.
  In the wrapper the sharing is literal: the heads of a group hold the same
  W^K and W^V modules.
- QK-norm (`qk_norm`): Q_h and K_h go through RMSNorm (a gain of d_head, shared
  by the heads) before the scores, which bounds them.
- rotary positions: given `rope` (cos and sin, which the GPT computes once for every
  layer), Q_h and K_h are turned by their position before the scores.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.errors import MinigptError
from minigpt.layers import RMSNorm, Rope, apply_rope

if TYPE_CHECKING:
    from minigpt.kv_cache import KVCache


class CausalAttention(nn.Module):
    """One attention head with its own W^Q, W^K, W^V (each d_in -> d_head).

    kv_from: grouped-query attention: this head reads another head's W^K and W^V.
    """

    def __init__(
        self,
        d_in: int,
        d_head: int,
        context_length: int,
        *,
        causal: bool = True,
        qkv_bias: bool = False,
        dropout: float = 0.0,
        kv_from: CausalAttention | None = None,
    ):
        super().__init__()
        self.d_in, self.d_head, self.context_length = d_in, d_head, context_length
        self.causal = causal
        self.W_query = nn.Linear(d_in, d_head, bias=qkv_bias)
        if kv_from is None:
            self.W_key = nn.Linear(d_in, d_head, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_head, bias=qkv_bias)
        else:
            self.W_key, self.W_value = kv_from.W_key, kv_from.W_value
        self.dropout = nn.Dropout(dropout)
        # M of the formula as booleans, True above the diagonal where a query would see
        # the future. A buffer, so it moves with the module between devices; not
        # persistent: it is derived from context_length, so it is not a weight.
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """X (B, T, d_in) -> Context_h (B, T, d_head), and A_h (B, T, T) if asked."""
        _check_input(x, self.d_in, self.context_length)
        T = x.size(1)
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)  # each (B, T, d_head)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.d_head)  # (B, T, T)
        if self.causal:
            scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))  # + M
        weights = torch.softmax(scores, dim=-1)  # A_h: each row sums to 1
        context = self.dropout(weights) @ v  # (B, T, d_head)
        return (context, weights) if need_weights else context


class _MultiHead(nn.Module):
    """The shape and the options both multi-head forms share.

    d_in, d_out: widths of X and Out; each head is d_head = d_out / n_head wide.
    context_length: the most positions attended over (the size of M).
    causal: False drops M (every query sees every key).
    qkv_bias, out_bias: biases in the projections W^Q, W^K, W^V and in W^O.
    dropout: on A and on Out while training.
    layer_idx: which layer's buffers of a KV cache this module reads and writes.
    check_inputs: check X (and the KV cache) on every call. A GPT builds its layers
        with False because it checks its input once for all of them.
    n_kv_head: heads of K and V (None: n_head); n_head must be a multiple of it.
    qk_norm: RMSNorm (eps norm_eps) of every head's Q and K before the scores.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        n_head: int,
        *,
        causal: bool = True,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        layer_idx: int = 0,
        check_inputs: bool = True,
        n_kv_head: int | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        d_head, n_kv_head = _head_sizes(d_out, n_head, n_kv_head)
        self.d_in, self.d_out, self.n_head, self.d_head = d_in, d_out, n_head, d_head
        self.n_kv_head, self.group = n_kv_head, n_head // n_kv_head
        self.context_length = context_length
        self.causal, self.qkv_bias, self.out_bias = causal, qkv_bias, out_bias
        self.dropout, self.layer_idx, self.check_inputs = dropout, layer_idx, check_inputs
        self.qk_norm, self.norm_eps = qk_norm, norm_eps


class MultiHeadAttentionWrapper(_MultiHead):
    """The textbook multi-head attention: n_head `CausalAttention` heads, concat, W^O.
    The options are `_MultiHead`'s.

    Its state dict uses the fused layout of `MultiHeadAttention` (`qkv.weight` holds
    every head's W^Q, then W^K, then W^V, stacked by rows), so a checkpoint written
    by either form loads into the other.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, n_head: int, **options):
        super().__init__(d_in, d_out, context_length, n_head, **options)
        d_head = self.d_head
        heads: list[CausalAttention] = []
        for h in range(n_head):
            # grouped-query attention: the first head of each group owns W^K and W^V,
            # the others hold the very same modules
            leader = heads[h - h % self.group] if h % self.group else None
            heads.append(
                CausalAttention(
                    d_in, d_head, context_length,
                    causal=self.causal, qkv_bias=self.qkv_bias, dropout=self.dropout,
                    kv_from=leader,
                )  # fmt: skip
            )
        self.heads = nn.ModuleList(heads)
        self.out_proj = nn.Linear(n_head * d_head, d_out, bias=self.out_bias)  # W^O
        self.resid_dropout = nn.Dropout(self.dropout)
        # one gain per feature of a head, shared by every head (as Qwen3)
        self.q_norm = RMSNorm(d_head, self.norm_eps) if self.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d_head, self.norm_eps) if self.qk_norm else nn.Identity()
        self.register_state_dict_post_hook(_wrapper_to_fused_layout)
        self.register_load_state_dict_pre_hook(_fused_to_wrapper_layout)

    def forward(
        self, x: Tensor, rope: Rope | None = None, kv_cache: KVCache | None = None,
        gate: Tensor | None = None, need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """X (B, T, d_in) -> (Out (B, T, d_out), A (B, H, T, T_k) or None); the
        arguments are those of `MultiHeadAttention.forward`."""
        if self.check_inputs:
            _check_input(x, self.d_in, self.context_length, kv_cache, self)
        T = x.size(1)
        queries, keys, values = [], [], []  # each H x (B, T, d_head)
        for head in self.heads:
            q, k = self.q_norm(head.W_query(x)), self.k_norm(head.W_key(x))
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            queries.append(q)
            keys.append(k)
            values.append(head.W_value(x))
        attn_mask = None  # M over this call's positions alone: is_causal
        if kv_cache is not None:
            # The cache stores (B, n_kv_head, T_k, d_head): one K and V per group.
            leaders = range(0, self.n_head, self.group)
            k_all, v_all = kv_cache.update(
                self.layer_idx,
                torch.stack([keys[h] for h in leaders], dim=1),
                torch.stack([values[h] for h in leaders], dim=1),
            )
            keys = [k_all[:, h // self.group] for h in range(self.n_head)]
            values = [v_all[:, h // self.group] for h in range(self.n_head)]
            attn_mask = kv_cache.attn_mask(T)
        elif T > self.context_length:  # rotary positions past the context
            attn_mask = sliding_window_mask(T, self.context_length, x.dtype, x.device)
        is_causal = self.causal and attn_mask is None and T > 1
        attended = [
            explicit_attention(q, k, v, attn_mask, is_causal, head.dropout)
            for head, q, k, v in zip(self.heads, queries, keys, values, strict=True)
        ]  # H x (Context_h (B, T, d_head), A_h (B, T, T_k))
        context = torch.stack([c for c, _ in attended], dim=1)  # (B, H, T, d_head)
        weights = torch.stack([a for _, a in attended], dim=1) if need_weights else None
        if gate is not None:
            context = context * _gate_shape(gate, x.size(0), self.n_head).to(context.dtype)
        out = context.transpose(1, 2).flatten(2)  # concat heads (B, T, H * d_head)
        return self.resid_dropout(self.out_proj(out)), weights  # W^O


class MultiHeadAttention(_MultiHead):
    """Multi-head causal attention with one fused QKV projection.

    `qkv` computes [Q | K | V] for all heads in one matmul (B, T, 3 * d_out); a
    view/transpose splits each into (B, H, T, d_head). The fast path is
    `F.scaled_dot_product_attention`; when the caller asks for the attention
    weights A (B, H, T, T_k) the explicit path (`explicit_attention`) runs instead
    and returns them. The options are `_MultiHead`'s.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, n_head: int, **options):
        super().__init__(d_in, d_out, context_length, n_head, **options)
        d_head = self.d_head
        self.d_kv = self.n_kv_head * d_head
        # [W^Q | W^K | W^V] of all heads, one ((n_head + 2 n_kv_head) d_head, d_in) matrix.
        # W^Q, W^K, W^V first, then W^O: the order parameters are made in decides the
        # seeded init and the order of the optimizer's state, which saved runs rely on.
        self.qkv = nn.Linear(d_in, d_out + 2 * self.d_kv, bias=self.qkv_bias)
        self.attn_dropout = nn.Dropout(self.dropout)
        self.out_proj = nn.Linear(d_out, d_out, bias=self.out_bias)  # W^O
        self.resid_dropout = nn.Dropout(self.dropout)
        self.q_norm = RMSNorm(d_head, self.norm_eps) if self.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d_head, self.norm_eps) if self.qk_norm else nn.Identity()

    def forward(
        self, x: Tensor, rope: Rope | None = None, kv_cache: KVCache | None = None,
        gate: Tensor | None = None, need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """X (B, T, d_in) -> (Out (B, T, d_out), A (B, H, T, T_k) or None).

        rope: cos and sin of X's positions, each (T, d_head / 2): turn Q and K by them.
        kv_cache: keys and values of earlier positions; this call's are written to it
            (the caller advances it once every layer has).
        gate: per-head multiplier broadcastable to (B, H), applied to Context_h before W^O.
        need_weights: compute A explicitly and return it (SDPA never forms it).
        """
        if self.check_inputs:
            _check_input(x, self.d_in, self.context_length, kv_cache, self)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.d_out, self.d_kv, self.d_kv], dim=2)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # Q (B, H, T, d_head)
        k = k.view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)  # K (B, H_kv, T, d_head)
        v = v.view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)  # V (B, H_kv, T, d_head)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attn_mask = None  # M over this call's positions alone: SDPA's is_causal
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # every position so far (B, H_kv, T_k, d_head)
            attn_mask = kv_cache.attn_mask(T)  # M for queries after the cached positions
        elif T > self.context_length:  # rotary positions past the context
            attn_mask = sliding_window_mask(T, self.context_length, x.dtype, x.device)
        if self.group > 1:  # grouped-query attention: each K/V head serves `group` query heads
            k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        is_causal = self.causal and attn_mask is None and T > 1
        if need_weights:
            context, weights = explicit_attention(q, k, v, attn_mask, is_causal, self.attn_dropout)
        else:
            dropout_p = self.dropout if self.training else 0.0
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
            )  # (B, H, T, d_head)
            weights = None
        if gate is not None:
            context = context * _gate_shape(gate, B, self.n_head).to(context.dtype)
        out = context.transpose(1, 2).flatten(2)  # concat heads (B, T, H * d_head)
        return self.resid_dropout(self.out_proj(out)), weights  # W^O

    @classmethod
    def from_wrapper(cls, wrapper: MultiHeadAttentionWrapper) -> MultiHeadAttention:
        """The fused module computing exactly what `wrapper` computes."""
        return _converted(wrapper, cls)

    def to_wrapper(self) -> MultiHeadAttentionWrapper:
        """The textbook module computing exactly what this one computes."""
        return _converted(self, MultiHeadAttentionWrapper)


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Context = A V with A = softmax(Q K^T / sqrt(d_head) + M), written out so that A
    can be returned. The arguments mean what they mean to SDPA, which computes the same.

    q: Q (..., T_q, d_head); k, v: K and V (..., T_k, d_head); the leading dims are
        (B,) for one head or (B, H) for all heads at once.
    attn_mask: M, added to the scores (0 where a query sees a key, -inf where not),
        broadcastable to (T_q, T_k); is_causal: M is `causal_mask` (T_q == T_k).
    dropout: applied to A before it weights V; the A returned is the one before
        dropout, whose rows sum to 1.

    Returns Context (..., T_q, d_head) and A (..., T_q, T_k).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    if is_causal:
        attn_mask = minus_inf_where(causal_mask(q.size(-2), q.device), scores.dtype)
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)  # A, rows sum to 1
    attended = dropout(weights) if dropout is not None else weights
    return attended @ v, weights  # (..., T_q, d_head), (..., T_q, T_k)


def causal_mask(context_length: int, device: torch.device | None = None) -> Tensor:
    """M as booleans (context_length, context_length): True above the diagonal,
    where a query would see the future."""
    ones = torch.ones(context_length, context_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def sliding_window_mask(
    n_tokens: int, window: int, dtype: torch.dtype, device: torch.device | None = None
) -> Tensor:
    """M for more tokens than the context (rotary positions only), (n_tokens, n_tokens),
    -inf where a query would see the future or a key `window` or more positions back.

    Every query then sees at most `window` keys, as it did in training, at every layer:
    what a rolling KV cache computes, one token at a time."""
    i = torch.arange(n_tokens, device=device)
    offset = i[:, None] - i[None, :]  # query position - key position
    return minus_inf_where((offset < 0) | (offset >= window), dtype)


def minus_inf_where(hidden: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True: hidden) as the M that is added to the scores: 0 or -inf."""
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(
        hidden, float("-inf")
    )


# --- checks shared by the forms --------------------------------------------------------


def _head_sizes(d_out: int, n_head: int, n_kv_head: int | None) -> tuple[int, int]:
    """(d_head, n_kv_head) of a multi-head module, or a clear error."""
    if d_out % n_head != 0:
        raise MinigptError(
            f"d_out={d_out} is not divisible by n_head={n_head}",
            hint="choose a width that is a multiple of the number of heads",
            param="n_head",
        )
    n_kv_head = n_kv_head or n_head
    if n_head % n_kv_head != 0:
        raise MinigptError(
            f"n_head={n_head} is not a multiple of n_kv_head={n_kv_head}",
            hint="each group of query heads shares one K/V head: pick a divisor of n_head",
            param="n_kv_head",
        )
    return d_out // n_head, n_kv_head


def _check_input(
    x: Tensor,
    d_in: int,
    context_length: int,
    kv_cache: KVCache | None = None,
    module: nn.Module | None = None,
) -> None:
    """Raise a clear error for an input X (and a KV cache) a module cannot attend over."""
    if x.dim() != 3 or x.size(-1) != d_in:
        raise MinigptError(
            f"attention expects input of shape (batch, tokens, {d_in}), got {tuple(x.shape)}",
            hint="pass a 3-D tensor whose last dimension is d_in",
            param="x",
        )
    pos = kv_cache.pos if kv_cache is not None else 0
    if pos + x.size(1) > context_length:
        raise MinigptError(
            f"sequence of {pos + x.size(1)} positions is longer than the context length "
            f"{context_length}",
            hint="crop the input to its last context_length tokens",
            param="x",
        )
    if kv_cache is not None:
        kv_cache.check_fits(
            module.layer_idx + 1, x.size(0), module.n_kv_head, module.d_head, x.size(1)
        )


def _gate_shape(gate: Tensor, batch_size: int, n_head: int) -> Tensor:
    """Reshape a per-head gate broadcastable to (B, H) into (B, H, 1, 1)."""
    gate = torch.as_tensor(gate)
    try:
        gate = gate.broadcast_to((batch_size, n_head))
    except RuntimeError as err:
        raise MinigptError(
            f"head gate of shape {tuple(gate.shape)} does not broadcast to "
            f"(batch={batch_size}, n_head={n_head})",
            hint="pass a gate of shape (n_head,) or (batch, n_head)",
            param="gate",
        ) from err
    return gate[:, :, None, None]


# --- one state-dict layout for both forms -------------------------------------------
# The wrapper's per-head W_query/W_key/W_value are saved as the fused `qkv` rows:
# rows [h * d_head, (h + 1) * d_head) of the Q block are head h's W^Q, and so on.
# With grouped-query attention the K and V blocks hold one head per group (the
# group's first head, whose modules the others share).

# The keyword options of both multi-head forms, each kept as an attribute of that name.
_OPTIONS = (
    "causal", "qkv_bias", "out_bias", "dropout", "layer_idx", "check_inputs", "n_kv_head",
    "qk_norm", "norm_eps",
)  # fmt: skip
_PROJECTIONS = ("W_query", "W_key", "W_value")


def _converted(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """`module` as a `cls` module with the same settings and weights."""
    options = {name: getattr(module, name) for name in _OPTIONS}
    other = cls(module.d_in, module.d_out, module.context_length, module.n_head, **options)
    other = other.to(module.out_proj.weight)
    other.load_state_dict(module.state_dict())
    return other


def _layout_heads(module) -> list[tuple[str, list[int]]]:
    """Each projection of the fused layout and the wrapper heads whose rows it holds."""
    leaders = list(range(0, module.n_head, module.group))
    return [("W_query", list(range(module.n_head))), ("W_key", leaders), ("W_value", leaders)]


def _wrapper_to_fused_layout(module, state_dict, prefix, local_metadata) -> None:
    for suffix in ("weight", "bias"):
        if f"{prefix}heads.0.W_query.{suffix}" not in state_dict:
            continue
        rows = [
            state_dict[f"{prefix}heads.{h}.{p}.{suffix}"]
            for p, heads in _layout_heads(module)
            for h in heads
        ]
        for p in _PROJECTIONS:  # every head's entry, shared modules' repeats included
            for h in range(module.n_head):
                state_dict.pop(f"{prefix}heads.{h}.{p}.{suffix}")
        state_dict[f"{prefix}qkv.{suffix}"] = torch.cat(rows, dim=0)


def _fused_to_wrapper_layout(module, state_dict, prefix, *args) -> None:
    for suffix in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{suffix}", None)
        if fused is None:
            continue
        chunks = iter(fused.split(module.d_head, dim=0))  # (n_head + 2 n_kv_head) chunks
        for p, heads in _layout_heads(module):
            for h in heads:
                chunk = next(chunks)
                for member in range(h, h + (1 if p == "W_query" else module.group)):
                    state_dict[f"{prefix}heads.{member}.{p}.{suffix}"] = chunk
