"""Multi-head causal attention, the module every transformer block is built from.

For each head h, with X the block input (B, T, d_in):

    Q_h = X W^Q_h          K_h = X W^K_h          V_h = X W^V_h         each (B, T, d_head)
    A_h = softmax(Q_h K_h^T / sqrt(d_head) + M)                          (B, T, T)
    Context_h = A_h V_h                                                  (B, T, d_head)
    Out = concat(Context_1, ..., Context_H) W^O                          (B, T, d_out)

where M is -inf above the diagonal (no token sees the future) and 0 elsewhere.

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
    """Raise a clear error for an input the module cannot attend over."""
    if x.dim() != 3 or x.size(-1) != d_in:
        raise MinigptError(
            f"attention expects input of shape (batch, tokens, {d_in}), got {tuple(x.shape)}",
            hint="pass a 3-D tensor whose last dimension is d_in",
        )
    if pos + x.size(1) > context_length:
        raise MinigptError(
            f"sequence of {pos + x.size(1)} positions is longer than the context length "
            f"{context_length}",
            hint="crop the input to its last context_length tokens",
        )


def _causal_mask(context_length: int) -> Tensor:
    """M as booleans: True above the diagonal, where a query would see the future."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


def _gate_shape(gate: Tensor, batch_size: int, n_head: int) -> Tensor:
    """Reshape a per-head gate broadcastable to (B, H) into (B or 1, H, 1, 1)."""
    gate = torch.as_tensor(gate)
    try:
        gate = gate.broadcast_to((batch_size, n_head))
    except RuntimeError as err:
        raise MinigptError(
            f"head gate of shape {tuple(gate.shape)} does not broadcast to "
            f"(batch={batch_size}, n_head={n_head})",
            hint="pass a gate of shape (n_head,) or (batch, n_head)",
        ) from err
    return gate[:, :, None, None]


