"""Sampling from a GPT: prefill the prompt once, then decode one position at a time.

    prompt ids ──► prefill (one forward, batch 1) ──► KV cache (broadcast to B samples)
                                                      │
        ┌──────────────── one new position per step ◄─┘
        ▼
    logits (B, V) ─► top-k ─► / temperature ─► top-p ─► draw (seeded) ─► next ids (B,)
    (only ids the tokenizer has: a padded model vocabulary's extra rows are never drawn)
        ▲                                                                   │
        └──────────── forward(next ids, kv_cache, last_only) ◄──────────────┘

Every layer's keys and values of the positions already seen stay in the cache,
so a step costs one position, not a forward pass over the whole context.

Context overflow. The model learned absolute positions 0..block_size-1, so the
context it sees can never be longer than block_size. When the window is full we
crop it to its last `block_size - stride` tokens and prefill them again (at
positions 0..): the cache then has `stride` free slots before the next crop.
`stride=0` crops at every step, which is exactly nanoGPT's "use the last
block_size tokens" (and costs a full prefill per step); a larger stride trades a
slightly shorter context right after a crop for one prefill every `stride` steps.
Both paths (`use_kv_cache=True` and the recomputing `False`) use the same windows,
so for any stride they give the same tokens: the cache is an optimisation only.

Rotary positions (`position="rope"`) need none of this: attention depends only on
how far apart two tokens are, so the window slides one token per step. The cache
is a ring (`KVCache.rolling`) that drops the oldest position for the newest, and
every step past block_size costs one position. What it computes is sliding-window
attention: at every layer each token sees the last block_size positions. That is
not "the last block_size tokens, run from scratch": with several layers, the
oldest tokens of such a window would lose the context they had when they were
cached. So the recomputing path runs the last n_layer * (block_size - 1) + 1
tokens (all the last token depends on) under the same sliding window
(`attention.sliding_window_mask`), at positions 0.. : the same tokens.

The settings of a generation are one `Sampling`, checked when it is made; this
module prints nothing (the command line's printing is in `console.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from minigpt.device import device_memory
from minigpt.errors import MinigptError
from minigpt.fast_decode import StaticDecoder, static_cache_length, step_mode
from minigpt.kv_cache import KVCache
from minigpt.model import GPT
from minigpt.quantize import is_int8
from minigpt.sampling import Sampling, new_seed, sample_next, with_settings
from minigpt.signals import check
from minigpt.text import GenerationResult, SampleStream
from minigpt.tokenizer import Tokenizer

MAX_CACHE_BYTES = 2**34
"""The keys and values of a batch of samples may take at most this much memory (16 GiB),
and at most half of the device's memory: beyond that the allocation fails with a
traceback, or the machine swaps, long after the user could have been told."""


# --- the prompt ----------------------------------------------------------------------


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> tuple[list[int], int]:
    """Prompt text -> (ids of at most block_size tokens, how many leading tokens were cropped).

    Without a prompt, generation starts where a new document would (`document_start`).
    """
    ids = (tokenizer.encode_prompt(prompt) if prompt else []) or document_start(tokenizer)
    cropped = max(0, len(ids) - block_size)
    return ids[cropped:], cropped


def document_start(tokenizer: Tokenizer) -> list[int]:
    """The ids an empty prompt stands for: where a new document starts, after the
    tokenizer's separator (end-of-text, or a newline for `char`), else after id 0."""
    separator = tokenizer.separator_id
    return [0 if separator is None else separator]


def window_start(n_tokens: int, start: int, block_size: int, stride: int) -> int:
    """First index of the context window once the sequence holds n_tokens.

    The window is tokens[start:n_tokens]; when it would exceed block_size it is
    cropped to its last block_size - stride tokens (see the module docstring).
    """
    if n_tokens - start > block_size:
        return n_tokens - (block_size - stride)
    return start


# --- the decode loop -----------------------------------------------------------------


