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
    if mask is not None:
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
    ):
        super().__init__()
        self.d_in, self.d_head, self.context_length = d_in, d_head, context_length
        self.causal = causal
        self.W_query = nn.Linear(d_in, d_head, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_head, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_head, bias=qkv_bias)
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
        return explicit_attention(q, k, v, mask, q_pos, self.dropout)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """X (B, T, d_in) -> Context_h (B, T, d_head), and A_h (B, T, T) if asked."""
        _check_input(x, self.d_in, self.context_length)
        context, weights = self.attend(*self.project(x))
        return (context, weights) if need_weights else context


# The keyword options of both multi-head forms, each kept as an attribute of that name.
_OPTIONS = ("causal", "qkv_bias", "out_bias", "dropout", "layer_idx", "check_inputs")


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
    ):
        super().__init__()
        if d_out % n_head != 0:
            raise MinigptError(
                f"d_out={d_out} is not divisible by n_head={n_head}",
                hint="choose a width that is a multiple of the number of heads",
                param="n_head",
            )
        self.d_in, self.d_out, self.n_head = d_in, d_out, n_head
        self.d_head = d_out // n_head
        self.context_length = context_length
        self.causal, self.qkv_bias, self.out_bias = causal, qkv_bias, out_bias
        self.dropout, self.layer_idx, self.check_inputs = dropout, layer_idx, check_inputs
        # W^Q, W^K, W^V first, then W^O: the order parameters are made in decides the
        # seeded init and the order of the optimizer's state, which saved runs rely on.
        self._build_heads()
        self.out_proj = nn.Linear(n_head * self.d_head, d_out, bias=out_bias)  # W^O
        self.resid_dropout = nn.Dropout(dropout)

    def _build_heads(self) -> None:
        """Make every head's W^Q, W^K, W^V, in the subclass's form."""
        raise NotImplementedError

    def _contexts(
        self, x: Tensor, kv_cache: KVCache | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """X (B, T, d_in) -> (every Context_h as (B, H, T, d_head), A (B, H, T, T_k) or None)."""
        raise NotImplementedError

    def check_input(self, x: Tensor, kv_cache: KVCache | None = None) -> None:
        """Raise a clear error for an X (or a KV cache) this module cannot attend over."""
        pos = kv_cache.pos if kv_cache is not None else 0
        _check_input(x, self.d_in, self.context_length, pos)
        if kv_cache is not None:
            kv_cache.check_fits(self.layer_idx + 1, x.size(0), self.n_head, self.d_head, x.size(1))

    def forward(
        self,
        x: Tensor,
        gate: Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """X (B, T, d_in) -> (Out (B, T, d_out), A (B, H, T, T_k) or None).

        gate: per-head multiplier broadcastable to (B, H), applied to Context_h before W^O.
        kv_cache: keys and values of earlier positions; this call's are appended to it.
        """
        if self.check_inputs:
            self.check_input(x, kv_cache)
        context, weights = self._contexts(x, kv_cache, need_weights)  # (B, H, T, d_head)
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
        self.heads = nn.ModuleList(
            CausalAttention(self.d_in, self.d_head, self.context_length, **options)
            for _ in range(self.n_head)
        )
        self.register_state_dict_post_hook(_wrapper_to_fused_layout)
        self.register_load_state_dict_pre_hook(_fused_to_wrapper_layout)

    def _contexts(
        self, x: Tensor, kv_cache: KVCache | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        pos = kv_cache.pos if kv_cache is not None else 0
        projected = [head.project(x) for head in self.heads]  # H x (Q_h, K_h, V_h)
        queries, keys, values = (list(p) for p in zip(*projected, strict=True))
        if kv_cache is not None:
            # The cache stores (B, H, T, d_head); each head reads back its own slice.
            k_all, v_all = kv_cache.append(
                self.layer_idx, torch.stack(keys, dim=1), torch.stack(values, dim=1)
            )
            keys, values = k_all.unbind(1), v_all.unbind(1)
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
        # [W^Q | W^K | W^V] of all heads, one (3 * d_out, d_in) matrix
        self.qkv = nn.Linear(self.d_in, 3 * self.d_out, bias=self.qkv_bias)
        self.attn_dropout = nn.Dropout(self.dropout)
        # M of the formula, as in `CausalAttention`
        self.register_buffer("mask", causal_mask(self.context_length), persistent=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """X (B, T, d_in) -> Q, K, V, each (B, H, T, d_head): one matmul, then split by head."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_out, dim=2)  # each (B, T, d_out)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # Q (B, H, T, d_head)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # K (B, H, T, d_head)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # V (B, H, T, d_head)
        return q, k, v

    def _contexts(
        self, x: Tensor, kv_cache: KVCache | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self.project(x)
        if kv_cache is not None and kv_cache.stepping and not need_weights:
            # GPT.decode_step: all max_len slots, the ones not yet written masked out
            k, v = kv_cache.write_at(self.layer_idx, k, v)  # (B, H, max_len, d_head)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.visible)
            return context, None
        pos = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, H, pos + T, d_head)
        if need_weights:
            mask = self.mask if self.causal else None
            return explicit_attention(q, k, v, mask, pos, self.attn_dropout)
        return self._fast_context(q, k, v, pos), None

    def _fast_context(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        """Context (B, H, T, d_head) by `F.scaled_dot_product_attention`, M given as it needs."""
        dropout_p = self.dropout if self.training else 0.0
        T, T_k = q.size(2), k.size(2)
        if not self.causal or T == 1:
            # Bidirectional, or one new query that sees every cached key: no mask at all.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
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

_PROJECTIONS = ("W_query", "W_key", "W_value")


def _wrapper_to_fused_layout(module, state_dict, prefix, local_metadata) -> None:
    for suffix in ("weight", "bias"):
        keys = [
            f"{prefix}heads.{h}.{p}.{suffix}" for p in _PROJECTIONS for h in range(module.n_head)
        ]
        if keys[0] not in state_dict:
            continue
        state_dict[f"{prefix}qkv.{suffix}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)


def _fused_to_wrapper_layout(module, state_dict, prefix, *args) -> None:
    for suffix in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{suffix}", None)
        if fused is None:
            continue
        chunks = fused.split(module.d_head, dim=0)  # 3 * H chunks of d_head rows
        for i, chunk in enumerate(chunks):
            projection, h = _PROJECTIONS[i // module.n_head], i % module.n_head
            state_dict[f"{prefix}heads.{h}.{projection}.{suffix}"] = chunk
