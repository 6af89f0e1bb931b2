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
    A forward pass calls `check_fits` once, `append(layer, k, v)` once per layer,
    then `advance(T)`. rolling: a ring that takes one position at a time once full.
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
        # the static decode step's state (see start_static): None until it is used
        self.position: Tensor | None = None  # (1,) long, on the device: the slot to write
        self.visible: Tensor | None = None  # (1, max_len): 0 on the slots seen, else -inf
        self.stepping = False  # inside GPT.decode_step: attention writes with write_at

    def check_fits(
        self, n_layer: int, batch_size: int, n_head: int, d_head: int, n_new: int
    ) -> None:
        """Raise unless `n_new` more positions of keys and values for `n_layer` layers,
        each (batch_size, n_head, n_new, d_head), fit this cache.

        Called once where input enters (`GPT.forward`, or an attention module called
        on its own), so that `append`, which every layer calls on every step, need not.
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

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
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

    def fill_from(self, prompt_cache: KVCache) -> None:
        """Copy a batch-1 cache's positions into every row of this one, which is empty:
        samples that share a prompt share its keys and values, computed once."""
        n = prompt_cache.pos
        for layer, (k, v) in enumerate(zip(prompt_cache.keys, prompt_cache.values, strict=True)):
            self.keys[layer][:, :, :n] = k[:, :, :n]  # broadcast (1, H, n, d_head) -> (B, ...)
            self.values[layer][:, :, :n] = v[:, :, :n]
        self.pos = n

    # --- the static decode step: one token, shapes that never change -------------------
    # A decode step that appends at a host-side `pos` and attends over the first pos
    # slots changes shape every step, so it cannot be captured as a CUDA graph. The
    # static step keeps the position on the device, writes there with index_copy_,
    # and attends over all max_len slots with the unwritten ones masked out.

    def start_static(self) -> None:
        """Make the device-side position (and the slot numbers) and set it to `pos`."""
        keys = self.keys[0]
        if self.position is None:
            self.position = torch.zeros(1, dtype=torch.long, device=keys.device)
            self.slots = torch.arange(self.max_len, device=keys.device)
            values = torch.tensor([0.0, float("-inf")], dtype=keys.dtype, device=keys.device)
            self.zero, self.minus_inf = values  # the mask's two values, 0-d, on the device
        self.position.fill_(self.pos)

    def begin_step(self) -> None:
        """Before a static step's layers: the slots up to `position` are visible (all
        of them once a rolling cache is full), and the step writes `position`'s slot.

        `visible` is the additive mask SDPA adds to the scores, made here once for every
        layer: given booleans, SDPA would turn them into this in each layer, which on a
        GPU is more small kernels per token."""
        seen = self.slots <= self.position  # (max_len,)
        self.visible = torch.where(seen, self.zero, self.minus_inf)[None, :]  # (1, max_len)
        self.slot = self.position.remainder(self.max_len)  # the ring's slot (rolling)
        self.stepping = True

    def write_at(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one position's K, V (B, H, 1, d_head) at `position`; return the whole
        buffers (B, H, max_len, d_head), to be read through `visible`."""
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]

    def end_step(self) -> None:
        """After a static step's layers: the next step writes the next slot. (The host's
        `pos` is the caller's to advance: a replayed graph runs no Python.)"""
        self.position.add_(1)
        self.stepping = False

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