class CausalAttention(nn.Module):
    """One attention head with its own W^Q, W^K, W^V (each d_in -> d_head)."""

    def __init__(
        self,
        d_in: int,
        d_head: int,
        context_length: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        causal: bool = True,
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
        self.register_buffer("mask", _causal_mask(context_length), persistent=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """X (B, T, d_in) -> Q_h, K_h, V_h, each (B, T, d_head)."""
        return self.W_query(x), self.W_key(x), self.W_value(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: int = 0) -> tuple[Tensor, Tensor]:
        """Context_h (B, T_q, d_head) and A_h (B, T_q, T_k) for queries starting at q_pos.

        q_pos is the absolute position of the first query: with a KV cache the keys
        cover positions 0..T_k-1 and the queries are the last T_q of them.
        """
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (B, T_q, T_k)
        if self.causal:
            t_q, t_k = q.size(-2), k.size(-2)
            scores = scores.masked_fill(self.mask[q_pos : q_pos + t_q, :t_k], float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # A_h, rows sum to 1
        weights = self.dropout(weights)
        return weights @ v, weights  # (B, T_q, d_head), (B, T_q, T_k)

    def forward(self, x: Tensor, need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """X (B, T, d_in) -> Context_h (B, T, d_head), and A_h (B, T, T) if asked."""
        _check_input(x, self.d_in, self.context_length)
        context, weights = self.attend(*self.project(x))
        return (context, weights) if need_weights else context


class MultiHeadAttentionWrapper(nn.Module):
    """The textbook multi-head attention: n_head `CausalAttention` heads, concat, W^O.

    Its state dict uses the fused layout of `MultiHeadAttention` (`qkv.weight` holds
    every head's W^Q, then W^K, then W^V, stacked by rows), so a checkpoint written
    by either form loads into the other.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        n_head: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        causal: bool = True,
        out_bias: bool = True,
        layer_idx: int = 0,
    ):
        super().__init__()
        if d_out % n_head != 0:
            raise MinigptError(
                f"d_out={d_out} is not divisible by n_head={n_head}",
                hint="choose a width that is a multiple of the number of heads",
            )
        self.d_in, self.d_out, self.n_head = d_in, d_out, n_head
        self.d_head = d_out // n_head
        self.context_length, self.causal, self.layer_idx = context_length, causal, layer_idx
        self.qkv_bias = qkv_bias
        self.heads = nn.ModuleList(
            CausalAttention(d_in, self.d_head, context_length, dropout, qkv_bias, causal)
            for _ in range(n_head)
        )
        self.out_proj = nn.Linear(n_head * self.d_head, d_out, bias=out_bias)  # W^O
        self.resid_dropout = nn.Dropout(dropout)
        self.register_state_dict_post_hook(_wrapper_to_fused_layout)
        self.register_load_state_dict_pre_hook(_fused_to_wrapper_layout)

    def forward(
        self,
        x: Tensor,
        gate: Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """X (B, T, d_in) -> (Out (B, T, d_out), A (B, H, T, T_k) or None)."""
        pos = kv_cache.pos if kv_cache is not None else 0
        _check_input(x, self.d_in, self.context_length, pos)
        projected = [head.project(x) for head in self.heads]  # H x (Q_h, K_h, V_h)
        keys = [k for _, k, _ in projected]
        values = [v for _, _, v in projected]
        if kv_cache is not None:
            # The cache stores (B, H, T, d_head); each head reads back its own slice.
            k_all, v_all = kv_cache.append(
                self.layer_idx, torch.stack(keys, dim=1), torch.stack(values, dim=1)
            )
            keys, values = k_all.unbind(1), v_all.unbind(1)
        contexts, weights = [], []
        for h, head in enumerate(self.heads):
            context, w = head.attend(projected[h][0], keys[h], values[h], q_pos=pos)
            contexts.append(context)  # (B, T, d_head)
            weights.append(w)
        context = torch.stack(contexts, dim=1)  # (B, H, T, d_head)
        if gate is not None:
            context = context * _gate_shape(gate, x.size(0), self.n_head).to(context.dtype)
        out = self.out_proj(context.transpose(1, 2).flatten(2))  # concat heads, then W^O
        out = self.resid_dropout(out)
        return out, (torch.stack(weights, dim=1) if need_weights else None)


class MultiHeadAttention(nn.Module):
    """Multi-head causal attention with one fused QKV projection.

    `qkv` computes [Q | K | V] for all heads in one matmul (B, T, 3 * d_out); a
    view/transpose splits each into (B, H, T, d_head). The fast path is
    `F.scaled_dot_product_attention`; when the caller asks for the attention
    weights A (B, H, T, T_k) the explicit path softmax(Q K^T / sqrt(d_head) + M) V
    runs instead and returns them.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        n_head: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        causal: bool = True,
        out_bias: bool = True,
        layer_idx: int = 0,
    ):
        super().__init__()
        if d_out % n_head != 0:
            raise MinigptError(
                f"d_out={d_out} is not divisible by n_head={n_head}",
                hint="choose a width that is a multiple of the number of heads",
            )
        self.d_in, self.d_out, self.n_head = d_in, d_out, n_head
        self.d_head = d_out // n_head
        self.context_length, self.causal, self.layer_idx = context_length, causal, layer_idx
        self.qkv_bias, self.dropout = qkv_bias, dropout
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)  # [W^Q | W^K | W^V], all heads
        self.out_proj = nn.Linear(d_out, d_out, bias=out_bias)  # W^O
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.register_buffer("mask", _causal_mask(context_length), persistent=False)

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
        pos = kv_cache.pos if kv_cache is not None else 0
        _check_input(x, self.d_in, self.context_length, pos)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_out, dim=2)  # each (B, T, d_out)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # Q (B, H, T, d_head)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # K (B, H, T, d_head)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # V (B, H, T, d_head)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, H, pos + T, d_head)
        T_k = k.size(2)

        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (B, H, T, T_k)
            if self.causal:
                scores = scores.masked_fill(self.mask[pos : pos + T, :T_k], float("-inf"))
            weights = torch.softmax(scores, dim=-1)  # A
            context = self.attn_dropout(weights) @ v  # (B, H, T, d_head)
        else:
            dropout_p = self.dropout if self.training else 0.0
            if not self.causal or T == 1:
                # One new query sees every cached key: no mask at all.
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            elif pos == 0:
                context = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout_p, is_causal=True
                )
            else:
                # Chunked prefill over a cache: is_causal would align the mask top-left
                # (query 0 sees key 0 only), so pass M offset to the queries' true positions.
                allowed = ~self.mask[pos : pos + T, :T_k]  # (T, T_k), True where attending
                context = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=allowed, dropout_p=dropout_p
                )
        if gate is not None:
            context = context * _gate_shape(gate, B, self.n_head).to(context.dtype)
        out = context.transpose(1, 2).reshape(B, T, self.d_out)  # concat heads (B, T, H*d_head)
        out = self.resid_dropout(self.out_proj(out))  # W^O
        return out, weights

    @classmethod
    def from_wrapper(cls, wrapper: MultiHeadAttentionWrapper) -> MultiHeadAttention:
        """The fused module computing exactly what `wrapper` computes."""
        fused = cls(
            wrapper.d_in,
            wrapper.d_out,
            wrapper.context_length,
            wrapper.n_head,
            dropout=wrapper.heads[0].dropout.p,
            qkv_bias=wrapper.qkv_bias,
            causal=wrapper.causal,
            out_bias=wrapper.out_proj.bias is not None,
            layer_idx=wrapper.layer_idx,
        ).to(wrapper.out_proj.weight)
        fused.load_state_dict(wrapper.state_dict())
        return fused

    def to_wrapper(self) -> MultiHeadAttentionWrapper:
        """The textbook module computing exactly what this one computes."""
        wrapper = MultiHeadAttentionWrapper(
            self.d_in,
            self.d_out,
            self.context_length,
            self.n_head,
            dropout=self.dropout,
            qkv_bias=self.qkv_bias,
            causal=self.causal,
            out_bias=self.out_proj.bias is not None,
            layer_idx=self.layer_idx,
        ).to(self.out_proj.weight)
        wrapper.load_state_dict(self.state_dict())
        return wrapper


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
