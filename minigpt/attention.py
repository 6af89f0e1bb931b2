"""Multi-head causal attention, the module every transformer block is built from.

For each head h, with X the block input (B, T, d_in):

    Q_h = X W^Q_h          K_h = X W^K_h          V_h = X W^V_h         each (B, T, d_head)
    A_h = softmax(Q_h K_h^T / sqrt(d_head) + M)                          (B, T, T)
    Context_h = A_h V_h                                                  (B, T, d_head)
    Out = concat(Context_1, ..., Context_H) W^O                          (B, T, d_out)

where M is -inf above the diagonal (no token sees the future) and 0 elsewhere.
`explicit_attention` is the middle two lines, written out once for every form.

Two forms compute exactly this:

- `MultiHeadAttentionWrapper`: the textbook form, `n_head` independent
  `CausalAttention` heads in a ModuleList, outputs concatenated, then W^O.
  It is the clearest statement of the idea.
- `MultiHeadAttention`: one fused QKV projection, heads split by view/transpose,
  `F.scaled_dot_product_attention` as the fast path. This is what the model runs.

Both forms share one state-dict layout (`qkv.weight`, `out_proj.weight`, ...), so
either loads the other's weights and `from_wrapper` / `to_wrapper` are exact.

Options of today's small GPTs, each off by default (GPT-2's attention):

- grouped-query attention (`n_kv_head` < n_head): n_head / n_kv_head query heads
  share one K_h and V_h. The cache keeps n_kv_head heads, so it shrinks as much.
  In the wrapper the sharing is literal: the heads of a group hold the same
  W^K and W^V modules.
- QK-norm (`qk_norm`): Q_h and K_h go through RMSNorm (a gain of d_head, shared
  by the heads) before the scores, which bounds them.
- rotary positions (`rope_theta`): Q_h and K_h are rotated by their position, so
  Q_h K_h^T depends only on how far apart two positions are (`apply_rope`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.errors import MinigptError

if TYPE_CHECKING:
    from minigpt.kv_cache import KVCache


def _check_input(x: Tensor, d_in: int, context_length: int, pos: int = 0) -> None:
    """Raise a clear error for an input X the module cannot attend over."""
    if x.dim() != 3 or x.size(-1) != d_in:
        raise MinigptError(
            f"attention expects input of shape (batch, tokens, {d_in}), got {tuple(x.shape)}",
            hint="pass a 3-D tensor whose last dimension is d_in",
            param="x",
        )
    if pos + x.size(1) > context_length:
        raise MinigptError(
            f"sequence of {pos + x.size(1)} positions is longer than the context length "
            f"{context_length}",
            hint="crop the input to its last context_length tokens",
            param="x",
        )


def causal_mask(context_length: int) -> Tensor:
    """M as booleans (context_length, context_length): True above the diagonal,
    where a query would see the future."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


def sliding_window_mask(n_tokens: int, window: int, device: torch.device | None = None) -> Tensor:
    """M for more tokens than the context (rotary positions only): (n_tokens, n_tokens),
    True where a query would see the future or a key `window` or more positions back.

    Every query then sees at most `window` keys, as it did in training, at every layer:
    what a rolling KV cache computes, one token at a time."""
    i = torch.arange(n_tokens, device=device)
    offset = i[:, None] - i[None, :]  # query position - key position
    return (offset < 0) | (offset >= window)


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