def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int | None = None,
    *,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
    **settings: Any,
) -> Iterator[Tensor]:
    """Yield the next token ids (num_samples,) of every sample, one step at a time, as
    CPU tensors whatever the model's device.

    prompt_ids: 1 to block_size ids (see `encode_prompt`); every sample continues it.
    sampling: the settings; or give them as keywords (max_new_tokens and the other
    fields of `Sampling`), which also override those of a `sampling` given.
    The draws come from `generator`, else from one seeded with the seed, else from
    torch's global generator. vocab_limit: only ids below it are drawn (the
    tokenizer's vocab_size; None: the model's, which may be padded past it).
    The prompt, the stride and the memory the samples need are checked against the
    model before this returns; stop consuming the iterator to stop early (nothing
    is computed ahead, except on CUDA: one step, queued while the host reads the
    last). A step whose logits are not finite raises MinigptError, before its ids.
    """
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    sampling = with_settings(sampling, settings)
    block_size = model.config.block_size
    if model.config.position == "rope" and sampling.stride is not None:
        raise MinigptError(
            "stride applies to learned positions; this model's rotary positions slide"
            " its window one token at a time (a rolling KV cache)",
            hint="leave the overflow stride out with this model",
            param="stride",
        )
    stride = sampling.stride_for(block_size)
    if not 0 <= stride < block_size:
        raise MinigptError(
            f"stride must be in [0, block_size={block_size}), got {stride}",
            hint="0 crops the context at every step; block_size // 4 is the default",
            param="stride",
        )
    vocab_limit = _check_vocab_limit(vocab_limit, model.config.vocab_size)
    _check_prompt_ids(prompt_ids, block_size, vocab_limit)
    check_cache_memory(model, sampling.num_samples)
    if model.config.position == "rope" and not sampling.use_kv_cache:
        _check_recompute_memory(model, len(prompt_ids) + sampling.max_new_tokens, sampling)
    if generator is None and sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    return _decode_steps(model, list(prompt_ids), sampling, stride, generator, vocab_limit)


def _check_vocab_limit(vocab_limit: int | None, model_vocab_size: int) -> int:
    """The ids a draw may give: [0, vocab_limit), within the model's vocabulary."""
    if vocab_limit is None:
        return model_vocab_size
    if not 1 <= vocab_limit <= model_vocab_size:
        raise MinigptError(
            f"vocab_limit must be from 1 to the model's vocab_size={model_vocab_size},"
            f" got {vocab_limit}",
            hint="pass the tokenizer's vocab_size; the tokenizer must belong to this model",
            param="vocab_limit",
        )
    return vocab_limit


def _check_prompt_ids(prompt_ids: Sequence[int], block_size: int, vocab_limit: int) -> None:
    """1 to block_size ids, each one the tokenizer has (the embedding would fail deep
    inside the model, or an id past the tokenizer would be decoded nowhere)."""
    if not 1 <= len(prompt_ids) <= block_size:
        raise MinigptError(
            f"the prompt must hold 1 to block_size={block_size} tokens, got {len(prompt_ids)}",
            hint="crop it with encode_prompt",
            param="prompt_ids",
        )
    bad = next((i for i in prompt_ids if not 0 <= i < vocab_limit), None)
    if bad is not None:
        raise MinigptError(
            f"the prompt holds token id {bad}, outside the vocabulary of {vocab_limit}",
            hint="encode the prompt with the model's own tokenizer",
            param="prompt_ids",
        )


def cache_bytes(model: GPT, num_samples: int) -> int:
    """Memory of the keys and values of num_samples full contexts: every layer keeps
    K and V, each (num_samples, n_kv_head, block_size, d_head), in the weights' dtype.
    Without the cache a forward over that batch holds as much, so both paths count it."""
    c = model.config
    element = model.tok_emb.weight.element_size()
    return num_samples * c.n_layer * 2 * c.kv_heads * c.block_size * c.d_head * element


