"""Continuous batching: many sequences decoded as one batch, each at its own position.

Requests arrive at any time, with prompts of any length, and end at any time. One
after another they waste the machine: a small model's step at batch 1 is mostly
overhead, and a step over 16 rows costs little more than a step over one. So one
decode loop serves every sequence:

    a new sequence ──► prefill its prompt alone (batch 1) ──► its keys/values into a free row
                                                                    │
    rows 0..n-1 of one KV cache ◄───────────────────────────────────┘
      │ each step: every row draws its next token from its logits (its own settings and seed)
      │            one forward pass of the n new tokens, each at its own row's position
      └ a row that ends leaves: the last row moves into its place, so rows 0..n-1 stay the batch

`RowKVCache` answers the calls a `KVCache` answers (`positions`, `update`, `attn_mask`,
`advance`) with one position per row: each row writes its new key at its own slot,
and its query sees its own slots only (a mask per row). The model and attention do
not know which cache they hold. `StaticRowKVCache` takes every one of the max_batch
rows at every step, idle ones too, with the rows' lengths on the device: one shape
for the whole decode, so on a CPU that step is compiled once (`BatchDecoder(static=True)`).

Context overflow follows `minigpt.generate`, row by row. Learned positions: a row
whose window is full is prefilled again, alone, with its last block_size - stride - 1
tokens, then takes its step with the others. Rotary positions: the row's ring rolls.
So a sequence gets the tokens `generate` gives it alone, whatever joins or leaves
around it: greedy ones exactly, seeded ones too (each sequence draws from its own
generator).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from minigpt.errors import MinigptError
from minigpt.fast_decode import (
    compile_errors,
    compiled_step,
    decode_step,
    step_mode,
)
from minigpt.generate import check_cache_memory, encode_prompt, settings_json
from minigpt.kv_cache import KVCache
from minigpt.model import GPT
from minigpt.quantize import is_int8
from minigpt.sampling import MAX_SEED, Sampling, new_seed, sample_next
from minigpt.signals import check
from minigpt.text import GenerationResult, SampleStream
from minigpt.tokenizer import Tokenizer


class RowKVCache:
    """Rows 0..n_rows-1 of `cache`'s buffers, each row a sequence at its own position,
    taking one new position per row per step.

    lengths[row]: positions that row has written (past max_len a rolling ring keeps
    the last max_len of them).
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.lengths = [0] * cache.batch_size
        self.n_rows = 0
        self.rows = torch.arange(cache.batch_size, device=cache.keys[0].device)
        self.slots = torch.arange(cache.max_len, device=cache.keys[0].device)
        self.slot = self.visible = None  # set by `positions`, once per step

    @property
    def pos(self) -> int:
        """The longest row's positions: what the model checks against block_size."""
        return max(self.lengths[: self.n_rows], default=0)

    def check_fits(
        self, n_layer: int, batch_size: int, n_head: int, d_head: int, n_new: int
    ) -> None:
        if n_new != 1 or batch_size != self.n_rows:
            raise MinigptError(
                f"a batch of rows takes one token per row ({self.n_rows} rows),"
                f" got {batch_size} x {n_new}",
                hint="prefill a prompt alone, then `RowKVCache.write_row`",
                param="kv_cache",
            )
        self.check_model_shape(n_layer, n_head, d_head)

    def check_model_shape(self, n_layer: int, n_head: int, d_head: int) -> None:
        cache = self.cache
        if n_layer > len(cache.keys) or (n_head, d_head) != (cache.n_head, cache.d_head):
            raise MinigptError(
                "the rows' KV cache was built for another model's shape",
                hint="build it with model.new_kv_cache(max_batch)",
                param="kv_cache",
            )

    def positions(self, n_new: int) -> Tensor:
        """Each row's new position (n_rows, 1). The mask every layer reads is made here,
        once per step: row r sees its slots up to its new one (all of them once its
        ring is full)."""
        device = self.slots.device
        lengths = torch.tensor(self.lengths[: self.n_rows], device=device)  # (n,)
        hidden = self.slots[None, :] > lengths[:, None]  # (n, max_len)
        mask = torch.zeros(hidden.shape, dtype=self.cache.keys[0].dtype, device=device)
        mask = mask.masked_fill(hidden, float("-inf"))
        self.visible = mask[:, None, None, :]  # (n, 1, 1, max_len): broadcast over heads
        self.slot = lengths.remainder(self.cache.max_len)  # (n,): where each row writes
        return lengths[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write each row's K, V (n, H, 1, d_head) at its own slot; return the rows'
        whole buffers (n, H, max_len, d_head), read through `attn_mask`."""
        rows = self.rows[: self.n_rows]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[rows, :, self.slot] = k[:, :, 0]  # (n, H, d_head) into (row, :, slot) pairs
        values[rows, :, self.slot] = v[:, :, 0]
        return keys[: self.n_rows], values[: self.n_rows]

    def attn_mask(self, n_new: int) -> Tensor:
        """M per row (n, 1, 1, max_len): 0 on the row's written slots, -inf elsewhere."""
        return self.visible

    def advance(self, n_tokens: int) -> None:
        for row in range(self.n_rows):
            self.lengths[row] += n_tokens

    def write_row(self, row: int, single: KVCache) -> None:
        """Put a batch-1 cache's positions (a prefilled prompt) into `row`."""
        n = single.pos
        for layer, (k, v) in enumerate(zip(single.keys, single.values, strict=True)):
            self.cache.keys[layer][row, :, :n] = k[0, :, :n]
            self.cache.values[layer][row, :, :n] = v[0, :, :n]
        self.lengths[row] = n

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source`'s written slots to row `target`."""
        n = min(self.lengths[source], self.cache.max_len)
        for keys, values in zip(self.cache.keys, self.cache.values, strict=True):
            keys[target, :, :n] = keys[source, :, :n]
            values[target, :, :n] = values[source, :, :n]
        self.lengths[target] = self.lengths[source]


class StaticRowKVCache(RowKVCache):
    """Every one of `cache`'s max_batch rows at every step, idle ones too, in shapes
    that never change: the rows' step compiled once for the whole decode (as
    `fast_decode.StaticKVCache` is for one sequence's).

    The rows' lengths live twice. The host's, `lengths`, are what the crops read (as
    in `RowKVCache`). The device's, `device_lengths` with `active` (1 for a row in
    use), are what the step reads and advances: it must read no host-side number
    that changes between steps, or a compiled step would be compiled again. A row
    that joins, leaves, moves or is filled again changes the host's; `sync` copies
    them to the device before the next step. An idle row has length 0: it takes
    position 0 (never past a learned position table) and writes only its own slot 0.
    """

    def __init__(self, cache: KVCache):
        super().__init__(cache)
        device, dtype = self.slots.device, cache.keys[0].dtype
        self.device_lengths = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.active = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.zero, self.minus_inf = torch.tensor([0.0, float("-inf")], dtype=dtype, device=device)
        self.synced: tuple[int, ...] | None = None  # the `_host_rows` the device holds

    @property
    def pos(self) -> int:
        """0, to the model's checks (see the class docstring): BatchDecoder crops each
        row on the host before it overflows."""
        return 0

    def check_fits(
        self, n_layer: int, batch_size: int, n_head: int, d_head: int, n_new: int
    ) -> None:
        """Only what the shapes must hold, which never changes between steps."""
        cache = self.cache
        if n_new != 1 or batch_size != cache.batch_size:
            raise MinigptError(
                f"a static batch of rows takes one token for each of its {cache.batch_size}"
                f" rows, got {batch_size} x {n_new}",
                hint="pad the batch with ids of idle rows",
                param="kv_cache",
            )
        self.check_model_shape(n_layer, n_head, d_head)

    def sync(self) -> None:
        """Give the device the host's lengths and rows in use, if they changed other
        than by a step (one small copy)."""
        host = self._host_rows()
        if host == self.synced:
            return
        n, idle = self.n_rows, self.cache.batch_size - self.n_rows
        self.device_lengths.copy_(torch.tensor(self.lengths[:n] + [0] * idle))
        self.active.copy_(torch.tensor([1] * n + [0] * idle))
        self.synced = host

    def positions(self, n_new: int) -> Tensor:
        """Each row's new position (B, 1), from the device's lengths; the mask and the
        write slots every layer reads are made here, once per step."""
        lengths = self.device_lengths  # (B,)
        hidden = self.slots[None, :] > lengths[:, None]  # (B, max_len)
        self.visible = torch.where(hidden, self.minus_inf, self.zero)[:, None, None, :]
        self.slot = lengths.remainder(self.cache.max_len)  # (B,): where each row writes
        return lengths[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write each row's K, V (B, H, 1, d_head) at its own slot; return the whole
        buffers (B, H, max_len, d_head), read through `attn_mask`. (Indexed writes, as
        `RowKVCache.update`'s: inductor writes them in place, where a scatter_ into
        the buffers would copy each whole buffer twice per step.)"""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.slot] = k[:, :, 0]  # (B, H, d_head) into (row, :, slot) pairs
        values[self.rows, :, self.slot] = v[:, :, 0]
        return keys, values

    def advance(self, n_tokens: int) -> None:
        """The rows in use move on, on the device (inside the step); idle ones stay."""
        self.device_lengths.add_(self.active * n_tokens)

    def count_step(self) -> None:
        """The host's count of the step the device just took."""
        RowKVCache.advance(self, 1)
        self.synced = self._host_rows()

    def _host_rows(self) -> tuple[int, ...]:
        """What the device must hold: the rows in use and their lengths."""
        return (self.n_rows, *self.lengths[: self.n_rows])


@dataclass
class TokenLogprob:
    """A drawn token's log-probability under the model (before temperature), and the
    `top` most likely (id, logprob) pairs of that step, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Continuation:
    """One continuation being written: its prompt and settings, its window of tokens,
    and its text so far (`stream`).

    sampling: its settings (num_samples and the cache options do not apply here).
    logprobs: how many alternatives each drawn token reports (0: no logprobs at all).
    owner: whatever the caller needs to route the sequence's output (a job, an index).
    """

    prompt_ids: list[int]
    sampling: Sampling
    stream: SampleStream
    generator: torch.Generator | None = None
    logprobs: int = 0
    owner: Any = None
    tokens: list[int] = field(default_factory=list)  # the model's window, newest last
    n_new: int = 0
    error: str | None = None


@dataclass
class Draw:
    """One step's output for one sequence: the token, the text that became final, and,
    once the sequence ended, why ("stop" or "length"; "error" with continuation.error)."""

    continuation: Continuation
    token_id: int
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class BatchDecoder:
    """Up to `max_batch` sequences decoded together (see the module docstring).

    vocab_limit: only ids below it are drawn (the tokenizer's vocab_size).
    static: each step runs all max_batch rows, idle ones too, over a `StaticRowKVCache`:
        one shape for the whole decode, so on a CPU the step is compiled by inductor
        once (`fast_decode.compiled_step`, as `generate --compile` does) and reused by
        every step and every later decoder of this model and max_batch. Elsewhere the
        static step runs eagerly: no CUDA graph of the rows is captured here.
    """

    def __init__(
        self, model: GPT, max_batch: int, vocab_limit: int | None = None, static: bool = False
    ):
        if max_batch < 1:
            raise MinigptError(
                f"max_batch must be at least 1, got {max_batch}",
                hint="8 is a good start on a CPU",
                param="max_batch",
            )
        check_cache_memory(model, max_batch)
        if model.config.attention != "fused" and is_int8(model):
            raise MinigptError(
                "int8 weights are decoded in batches only by fused attention, and this"
                " model's is attention='wrapper'",
                hint="leave out --quantize: its float32 weights batch as they are",
                param="quantize",
            )
        if model.config.attention != "fused":
            # The per-row mask is shaped for the fused form's (B, H, T, T_k) scores;
            # the fused form computes what the wrapper computes, from the same weights.
            fused = GPT(replace(model.config, attention="fused"))
            fused.load_state_dict(model.state_dict())
            model = fused.to(device=model.device, dtype=model.tok_emb.weight.dtype).eval()
        self.model, self.max_batch = model, max_batch
        self.block_size = model.config.block_size
        self.learned = model.config.position == "learned"
        self.vocab_limit = vocab_limit or model.config.vocab_size
        self.rows: list[Continuation] = []
        self.logits = torch.zeros(max_batch, model.config.vocab_size, device=model.device)
        self.static = static
        if not static:
            self.cache = RowKVCache(model.new_kv_cache(max_batch))
            return
        self.cache = StaticRowKVCache(model.new_kv_cache(max_batch))
        self.ids = torch.zeros((max_batch, 1), dtype=torch.long, device=model.device)
        compiled = step_mode(model.device) == "compiled"
        self.run_step = compiled_step(model, self.cache) if compiled else decode_step

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def continuation(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        sampling: Sampling,
        *,
        logprobs: int = 0,
        owner: Any = None,
    ) -> Continuation:
        """A sequence ready to join: seeded from sampling.seed (a fresh seed if None)."""
        seed = new_seed() if sampling.seed is None else sampling.seed
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        return Continuation(
            list(prompt_ids), sampling, SampleStream(tokenizer, sampling.stop), generator,
            logprobs, owner, tokens=list(prompt_ids),
        )  # fmt: skip

    @torch.inference_mode()
    def join(self, continuation: Continuation) -> None:
        """Prefill the continuation's prompt alone and give it the next free row."""
        if not self.free:
            raise MinigptError("every row is taken", hint="wait for a continuation to end")
        row = len(self.rows)
        self.logits[row] = self._prefill(continuation.tokens)
        self.rows.append(continuation)
        self.cache.n_rows = len(self.rows)

    def leave(self, continuation: Continuation) -> None:
        """Free the continuation's row; the last row moves into it."""
        row, last = self.rows.index(continuation), len(self.rows) - 1
        if row != last:
            self.cache.move_row(last, row)
            self.logits[row] = self.logits[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()
        self.cache.n_rows = len(self.rows)

    @torch.inference_mode()
    def step(self) -> list[Draw]:
        """Every row's next token; the rows that end leave; one forward of the rest."""
        draws = self._draw()
        for draw in draws:
            if draw.finish_reason is not None:
                self.leave(draw.continuation)
        if self.rows:
            self._forward()
        return draws

    def _prefill(self, ids: list[int], row: int | None = None) -> Tensor:
        """Run ids (a window) alone into a batch-1 cache, copy it into `row` (the next
        free one if None); the logits of its last position (V,)."""
        single = self.model.new_kv_cache(1, max_len=max(1, len(ids)))
        logits = None
        if ids:
            idx = torch.tensor([ids], dtype=torch.long, device=self.model.device)
            logits, _ = self.model(idx, kv_cache=single, last_only=True)  # (1, 1, V)
        self.cache.write_row(len(self.rows) if row is None else row, single)
        return None if logits is None else logits[0, -1]

    def _forward(self) -> None:
        """The logits after every row's newest token, in one forward pass."""
        for row, continuation in enumerate(self.rows):
            if self.learned and self.cache.lengths[row] == self.block_size:
                # generate's crop: the window restarts at the last block_size - stride
                # tokens, the newest of which the batched step below runs.
                keep = self.block_size - continuation.sampling.stride_for(self.block_size)
                continuation.tokens = continuation.tokens[-keep:]
                self._prefill(continuation.tokens[:-1], row)
            elif len(continuation.tokens) > 2 * self.block_size:  # a ring needs the newest only
                del continuation.tokens[: -self.block_size]
        newest = [continuation.tokens[-1] for continuation in self.rows]
        if self.static:
            self.logits[: len(newest)] = self._static_step(newest)[: len(newest)]
            return
        idx = torch.tensor(newest, dtype=torch.long, device=self.model.device)[:, None]  # (n, 1)
        logits, _ = self.model(idx, kv_cache=self.cache, last_only=True)  # (n, 1, V)
        self.logits[: len(self.rows)] = logits[:, -1]

    def _static_step(self, newest: list[int]) -> Tensor:
        """The static step over all max_batch rows, the idle ones given id 0: the
        logits (max_batch, V), of which the first len(newest) rows are the rows in use."""
        self.cache.sync()  # rows that joined, left, moved or were cropped since the last step
        idle = [0] * (self.max_batch - len(newest))
        self.ids.copy_(torch.tensor(newest + idle)[:, None])
        logits = self.run_step(self.model, self.cache, self.ids)  # (max_batch, V)
        self.cache.count_step()  # the host's count; the device's moved inside the step
        return logits

    @torch.inference_mode()
    def compile_step(self) -> float:
        """Compile the static step now, by one step over idle rows, so that no request
        pays for it; the seconds it took (about 0 if compiled already; 0 where the step
        is not compiled). Only an empty decoder may: the step writes each row's slot 0."""
        if not self.static or self.rows:
            raise MinigptError(
                "only an empty static decoder compiles its step ahead",
                hint="call compile_step before any continuation joins",
            )
        if self.run_step is decode_step:  # not compiled on this device: nothing to do ahead
            return 0.0
        started = time.perf_counter()
        with compile_errors():
            self._static_step([])
        return time.perf_counter() - started

    def _draw(self) -> list[Draw]:
        n = len(self.rows)
        logits = self.logits[:n, : self.vocab_limit]  # (n, V')
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        next_ids = logits.argmax(dim=-1)  # (n,): the greedy rows' draws
        for row, continuation in enumerate(self.rows):
            s = continuation.sampling
            if s.temperature > 0 and finite[row]:
                next_ids[row] = sample_next(
                    logits[row : row + 1], s.temperature, s.top_k, s.top_p, continuation.generator
                )[0]
        draws = []
        for row, (continuation, token_id) in enumerate(
            zip(self.rows, next_ids.tolist(), strict=True)
        ):
            draws.append(self._record(continuation, token_id, logits[row], finite[row]))
        return draws

    def _record(
        self, continuation: Continuation, token_id: int, logits: Tensor, finite: bool
    ) -> Draw:
        """Append a drawn token to its continuation: its text, its logprob, whether it ended."""
        if not finite:
            continuation.error = (
                "the model produced non-finite logits (NaN or inf): its weights are damaged"
            )
            return Draw(continuation, token_id, continuation.stream.finish(), None, "error")
        continuation.tokens.append(token_id)
        continuation.n_new += 1
        logprob = (
            _logprob(logits, token_id, continuation.logprobs) if continuation.logprobs else None
        )
        text = continuation.stream.push(token_id)
        ended = (
            continuation.stream.ended or continuation.n_new == continuation.sampling.max_new_tokens
        )
        if not ended:
            return Draw(continuation, token_id, text, logprob)
        text += continuation.stream.finish()
        reason = "length" if continuation.stream.sample.finish_reason == "length" else "stop"
        return Draw(continuation, token_id, text, logprob, reason)


def _logprob(logits: Tensor, token_id: int, top: int) -> TokenLogprob:
    """The token's log-softmax under logits (V,) and the `top` best (id, logprob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
    best = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), best)


# --- many prompts at once: generate --prompts-file -------------------------------------

MAX_BATCH = 64
"""Rows decoded at once by `generate_batch`: more prompts wait for a free row."""


def generate_batch(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    max_batch: int = MAX_BATCH,
    on_text: Callable[[int, str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    static: bool = False,
) -> list[GenerationResult]:
    """One continuation of each prompt, decoded as one batch; results in input order.

    Prompt i is drawn with seed sampling.seed + i, modulo 2**64 (so prompt 0 gives what
    `generate` gives alone with that seed). on_text(prompt_index, text) hears each piece of text
    as it becomes final; on_warning hears of a prompt cropped to block_size. static: run
    the rows' static step (`BatchDecoder`), compiled on a CPU: the same tokens.
    """
    if sampling.seed is None:
        sampling = replace(sampling, seed=new_seed())
    rows = min(max_batch, max(1, len(prompts)))
    decoder = BatchDecoder(model, rows, tokenizer.vocab_size, static=static)
    waiting = _continuations(decoder, tokenizer, prompts, sampling, on_warning)
    started = time.perf_counter()
    first_token: dict[int, float] = {}
    results: dict[int, GenerationResult] = {}
    while waiting or decoder.rows:
        check()  # a signal stops sampling between two steps
        while waiting and decoder.free:
            decoder.join(waiting.popleft())
        for draw in decoder.step():
            index, cropped = draw.continuation.owner
            first_token.setdefault(index, time.perf_counter() - started)
            if draw.text and on_text:
                on_text(index, draw.text)
            if draw.finish_reason == "error":
                raise MinigptError(draw.continuation.error, hint="load another checkpoint")
            if draw.finish_reason is not None:
                sample = draw.continuation.stream.sample
                results[index] = GenerationResult(
                    prompt_tokens=len(draw.continuation.prompt_ids),
                    samples=[sample],
                    seconds=time.perf_counter() - started,
                    first_token_seconds=first_token[index],
                    cropped_prompt_tokens=cropped,
                    settings=settings_json(model, draw.continuation.sampling),
                )
    return [results[index] for index in range(len(prompts))]


def compile_batch_step(model: GPT, n_prompts: int, max_batch: int = MAX_BATCH) -> float:
    """Compile the static step `generate_batch` runs for n_prompts now; the seconds."""
    rows = min(max_batch, max(1, n_prompts))
    return BatchDecoder(model, rows, static=True).compile_step()


def _continuations(
    decoder: BatchDecoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: Sampling,
    on_warning: Callable[[str], None] | None,
) -> deque[Continuation]:
    """Each prompt encoded (cropped to block_size) as a continuation waiting for a row,
    prompt i seeded with sampling.seed + i; owner: (i, tokens cropped)."""
    block_size = decoder.block_size
    waiting: deque[Continuation] = deque()
    for index, prompt in enumerate(prompts):
        try:
            ids, cropped = encode_prompt(tokenizer, prompt, block_size)
        except MinigptError as err:  # among many prompts, say which one
            raise MinigptError(
                f"prompt {index + 1}: {err}", hint=err.hint, param=err.param
            ) from None
        if cropped and on_warning:
            on_warning(
                f"prompt {index + 1} has {cropped + len(ids)} tokens, more than the model's"
                f" block_size={block_size}; only its last {len(ids)} are used"
            )
        seeded = replace(sampling, seed=(sampling.seed + index) % (MAX_SEED + 1), num_samples=1)
        waiting.append(decoder.continuation(tokenizer, ids, seeded, owner=(index, cropped)))
    return waiting