def rope_angles(positions: Tensor, d_head: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position p times frequency theta^(-2i / d_head), each (T, d_head / 2),
    for positions (T,): the rotation of each pair of features at each position."""
    inv_freq = theta ** -(torch.arange(0, d_head, 2, device=positions.device) / d_head)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, d_head / 2)
    return angles.cos(), angles.sin()


def rope_for_input(
    x: Tensor, kv_cache: KVCache | None, d_head: int, theta: float
) -> tuple[Tensor, Tensor]:
    """`rope_angles` of X's tokens (B, T, ...): at the static decode step's device-side
    position, else at the positions after those in the cache (0.. without one)."""
    if kv_cache is not None and kv_cache.stepping:
        positions = kv_cache.position  # (1,): GPT.decode_step
    else:
        pos = kv_cache.pos if kv_cache is not None else 0
        positions = torch.arange(pos, pos + x.size(1), device=x.device)
    return rope_angles(positions, d_head, theta)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, d_head) feature pair (i, i + d_head / 2) by angle (T, d_head / 2).

    A query at position m and a key at n rotated so give q_m . k_n that depends on m
    and n only through m - n: positions enter attention as offsets (Su et al., 2021).
    """
    x1, x2 = x.chunk(2, dim=-1)  # each (..., T, d_head / 2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    q_pos: int = 0,
    dropout: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Context = A V with A = softmax(Q K^T / sqrt(d_head) + M), written out so that A
    can be returned (`F.scaled_dot_product_attention` computes the same without it).

    q: Q (..., T_q, d_head); k, v: K and V (..., T_k, d_head); the leading dims are
        (B,) for one head or (B, H) for all heads at once.
    mask: M as booleans, True where hidden (`causal_mask`), or None for no mask.
        Its rows from q_pos are used: with a KV cache the keys cover positions
        0..T_k-1 and the queries are the last T_q of them.
    dropout: applied to A before it weights V; the A returned is the one before
        dropout, whose rows sum to 1.

    Returns Context (..., T_q, d_head) and A (..., T_q, T_k).
    """
    t_q, t_k = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    if mask is not None and t_q > 1:  # one new query sees every cached key: nothing to hide
        scores = scores.masked_fill(mask[q_pos : q_pos + t_q, :t_k], float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # A, rows sum to 1
    attended = dropout(weights) if dropout is not None else weights
    return attended @ v, weights  # (..., T_q, d_head), (..., T_q, T_k)


class CausalAttention(nn.Module):
    """One attention head with its own W^Q, W^K, W^V (each d_in -> d_head)."""

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
        else:  # grouped-query attention: this head reads another head's keys and values
            self.W_key, self.W_value = kv_from.W_key, kv_from.W_value
        self.dropout = nn.Dropout(dropout)
        # M of the formula, kept as a buffer so it moves with the module between devices;
        # not persistent: it is derived from context_length, so it is not a weight.
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """X (B, T, d_in) -> Q_h, K_h, V_h, each (B, T, d_head)."""
        return self.W_query(x), self.W_key(x), self.W_value(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: int = 0) -> tuple[Tensor, Tensor]:
        """Context_h (B, T_q, d_head) and A_h (B, T_q, T_k) for queries starting at q_pos."""
        mask = self.mask if self.causal else None
        if self.causal and q.size(-2) > self.context_length:  # rotary, past the context
            mask = sliding_window_mask(q.size(-2), self.context_length, q.device)
        return explicit_attention(q, k, v, mask, q_pos, self.dropout)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """X (B, T, d_in) -> Context_h (B, T, d_head), and A_h (B, T, T) if asked."""
        _check_input(x, self.d_in, self.context_length)
        context, weights = self.attend(*self.project(x))
        return (context, weights) if need_weights else context


# The keyword options of both multi-head forms, each kept as an attribute of that name.
_OPTIONS = (
    "causal",
    "qkv_bias",
    "out_bias",
    "dropout",
    "layer_idx",
    "check_inputs",
    "n_kv_head",
    "qk_norm",
    "rope_theta",
    "norm_eps",
)


class _MultiHeadAttentionBase(nn.Module):
    """What both multi-head forms share: their shape, the input check, and the last
    step Out = concat(Context_1, ..., Context_H) W^O with an optional per-head gate.

    d_in, d_out: widths of X and Out; each head is d_head = d_out / n_head wide.
    context_length: the most positions attended over (the size of M).
    causal: False drops M (every query sees every key).
    qkv_bias, out_bias: biases in the projections W^Q, W^K, W^V and in W^O.
    dropout: on A and on Out while training.
    layer_idx: which layer's buffers of a `KVCache` this module reads and writes.
    check_inputs: check X (and the KV cache) on every call. A GPT builds its layers
        with False because `GPT.forward` checks its input once for all of them.
    n_kv_head: heads of K and V (None: n_head); n_head must be a multiple of it.
    qk_norm: RMSNorm (eps norm_eps) of every head's Q and K before the scores.
    rope_theta: rotate Q and K by their positions with this base (None: no rotation;
        the model adds learned position embeddings instead).
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
        rope_theta: float | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
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
        self.d_in, self.d_out, self.n_head = d_in, d_out, n_head
        self.d_head = d_out // n_head
        if rope_theta is not None and self.d_head % 2 != 0:
            raise MinigptError(
                f"rotary positions need an even head size, got d_head={self.d_head}",
                hint="rotary embeddings turn pairs of features: pick n_embd / n_head even",
                param="rope_theta",
            )
        self.n_kv_head, self.group = n_kv_head, n_head // n_kv_head
        self.context_length = context_length
        self.causal, self.qkv_bias, self.out_bias = causal, qkv_bias, out_bias
        self.dropout, self.layer_idx, self.check_inputs = dropout, layer_idx, check_inputs
        self.qk_norm, self.rope_theta, self.norm_eps = qk_norm, rope_theta, norm_eps
        # W^Q, W^K, W^V first, then W^O: the order parameters are made in decides the
        # seeded init and the order of the optimizer's state, which saved runs rely on.
        self._build_heads()
        self.out_proj = nn.Linear(n_head * self.d_head, d_out, bias=out_bias)  # W^O
        self.resid_dropout = nn.Dropout(dropout)
        if qk_norm:  # one gain per feature of a head, shared by every head (as Qwen3)
            self.q_norm = RMSNorm(self.d_head, norm_eps)
            self.k_norm = RMSNorm(self.d_head, norm_eps)

    def position_qk(
        self, q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """QK-norm, then the rotation by position (rope: cos and sin, each (T, d_head / 2)),
        of Q and K (..., T, d_head); Q and K as they are when both are off."""
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k

    def _rope(
        self, x: Tensor, kv_cache: KVCache | None, rope: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor] | None:
        """The rotation of X's positions: the one given (a GPT computes it once for all
        its layers), else computed for the positions after the cache's; None without rope."""
        if self.rope_theta is None or rope is not None:
            return rope
        return rope_for_input(x, kv_cache, self.d_head, self.rope_theta)

    def _build_heads(self) -> None:
        """Make every head's W^Q, W^K, W^V, in the subclass's form."""
        raise NotImplementedError

    def _contexts(
        self,
        x: Tensor,
        kv_cache: KVCache | None,
        need_weights: bool,
        rope: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor | None]:
        """X (B, T, d_in) -> (every Context_h as (B, H, T, d_head), A (B, H, T, T_k) or None)."""
        raise NotImplementedError

    def check_input(self, x: Tensor, kv_cache: KVCache | None = None) -> None:
        """Raise a clear error for an X (or a KV cache) this module cannot attend over."""
        pos = kv_cache.pos if kv_cache is not None else 0
        # rotary positions have no end: past the context, a sliding window of it
        limit = self.context_length if self.rope_theta is None else math.inf
        _check_input(x, self.d_in, limit, pos)
        if kv_cache is not None:
            kv_cache.check_fits(
                self.layer_idx + 1, x.size(0), self.n_kv_head, self.d_head, x.size(1)
            )

    def forward(
        self,
        x: Tensor,
        gate: Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """X (B, T, d_in) -> (Out (B, T, d_out), A (B, H, T, T_k) or None).

        gate: per-head multiplier broadcastable to (B, H), applied to Context_h before W^O.
        kv_cache: keys and values of earlier positions; this call's are appended to it.
        rope: cos and sin of X's positions (`rope_angles`), for a module built with
            rope_theta; None computes them here (a GPT computes them once per forward).
        """
        if self.check_inputs:
            self.check_input(x, kv_cache)
        rope = self._rope(x, kv_cache, rope)
        context, weights = self._contexts(x, kv_cache, need_weights, rope)  # (B, H, T, d_head)
        if gate is not None:
            context = context * _gate_shape(gate, x.size(0), self.n_head).to(context.dtype)
        out = context.transpose(1, 2).flatten(2)  # concat heads (B, T, H * d_head)
        return self.resid_dropout(self.out_proj(out)), weights  # W^O

    def _converted(self, cls: type[_MultiHeadAttentionBase]) -> nn.Module:
        """This attention as a `cls` module with the same settings and weights."""
        options = {name: getattr(self, name) for name in _OPTIONS}
        other = cls(self.d_in, self.d_out, self.context_length, self.n_head, **options)
        other = other.to(self.out_proj.weight)
        other.load_state_dict(self.state_dict())
        return other


class MultiHeadAttentionWrapper(_MultiHeadAttentionBase):
    """The textbook multi-head attention: n_head `CausalAttention` heads, concat, W^O.

    Its state dict uses the fused layout of `MultiHeadAttention` (`qkv.weight` holds
    every head's W^Q, then W^K, then W^V, stacked by rows), so a checkpoint written
    by either form loads into the other.
    """

    def _build_heads(self) -> None:
        options = {"causal": self.causal, "qkv_bias": self.qkv_bias, "dropout": self.dropout}
        heads: list[CausalAttention] = []
        for h in range(self.n_head):
            # grouped-query attention: the first head of each group owns W^K and W^V,
            # the others hold the very same modules
            leader = heads[h - h % self.group] if h % self.group else None
            heads.append(
                CausalAttention(
                    self.d_in, self.d_head, self.context_length, kv_from=leader, **options
                )
            )
        self.heads = nn.ModuleList(heads)
        self.register_state_dict_post_hook(_wrapper_to_fused_layout)
        self.register_load_state_dict_pre_hook(_fused_to_wrapper_layout)

    def _contexts(
        self,
        x: Tensor,
        kv_cache: KVCache | None,
        need_weights: bool,
        rope: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor | None]:
        pos = kv_cache.pos if kv_cache is not None else 0
        projected = [head.project(x) for head in self.heads]  # H x (Q_h, K_h, V_h)
        queries, keys, values = (list(p) for p in zip(*projected, strict=True))
        for h in range(self.n_head):
            queries[h], keys[h] = self.position_qk(queries[h], keys[h], rope)
        if kv_cache is not None:
            # The cache stores (B, n_kv_head, T, d_head), one K/V per group.
            leaders = range(0, self.n_head, self.group)
            k_all, v_all = kv_cache.append(
                self.layer_idx,
                torch.stack([keys[h] for h in leaders], dim=1),
                torch.stack([values[h] for h in leaders], dim=1),
            )
            keys = [k_all[:, h // self.group] for h in range(self.n_head)]
            values = [v_all[:, h // self.group] for h in range(self.n_head)]
        attended = [
            head.attend(q, k, v, q_pos=pos)
            for head, q, k, v in zip(self.heads, queries, keys, values, strict=True)
        ]  # H x (Context_h (B, T, d_head), A_h (B, T, T_k))
        context = torch.stack([c for c, _ in attended], dim=1)  # (B, H, T, d_head)
        weights = torch.stack([a for _, a in attended], dim=1) if need_weights else None
        return context, weights


class MultiHeadAttention(_MultiHeadAttentionBase):
    """Multi-head causal attention with one fused QKV projection.

    `qkv` computes [Q | K | V] for all heads in one matmul (B, T, 3 * d_out); a
    view/transpose splits each into (B, H, T, d_head). The fast path is
    `F.scaled_dot_product_attention`; when the caller asks for the attention
    weights A (B, H, T, T_k) the explicit path (`explicit_attention`) runs instead
    and returns them.
    """

    def _build_heads(self) -> None:
        # [W^Q | W^K | W^V] of all heads, one ((n_head + 2 n_kv_head) d_head, d_in) matrix
        self.d_kv = self.n_kv_head * self.d_head
        self.qkv = nn.Linear(self.d_in, self.d_out + 2 * self.d_kv, bias=self.qkv_bias)
        self.attn_dropout = nn.Dropout(self.dropout)
        # M of the formula, as in `CausalAttention`
        self.register_buffer("mask", causal_mask(self.context_length), persistent=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """X (B, T, d_in) -> Q (B, H, T, d_head), K and V (B, H_kv, T, d_head): one
        matmul, then split by head."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.d_out, self.d_kv, self.d_kv], dim=2)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # Q (B, H, T, d_head)
        k = k.view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)  # K (B, H_kv, T, d_head)
        v = v.view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)  # V (B, H_kv, T, d_head)
        return q, k, v

    def _contexts(
        self,
        x: Tensor,
        kv_cache: KVCache | None,
        need_weights: bool,
        rope: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self.project(x)
        q, k = self.position_qk(q, k, rope)
        if kv_cache is not None and kv_cache.stepping and not need_weights:
            # GPT.decode_step: all max_len slots, the ones not yet written masked out
            k, v = kv_cache.write_at(self.layer_idx, k, v)  # (B, H_kv, max_len, d_head)
            k, v = self._per_query_head(k), self._per_query_head(v)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.visible)
            return context, None
        pos = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, H_kv, T_k, d_head)
        k, v = self._per_query_head(k), self._per_query_head(v)  # (B, H, T_k, d_head)
        if need_weights:
            mask = self.mask if self.causal else None
            if self.causal and q.size(2) > self.context_length:  # rotary, past the context
                mask = sliding_window_mask(q.size(2), self.context_length, q.device)
            return explicit_attention(q, k, v, mask, pos, self.attn_dropout)
        return self._fast_context(q, k, v, pos), None

    def _per_query_head(self, kv: Tensor) -> Tensor:
        """K or V (B, H_kv, T, d_head) -> (B, H, T, d_head): each group's K/V head
        repeated for the group's query heads (a view when there are no groups)."""
        if self.group == 1:
            return kv
        return kv.repeat_interleave(self.group, dim=1)

    def _fast_context(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        """Context (B, H, T, d_head) by `F.scaled_dot_product_attention`, M given as it needs."""
        dropout_p = self.dropout if self.training else 0.0
        T, T_k = q.size(2), k.size(2)
        if not self.causal or T == 1:
            # Bidirectional, or one new query that sees every cached key: no mask at all.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        if T > self.context_length:  # rotary positions past the context: a sliding window
            allowed = ~sliding_window_mask(T, self.context_length, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        if pos == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        # Chunked prefill over a cache: is_causal would align the mask top-left
        # (query 0 sees key 0 only), so pass M offset to the queries' true positions.
        allowed = ~self.mask[pos : pos + T, :T_k]  # (T, T_k), True where attending
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)

    @classmethod
    def from_wrapper(cls, wrapper: MultiHeadAttentionWrapper) -> MultiHeadAttention:
        """The fused module computing exactly what `wrapper` computes."""
        return wrapper._converted(cls)

    def to_wrapper(self) -> MultiHeadAttentionWrapper:
        """The textbook module computing exactly what this one computes."""
        return self._converted(MultiHeadAttentionWrapper)


# --- one state-dict layout for both forms -------------------------------------------
# The wrapper's per-head W_query/W_key/W_value are saved as the fused `qkv` rows:
# rows [h * d_head, (h + 1) * d_head) of the Q block are head h's W^Q, and so on.
# With grouped-query attention the K and V blocks hold one head per group (the
# group's first head, whose modules the others share).

_PROJECTIONS = ("W_query", "W_key", "W_value")


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
