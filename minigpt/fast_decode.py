"""The static-shape decode step: captured as a CUDA graph on a GPU, compiled by
inductor on a CPU.

At batch 1 a small GPT's decode step is dozens of tiny kernels, and a GPU waits for
Python to launch each one. A CUDA graph records them once and replays them all with
one launch. A replay runs no Python, so the step must have the same shapes and touch
the same memory every time. The plain `KVCache` breaks both: it writes at a host-side
position and hands attention a longer slice of keys at every step.

On a CPU the same overhead is Python and dispatch, kernel by kernel. torch.compile
turns the static step into one call of generated C++ (inductor): the step has one
shape for the whole generation, so it is compiled once, for the model and the batch.

`StaticKVCache` answers the calls the plain cache answers (`positions`, `update`,
`attn_mask`, `advance`), over the plain cache's own buffers, but keeps the position
on the device, writes there with `index_copy_`, and gives attention all max_len slots
with the unwritten ones masked out. So the model's ordinary forward pass is the
static step: neither the model nor attention knows which cache it holds.
`StaticDecoder` runs that step: as it is, captured as a CUDA graph, or compiled.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from minigpt.errors import MinigptError
from minigpt.kv_cache import KVCache
from minigpt.quantize import is_int8

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
        """0, to the checks of the model, which read it: the step must not read the
        host's count, or a compiled step would be specialised to it and compiled again
        at every step. `StaticDecoder` checks that each step fits, on the host."""
        return 0

    def sync(self) -> None:
        """Set the device's position to the host's, after the plain cache was filled."""
        self.position.fill_(self.cache.pos)

    def check_fits(self, *shape: int) -> None:
        """Nothing: `StaticDecoder` checks the plain cache before each step (see `pos`)."""

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


def decode_step(model: GPT, cache: StaticKVCache, ids: Tensor) -> Tensor:
    """One new position of every row: ids (B, 1) -> logits (B, V). The model's own
    forward pass over a static cache: what `StaticDecoder` runs, captures or compiles."""
    logits, _ = model(ids, kv_cache=cache, last_only=True)
    return logits[:, -1, :]


def static_cache_length(block_size: int, positions: int) -> int:
    """The cache a static step gets for a generation that reaches `positions`: the next
    power of two (at least 16), at most block_size. The step attends over every slot
    of its cache, so a short generation gets a short cache (a GPT-2-sized model's keys
    and values over its whole context weigh as much per token as a good part of its
    int8 weights); powers of two bound how many shapes a model's step is compiled for."""
    return min(block_size, max(16, 1 << (positions - 1).bit_length()))


def step_mode(device: torch.device) -> str:
    """How `--compile` runs the static step on a device: captured as a CUDA graph,
    compiled by inductor on a CPU, as it is elsewhere."""
    return {"cuda": "graph", "cpu": "compiled"}.get(device.type, "eager")


class StaticDecoder:
    """The static step over a static input (B, 1) and output (B, V).

    mode "eager" runs it as it is; "graph" (CUDA) captures it as a CUDA graph on its
    first call and replays it after; "compiled" runs `compiled_step`, compiled by
    inductor for this model and batch (on its first use, then reused by every decoder
    of both).

    Everything a replay touches stays at the addresses seen at capture: the cache's
    buffers and device-side position (a re-prefill at context overflow writes into
    the same buffers; call `sync` after it), `ids`, and the `logits` it writes. Read
    the logits before the next call, which overwrites them.
    """

    WARMUP_STEPS = 3
    """Eager steps on a side stream before capture, as torch's CUDA graph notes ask: the
    first calls allocate workspaces and pick kernels, which a capture must not record."""

    def __init__(self, model: GPT, kv_cache: KVCache, mode: str = "eager"):
        self.model, self.kv_cache, self.mode = model, kv_cache, mode
        self.static_cache = StaticKVCache(kv_cache)
        self.ids = torch.zeros((kv_cache.batch_size, 1), dtype=torch.long, device=model.device)
        self.logits: Tensor | None = None
        self.graph = None  # torch.cuda.CUDAGraph once captured
        self.step = decode_step
        if mode == "compiled":
            self.step = compiled_step(model, self.static_cache)

    def sync(self) -> None:
        """Take up the plain cache's position after it was filled again."""
        self.static_cache.sync()

    def __call__(self, idx: Tensor) -> Tensor:
        """The next ids idx (B, 1), written at the cache's position -> logits (B, V);
        advances the cache by one position."""
        c = self.model.config
        self.kv_cache.check_fits(c.n_layer, idx.size(0), c.kv_heads, c.d_head, idx.size(1))
        self.ids.copy_(idx)
        if self.mode != "graph":
            logits = self.step(self.model, self.static_cache, self.ids)
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.kv_cache.advance(1)  # the host's count; the device's moved inside the step
        return logits

    def warm_up(self) -> None:
        """Run the step WARMUP_STEPS times, leaving the cache as it was: each writes the
        slot at the current position, which the next real step overwrites before any
        query sees it, and the position is put back after each."""
        for _ in range(self.WARMUP_STEPS):
            decode_step(self.model, self.static_cache, self.ids)
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
            self.logits = decode_step(self.model, self.static_cache, self.ids)


