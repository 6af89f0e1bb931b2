"""The static-shape decode step, and its capture as a CUDA graph.

At batch 1 a small GPT's decode step is dozens of tiny kernels, and a GPU waits for
Python to launch each one. A CUDA graph records them once and replays them all with
one launch. A replay runs no Python, so the step must have the same shapes and touch
the same memory every time. The plain `KVCache` breaks both: it writes at a host-side
position and hands attention a longer slice of keys at every step.

`StaticKVCache` answers the calls the plain cache answers (`positions`, `update`,
`attn_mask`, `advance`), over the plain cache's own buffers, but keeps the position
on the device, writes there with `index_copy_`, and gives attention all max_len slots
with the unwritten ones masked out. So the model's ordinary forward pass is the
static step: neither the model nor attention knows which cache it holds.
`StaticDecoder` runs that step, as it is or captured as a CUDA graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from minigpt.kv_cache import KVCache

if TYPE_CHECKING:
    from minigpt.model import GPT


class StaticKVCache:
    """One new position at a time over `cache`'s buffers, in shapes that never change.

    The host's count of positions stays `cache.pos`, which the caller advances (a
    replayed graph runs no Python); the device's, `position`, moves inside the step.
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        device, dtype = cache.keys[0].device, cache.keys[0].dtype
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the slot to write
        self.slots = torch.arange(cache.max_len, device=device)
        self.zero, self.minus_inf = torch.tensor([0.0, float("-inf")], dtype=dtype, device=device)
        self.visible = torch.zeros((1, cache.max_len), dtype=dtype, device=device)
        self.slot = self.position.clone()
        self.sync()

    @property
    def pos(self) -> int:
        return self.cache.pos

    def sync(self) -> None:
        """Set the device's position to the host's, after the plain cache was filled."""
        self.position.fill_(self.cache.pos)

    def check_fits(self, *shape: int) -> None:
        self.cache.check_fits(*shape)

    def positions(self, n_new: int) -> Tensor:
        """The new token's position (1,), on the device. Called once per step, before
        any layer, so the mask every layer reads is made here, once: given booleans,
        SDPA would turn them into this additive mask in each layer, which on a GPU is
        more small kernels per token."""
        seen = self.slots <= self.position  # (max_len,): all of them once a ring is full
        self.visible = torch.where(seen, self.zero, self.minus_inf)[None, :]  # (1, max_len)
        self.slot = self.position.remainder(self.cache.max_len)  # the ring's slot (rolling)
        return self.position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one position's K, V (B, H, 1, d_head) at `position`; return the whole
        buffers (B, H, max_len, d_head), to be read through `attn_mask`."""
        self.cache.keys[layer].index_copy_(2, self.slot, k)
        self.cache.values[layer].index_copy_(2, self.slot, v)
        return self.cache.keys[layer], self.cache.values[layer]

    def attn_mask(self, n_new: int) -> Tensor:
        """M over all max_len slots (1, max_len): 0 on those written, -inf on the rest."""
        return self.visible

    def advance(self, n_tokens: int) -> None:
        """The next step writes the next slot (on the device: see the class docstring)."""
        self.position.add_(n_tokens)


class StaticDecoder:
    """The static step over a static input (B, 1) and output (B, V): with graph=True
    (CUDA only) it is captured as a CUDA graph on its first call and replayed after.

    Everything a replay touches stays at the addresses seen at capture: the cache's
    buffers and device-side position (a re-prefill at context overflow writes into
    the same buffers; call `sync` after it), `ids`, and the `logits` it writes. Read
    the logits before the next call, which overwrites them.
    """

    WARMUP_STEPS = 3
    """Eager steps on a side stream before capture, as torch's CUDA graph notes ask: the
    first calls allocate workspaces and pick kernels, which a capture must not record."""

    def __init__(self, model: GPT, kv_cache: KVCache, graph: bool = False):
        self.model, self.kv_cache, self.use_graph = model, kv_cache, graph
        self.static_cache = StaticKVCache(kv_cache)
        self.ids = torch.zeros((kv_cache.batch_size, 1), dtype=torch.long, device=model.device)
        self.logits: Tensor | None = None
        self.graph = None  # torch.cuda.CUDAGraph once captured

    def sync(self) -> None:
        """Take up the plain cache's position after it was filled again."""
        self.static_cache.sync()

    def __call__(self, idx: Tensor) -> Tensor:
        """The next ids idx (B, 1), written at the cache's position -> logits (B, V);
        advances the cache by one position."""
        self.ids.copy_(idx)
        if not self.use_graph:
            logits = self._step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.kv_cache.advance(1)  # the host's count; the device's moved inside the step
        return logits

    def _step(self) -> Tensor:
        logits, _ = self.model(self.ids, kv_cache=self.static_cache, last_only=True)
        return logits[:, -1, :]  # (B, V)

    def warm_up(self) -> None:
        """Run the step WARMUP_STEPS times, leaving the cache as it was: each writes the
        slot at the current position, which the next real step overwrites before any
        query sees it, and the position is put back after each."""
        for _ in range(self.WARMUP_STEPS):
            self._step()
            self.static_cache.sync()

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self.warm_up()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up's stream: libraries that make a handle per stream
        # lazily (cuBLAS workspaces, hipBLASLt) already have theirs, as a capture needs.
        with torch.cuda.graph(self.graph, stream=side):  # records the kernels, runs none
            self.logits = self._step()