def memory_limit(device: torch.device) -> int:
    """The most the samples' keys and values may take on `device`: MAX_CACHE_BYTES,
    and at most half the device's memory where it can be told."""
    total = device_memory(device)
    return min(MAX_CACHE_BYTES, total // 2) if total else MAX_CACHE_BYTES


def check_cache_memory(model: GPT, num_samples: int) -> None:
    """Refuse a batch of samples whose keys and values would not fit (see memory_limit)."""
    needed, limit = cache_bytes(model, num_samples), memory_limit(model.device)
    if needed <= limit:
        return
    most = max(1, limit // cache_bytes(model, 1))
    raise MinigptError(
        f"num_samples={num_samples} samples need {needed / 2**30:.1f} GiB of keys and values"
        f" with this model, more than the {limit / 2**30:.1f} GiB allowed on {model.device}",
        hint=f"ask for at most {most} samples at a time",
        param="num_samples",
    )


def recompute_window(model: GPT) -> int:
    """Tokens the recomputing path runs per step: block_size, or for rotary positions
    everything the newest token depends on through n_layer sliding windows."""
    c = model.config
    return c.n_layer * (c.block_size - 1) + 1 if c.position == "rope" else c.block_size


def _check_recompute_memory(model: GPT, n_tokens: int, sampling: Sampling) -> None:
    """Refuse a rotary model's recomputing path whose attention scores, (B, H, T, T)
    floats over the window it reruns, would not fit (see memory_limit)."""
    T = min(recompute_window(model), n_tokens)
    needed = sampling.num_samples * model.config.n_head * T * T * 4
    limit = memory_limit(model.device)
    if needed > limit:
        raise MinigptError(
            f"recomputing every step reruns {T:,} tokens with this model, whose attention"
            f" scores need {needed / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB"
            f" allowed on {model.device}",
            hint="sample with the KV cache (drop --no-kv-cache): it rolls, one position per step",
            param="use_kv_cache",
        )


class _Context:
    """What the model sees while decoding: every sample's tokens, the window of them
    in context, and the KV cache that holds the window's keys and values.

    The token history never reaches back more than `window` tokens, so the buffer
    keeps at most 2 x window and slides the last `window` to the front when full.
    """

    def __init__(self, model: GPT, prompt_ids: list[int], sampling: Sampling, stride: int):
        self.model, self.sampling = model, sampling
        # Rotary positions: every layer attends over the last block_size positions, and
        # the cache rolls with them. Recomputing that needs more than the last block_size
        # tokens: the last token's state depends, through n_layer windows, on the last
        # n_layer * (block_size - 1) + 1 tokens, which are run again at positions 0.. .
        self.rolling = model.config.position == "rope"
        self.window = recompute_window(model)
        self.stride = 0 if self.rolling else stride
        self.n = len(prompt_ids)  # tokens so far
        self.start = 0  # the model sees tokens[:, start:n]
        width = min(self.n + sampling.max_new_tokens, 2 * self.window)
        shape = (sampling.num_samples, width)
        self.tokens = torch.empty(shape, dtype=torch.long, device=model.device)  # (B, width)
        self.tokens[:, : self.n] = torch.tensor(prompt_ids, dtype=torch.long, device=model.device)
        self.kv_cache = None
        if sampling.use_kv_cache:
            max_len = None  # block_size
            if sampling.static_decode:  # it attends over its whole cache: as long as needed
                reach = self.n + sampling.max_new_tokens
                max_len = static_cache_length(model.config.block_size, reach)
            self.kv_cache = model.new_kv_cache(sampling.num_samples, max_len=max_len)
        self.decoder: StaticDecoder | None = None

    def prefill(self) -> Tensor:
        """The prompt's forward pass -> the logits of its last position (B, V). The
        prompt is the same for every sample: one forward at batch 1."""
        prompt = self.tokens[:1, : self.n]
        if self.kv_cache is None:
            logits, _ = self.model(prompt, last_only=True)
        else:
            logits = _shared_prefill(self.model, prompt, self.kv_cache)
            if self.sampling.static_decode:
                mode = step_mode(self.model.device)
                self.decoder = StaticDecoder(self.model, self.kv_cache, mode=mode)
        return logits[:, -1, :].expand(self.sampling.num_samples, -1)  # (B, V)

    def append(self, next_ids: Tensor) -> None:
        """Write every sample's next token (B,) after its last."""
        if self.n == self.tokens.size(1):
            w = self.window
            self.tokens[:, :w] = self.tokens[:, self.n - w : self.n].clone()
            self.start, self.n = self.start - (self.n - w), w
        self.tokens[:, self.n] = next_ids
        self.n += 1

    def forward(self) -> Tensor:
        """The forward pass of the token just appended -> its logits (B, V)."""
        n, model, kv_cache = self.n, self.model, self.kv_cache
        new_start = window_start(n, self.start, self.window, self.stride)
        if kv_cache is None:
            logits, _ = model(self.tokens[:, new_start:n], last_only=True)
        elif new_start != self.start and not self.rolling:
            # The cache holds block_size positions: crop, prefill the window again.
            kv_cache.reset()
            logits, _ = model(self.tokens[:, new_start:n], kv_cache=kv_cache, last_only=True)
            if self.decoder is not None:
                self.decoder.sync()
        elif self.decoder is not None:
            logits = self.decoder(self.tokens[:, n - 1 : n])[:, None, :]
        else:
            logits, _ = model(self.tokens[:, n - 1 : n], kv_cache=kv_cache, last_only=True)
        self.start = new_start
        return logits[:, -1, :]  # (B, V)


@torch.inference_mode()
def _decode_steps(
    model: GPT,
    prompt_ids: list[int],
    sampling: Sampling,
    stride: int,
    generator: torch.Generator | None,
    vocab_limit: int,
) -> Iterator[Tensor]:
    # (inference_mode wraps each resume of this generator, not the caller's code.)
    context = _Context(model, prompt_ids, sampling, stride)
    logits = context.prefill()  # (B, V)
    # Reading ahead: on a GPU the host reads each step's ids (to check them, and for the
    # caller to decode) while the device runs the next step's forward pass, queued
    # before the read, so the GPU does not idle through the host's share of every
    # token. Not for the first token, whose latency is the prompt's, nor on a CPU,
    # where nothing runs behind the host's back and a caller that stops early would
    # pay for a step.
    ahead = computes_ahead(model.device)
    for step in range(sampling.max_new_tokens):
        next_ids, finite = _draw(logits[:, :vocab_limit], sampling, generator)  # (B,)
        context.append(next_ids)
        last = step == sampling.max_new_tokens - 1  # no logits are needed after the last token
        read = _start_read(next_ids, finite)
        if ahead and 0 < step and not last:
            logits = context.forward()
            yield _check_finite(*read())
        else:
            yield _check_finite(*read())
            if not last:
                logits = context.forward()


def _draw(
    logits: Tensor, sampling: Sampling, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Logits (B, V) -> (next ids (B,), whether every logit was finite, on the device).
    Finiteness is checked on the host before the ids are given out (`_check_finite`)."""
    finite = torch.isfinite(logits).all()
    if sampling.temperature > 0:
        # A draw from NaN fails on the device (a traceback, or on CUDA a dead context)
        # before the host has read `finite`: draw from numbers, and give out nothing.
        logits = logits.nan_to_num()
    next_ids = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
    return next_ids, finite


def computes_ahead(device: torch.device) -> bool:
    """Whether the decode loop queues a step's forward pass before reading the last
    one's ids: on CUDA, whose kernels run behind the host's back."""
    return device.type == "cuda"


def _start_read(next_ids: Tensor, finite: Tensor) -> Callable[[], tuple[Tensor, bool]]:
    """Start copying a step's ids (B,) and whether its logits were finite to the host;
    the returned function waits for the copy and gives both. On CUDA the copies go to
    pinned memory without blocking, so work queued after this call runs on meanwhile."""
    if next_ids.device.type != "cuda":
        return lambda: (next_ids.cpu(), bool(finite))
    host_ids = next_ids.to("cpu", non_blocking=True)  # pinned
    host_finite = finite.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> tuple[Tensor, bool]:
        copied.synchronize()  # the copies only, not what was queued after them
        return host_ids, bool(host_finite)

    return wait


def _check_finite(next_ids: Tensor, finite: bool) -> Tensor:
    """next_ids, once sure the logits they came from were numbers: NaN weights give NaN
    logits, which argmax turns into garbage ids and multinomial into a traceback."""
    if not finite:
        raise MinigptError(
            "the model produced non-finite logits (NaN or inf): its weights are damaged",
            hint="load another checkpoint (model-last.safetensors, or retrain with a lower"
            " learning rate)",
        )
    return next_ids


def _shared_prefill(model: GPT, prompt: Tensor, kv_cache: KVCache) -> Tensor:
    """Run the prompt (1, T) once and copy its keys/values into every row of kv_cache."""
    T = prompt.size(1)
    if kv_cache.batch_size == 1:
        logits, _ = model(prompt, kv_cache=kv_cache, last_only=True)
        return logits
    single = model.new_kv_cache(1, max_len=T)
    logits, _ = model(prompt, kv_cache=single, last_only=True)  # (1, 1, V)
    kv_cache.fill_from(single)
    return logits


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "",
    sampling: Sampling | None = None,
    *,
    on_text: Callable[[int, str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    **settings: Any,
) -> GenerationResult:
    """Generate sampling.num_samples continuations of `prompt` as text.

    sampling, settings: as for `generate`.
    on_text(sample_index, text) is called with each piece of a sample's text as soon
    as it is final (see `SampleStream`). A sample ends at a stop string (excluded
    from its text), at end-of-text, or at max_new_tokens; generation ends when every
    sample has. on_warning(message) hears of a prompt cropped to block_size.
    """
    sampling = with_settings(sampling, settings)
    if sampling.seed is None:
        sampling = replace(sampling, seed=new_seed())
    block_size = model.config.block_size
    prompt_ids, cropped = encode_prompt(tokenizer, prompt, block_size)
    if cropped and on_warning:
        on_warning(
            f"the prompt has {cropped + len(prompt_ids)} tokens, more than the model's "
            f"block_size={block_size}; only its last {block_size} tokens are used"
        )
    streams = [SampleStream(tokenizer, sampling.stop) for _ in range(sampling.num_samples)]

    def emit(index: int, text: str) -> None:
        if text and on_text:
            on_text(index, text)

    started = time.perf_counter()
    first_token_seconds = 0.0
    steps = generate(model, prompt_ids, sampling=sampling, vocab_limit=tokenizer.vocab_size)
    for step, next_ids in enumerate(steps):
        check()  # a signal stops sampling between two tokens
        if step == 0:
            first_token_seconds = time.perf_counter() - started
        for index, token_id in enumerate(next_ids.tolist()):
            if not streams[index].ended:
                emit(index, streams[index].push(token_id))
        if all(stream.ended for stream in streams):
            break
    steps.close()
    seconds = time.perf_counter() - started
    for index, stream in enumerate(streams):
        emit(index, stream.finish())
    return GenerationResult(
        prompt_tokens=len(prompt_ids),
        samples=[stream.sample for stream in streams],
        seconds=seconds,
        first_token_seconds=first_token_seconds,
        cropped_prompt_tokens=cropped,
        settings=settings_json(model, sampling),
    )


def settings_json(model: GPT, sampling: Sampling) -> dict:
    """What a generation ran with, as its JSON result reports it."""
    cache = cache_bytes(model, sampling.num_samples) if sampling.use_kv_cache else 0
    return {
        **sampling.to_json(model.config.block_size),
        "device": str(model.device),
        "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
        "quantize": "int8" if is_int8(model) else None,
        "kv_cache_bytes": cache,
    }
