"""The KV cache: keys and values of positions already seen, per layer.

Without a cache, sampling token t+1 recomputes K and V for all t earlier tokens in
every layer. They never change (attention is causal), so we keep them: each new
token then costs one position of work. The buffers are preallocated once at the
maximum length, so decoding never reallocates or copies the history.

A rolling cache (for rotary positions, where attention depends only on offsets)
is a ring: once its max_len slots are full, each new position overwrites the
oldest, so the model keeps seeing the last max_len positions and a step past the
end costs what any other step costs. With learned absolute positions a window
cannot slide this way (every cached key depends on where the window starts), so
there the cache is cropped and filled again (see minigpt.generate).
"""

from __future__ import annotations

import torch
from torch import Tensor

from minigpt.errors import MinigptError


class KVCache:
    """Preallocated per-layer K and V buffers, each (B, H_kv, max_len, d_head), and `pos`.

    `pos` is the number of positions already written (the same for every layer).
    A forward pass of T new tokens calls `check_fits` and `positions(T)` once, each
    attention layer calls `update(layer, k, v)` and `attn_mask(T)`, and the model calls
    `advance(T)` at the end. The static-shape cache of `minigpt.fast_decode` answers
    the same calls, so attention never asks which cache it holds.
    rolling: a ring that takes one position at a time once full.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        d_head: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        rolling: bool = False,
    ):
        shape = (batch_size, n_head, max_len, d_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size, self.n_head, self.max_len, self.d_head = shape
        self.pos = 0
        self.rolling = rolling

    def check_fits(
        self, n_layer: int, batch_size: int, n_head: int, d_head: int, n_new: int
    ) -> None:
        """Raise unless `n_new` more positions of keys and values for `n_layer` layers,
        each (batch_size, n_head, n_new, d_head), fit this cache.

        Called once where input enters (`GPT.forward`, or an attention module called
        on its own), so that `update`, which every layer calls on every step, need not.
        """
        if n_layer > len(self.keys):
            raise MinigptError(
                f"KV cache has {len(self.keys)} layers, {n_layer} are needed",
                hint="build the cache with model.new_kv_cache(batch_size)",
                param="kv_cache",
            )
        if (batch_size, n_head, d_head) != (self.batch_size, self.n_head, self.d_head):
            raise MinigptError(
                f"KV cache holds (batch={self.batch_size}, n_head={self.n_head}, "
                f"d_head={self.d_head}) but the input needs (batch={batch_size}, "
                f"n_head={n_head}, d_head={d_head})",
                hint="build the cache with the model's shape and the batch size you decode with",
                param="kv_cache",
            )
        if n_new > self.remaining and not (self.rolling and n_new == 1):
            raise MinigptError(
                f"KV cache is full: {self.pos} positions cached, {n_new} more do not fit "
                f"in max_len={self.max_len}",
                hint="reset the cache (or crop the context) before appending more positions",
                param="kv_cache",
            )

    def positions(self, n_new: int) -> Tensor:
        """The positions (n_new,) of the next n_new tokens: those after the cached ones."""
        return torch.arange(self.pos, self.pos + n_new, device=self.keys[0].device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write K, V (B, H, T, d_head) at `pos`; return all keys and values so far.

        Returns views of shape (B, H, pos + T, d_head): no copy of the history. The
        shapes are the caller's to check, once per forward pass (`check_fits`).
        A full rolling cache writes its one position over the oldest and returns all
        max_len slots, in ring order: one query attends over them without a mask.
        """
        if self.pos >= self.max_len:  # rolling, one position (check_fits)
            slot = self.pos % self.max_len
            self.keys[layer][:, :, slot : slot + 1] = k
            self.values[layer][:, :, slot : slot + 1] = v
            return self.keys[layer], self.values[layer]
        end = self.pos + k.size(2)
        self.keys[layer][:, :, self.pos : end] = k
        self.values[layer][:, :, self.pos : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attn_mask(self, n_new: int) -> Tensor | None:
        """M for n_new queries after the `pos` cached positions, over the keys `update`
        returns (n_new, pos + n_new): 0 where a query sees a key, -inf where it would see
        the future. None where no mask is needed beyond causal order: the cache was
        empty (the queries are the keys: SDPA's is_causal), or one query sees every key."""
        if self.pos == 0 or n_new == 1:
            return None
        keys = torch.arange(self.pos + n_new, device=self.keys[0].device)
        queries = torch.arange(self.pos, self.pos + n_new, device=self.keys[0].device)
        future = keys[None, :] > queries[:, None]  # (n_new, pos + n_new)
        mask = torch.zeros(future.shape, dtype=self.keys[0].dtype, device=future.device)
        return mask.masked_fill(future, float("-inf"))

    def fill_from(self, prompt_cache: KVCache) -> None:
        """Copy a batch-1 cache's positions into every row of this one, which is empty:
        samples that share a prompt share its keys and values, computed once."""
        n = prompt_cache.pos
        for layer, (k, v) in enumerate(zip(prompt_cache.keys, prompt_cache.values, strict=True)):
            self.keys[layer][:, :, :n] = k[:, :, :n]  # broadcast (1, H, n, d_head) -> (B, ...)
            self.values[layer][:, :, :n] = v[:, :, :n]
        self.pos = n

    def advance(self, n_tokens: int) -> None:
        """Mark `n_tokens` more positions as written, after every layer appended them."""
        self.pos += n_tokens

    def reset(self) -> None:
        """Forget every position; the buffers are reused, not reallocated."""
        self.pos = 0

    @property
    def remaining(self) -> int:
        """How many more positions fit (a full rolling cache still takes one at a time)."""
        return max(0, self.max_len - self.pos)