# --- the step compiled by inductor (CPU) -----------------------------------------------

_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {(cache kind, batch, cache length, what the weights are): its compiled step}."""


def compiled_step(model: GPT, static_cache: object) -> Callable[..., Tensor]:
    """`decode_step` compiled by inductor for this model and this kind of static cache
    (`StaticKVCache`, or batching's rows), batch and cache length: made here once,
    compiled on its first call, and reused by every later generation.

    Dynamo guards a compiled function: before every call it checks again each module
    attribute and weight the step read, which costs a good part of a small model's step.
    Here nothing can change between calls (one model, one shape), so the guards are
    dropped, and each compiled step keeps its own cache of graphs (isolate_recompiles),
    so that no other model or batch can ever be given this one's graph. Quantized
    weights are frozen into the graph (`freezing`), which is where inductor swaps the
    int8 matmul for its int8 kernel.
    """
    weights = tuple(sorted({(type(p).__name__, str(p.dtype)) for p in model.parameters()}))
    cache = static_cache.cache  # the plain KVCache whose buffers it writes
    key = (type(static_cache).__name__, cache.batch_size, cache.max_len, weights, model.training)
    steps = _compiled_steps.setdefault(model, {})
    if key not in steps:
        check_compile_support(model.device)
        options: dict = {"cpp_wrapper": True, "freezing": is_int8(model)}
        extra: dict = {}
        if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
            options["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
            extra["isolate_recompiles"] = True
        steps[key] = torch.compile(decode_step, fullgraph=True, options=options, **extra)
    return steps[key]


def check_compile_support(device: torch.device) -> None:
    """Raise unless torch.compile can build the decode step for this device: on a CPU
    inductor writes C++, which needs a compiler."""
    if step_mode(device) != "compiled":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # ImportError, or inductor's InvalidCxxCompiler
        raise MinigptError(
            "--compile cannot build the decode step on this machine: torch.compile's CPU"
            f" backend (inductor) found no C++ compiler ({type(err).__name__})",
            hint="install g++ or clang (on Windows, Visual Studio's C++ tools), or leave"
            " out --compile",
        ) from None


def compile_decode_step(model: GPT, batch_size: int = 1, positions: int | None = None) -> float:
    """Compile the decode step for this model and batch now, on a scratch cache, so that
    no generation pays for it; the seconds it took (about 0 if it was compiled already).
    positions: how far the generation reaches (prompt + new tokens; None: block_size),
    which sets its cache (`static_cache_length`). Only a CPU's step is compiled ahead:
    a CUDA graph is captured by each decoder, in its first step."""
    if step_mode(model.device) != "compiled":
        return 0.0
    block_size = model.config.block_size
    max_len = static_cache_length(block_size, positions or block_size)
    kv_cache = model.new_kv_cache(batch_size, max_len=max_len)
    decoder = StaticDecoder(model, kv_cache, mode="compiled")
    started = time.perf_counter()
    with compile_errors(), torch.inference_mode():
        decoder(torch.zeros((batch_size, 1), dtype=torch.long, device=model.device))
    return time.perf_counter() - started


@contextmanager
def compile_errors() -> Iterator[None]:
    """What torch.compile raises while it builds a step, as one sentence and a hint."""
    try:
        yield
    except MinigptError:
        raise
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise MinigptError(
            f"torch.compile could not build the decode step: {first_line}",
            hint="leave out --compile (sampling gives the same tokens without it)",
        ) from None
