"""Sampling from a GPT: prefill the prompt once, then decode one position at a time.

    prompt ids ──► prefill (one forward, batch 1) ──► KV cache (broadcast to B samples)
                                                      │
        ┌──────────────── one new position per step ◄─┘
        ▼
    logits (B, V) ─► top-k ─► / temperature ─► top-p ─► draw (seeded) ─► next ids (B,)
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
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from minigpt.data import read_prompt_file
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer

MAX_NEW_TOKENS = 1_000_000
"""More new tokens than this in one call is a typo, not a request."""
MAX_NUM_SAMPLES = 1024


# --- checking what the user asked for -----------------------------------------------


def check_sampling(
    temperature: float, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Raise MinigptError for sampling settings that mean nothing."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or temperature < 0:
        raise MinigptError(
            f"--temperature must be a finite number >= 0, got {temperature}",
            hint="use 0 for greedy decoding, 0.7-1.0 for varied text",
        )
    if top_k is not None and top_k < 1:
        raise MinigptError(
            f"--top-k must be at least 1, got {top_k}",
            hint="top-k 1 is greedy; leave it out to sample from the whole vocabulary",
        )
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise MinigptError(
            f"--top-p must be in (0, 1], got {top_p}",
            hint="0.9 keeps the smallest set of tokens holding 90% of the probability; 1 disables it",
        )


def check_lengths(max_new_tokens: int, num_samples: int = 1) -> None:
    """Raise MinigptError for a negative or absurd number of tokens or samples."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise MinigptError(
            f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS:,}, got {max_new_tokens}",
            hint="ask for a few hundred tokens, e.g. --max-new-tokens 500",
        )
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise MinigptError(
            f"--num-samples must be between 1 and {MAX_NUM_SAMPLES}, got {num_samples}",
            hint="samples are generated as one batch; a handful is plenty",
        )


def default_stride(block_size: int) -> int:
    """Free cache slots after a crop: a quarter of the context (nanoGPT-sized models: 64)."""
    return block_size // 4


# --- the prompt ----------------------------------------------------------------------


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What generation starts from without a prompt: end-of-text, or a newline for `char`."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n")
    except MinigptError:
        return [0]  # a corpus without newlines: start from its first character


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> tuple[list[int], int]:
    """Prompt text -> (ids of at most block_size tokens, how many leading tokens were cropped)."""
    ids = tokenizer.encode(prompt) if prompt else start_ids(tokenizer)
    if not ids:
        ids = start_ids(tokenizer)
    cropped = max(0, len(ids) - block_size)
    return ids[cropped:], cropped


# --- one sampling step ---------------------------------------------------------------


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Logits at the last position (B, V) -> next token ids (B,).

    Order: top-k (exactly k, clamped to V) -> temperature -> top-p -> a draw from
    `generator`. Temperature 0 is argmax whatever top-k and top-p say.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    vocab_size = logits.size(-1)
    if top_k is not None and top_k < vocab_size:
        # topk keeps exactly k even when logits tie at the threshold, already sorted.
        candidates, candidate_ids = torch.topk(logits, top_k, dim=-1)  # (B, k), (B, k)
    elif top_p is not None and top_p < 1.0:
        candidates, candidate_ids = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    candidates = candidates / temperature
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(candidates, dim=-1)  # (B, k), sorted descending
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the
        # tokens before it already hold top_p. The first token is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        candidates = candidates.masked_fill(mass_before >= top_p, float("-inf"))
    probs = torch.softmax(candidates, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into candidates
    return candidate_ids.gather(-1, choice).squeeze(-1)


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
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
    stride: int | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids (num_samples,) of every sample, one step at a time.

    prompt_ids: at most block_size ids (see `encode_prompt`); every sample continues it.
    use_kv_cache=False recomputes the whole window at every step: same tokens, slower.
    stride: free cache slots after a crop at context overflow (default block_size // 4).
    Stop consuming the iterator to stop early; nothing is computed ahead.
    """
    block_size = model.config.block_size
    stride = default_stride(block_size) if stride is None else stride
    check_lengths(max_new_tokens, num_samples)
    check_sampling(temperature, top_k, top_p)
    if not 0 <= stride < block_size:
        raise MinigptError(
            f"stride must be in [0, block_size={block_size}), got {stride}",
            hint="0 crops the context at every step; block_size // 4 is the default",
        )
    if not 1 <= len(prompt_ids) <= block_size:
        raise MinigptError(
            f"the prompt must hold 1 to block_size={block_size} tokens, got {len(prompt_ids)}",
            hint="crop it with encode_prompt",
        )
    return _decode(
        model, list(prompt_ids), max_new_tokens, num_samples, temperature, top_k, top_p,
        generator, use_kv_cache, stride,
    )  # fmt: skip


@torch.inference_mode()
def _decode(
    model, prompt_ids, max_new_tokens, num_samples, temperature, top_k, top_p,
    generator, use_kv_cache, stride,
):  # fmt: skip
    # (inference_mode wraps each resume of this generator, not the caller's code.)
    block_size = model.config.block_size
    device = model.device
    n = len(prompt_ids)
    # Token history: a window never reaches back more than block_size tokens, so keep
    # at most 2 x block_size and slide the last block_size to the front when it is full.
    width = min(n + max_new_tokens, 2 * block_size)
    tokens = torch.empty((num_samples, width), dtype=torch.long, device=device)  # (B, width)
    tokens[:, :n] = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    start = 0  # the window the model sees is tokens[:, start:n]

    # The prompt is the same for every sample: one forward at batch 1.
    if use_kv_cache:
        kv_cache = model.new_kv_cache(num_samples)
        logits = _shared_prefill(model, tokens[:1, :n], kv_cache)
    else:
        logits, _ = model(tokens[:1, :n], last_only=True)
    logits = logits[:, -1, :].expand(num_samples, -1)  # (B, V)

    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if n == width:
            tokens[:, :block_size] = tokens[:, n - block_size : n].clone()
            start, n = start - (n - block_size), block_size
        tokens[:, n] = next_ids
        n += 1
        yield next_ids
        if step == max_new_tokens - 1:
            break  # no logits needed after the last token
        new_start = window_start(n, start, block_size, stride)
        if not use_kv_cache:
            logits, _ = model(tokens[:, new_start:n], last_only=True)
        elif new_start != start:
            # The cache holds block_size positions: crop, prefill the window again.
            kv_cache.reset()
            logits, _ = model(tokens[:, new_start:n], kv_cache=kv_cache, last_only=True)
        else:
            logits, _ = model(tokens[:, n - 1 : n], kv_cache=kv_cache, last_only=True)
        start = new_start
        logits = logits[:, -1, :]  # (B, V)


def _shared_prefill(model: GPT, prompt: Tensor, kv_cache) -> Tensor:
    """Run the prompt (1, T) once and copy its keys/values into every row of kv_cache."""
    T = prompt.size(1)
    if kv_cache.batch_size == 1:
        logits, _ = model(prompt, kv_cache=kv_cache, last_only=True)
        return logits
    single = model.new_kv_cache(1, max_len=T)
    logits, _ = model(prompt, kv_cache=single, last_only=True)  # (1, 1, V)
    for layer in range(len(single.keys)):
        kv_cache.keys[layer][:, :, :T] = single.keys[layer]  # broadcast (1, H, T, d) -> (B, ...)
        kv_cache.values[layer][:, :, :T] = single.values[layer]
    kv_cache.advance(T)
    return logits


# --- text: streaming and stop strings ------------------------------------------------


class StopStrings:
    """Cuts a stream of text before the first stop string, even one split across tokens.

    `push(text)` returns the text that is certain to be output and whether a stop
    string was hit; the tail that could still begin a stop string is held back
    until the next push (or `flush`).
    """

    def __init__(self, stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise MinigptError("a stop string is empty", hint="pass --stop with some text")
        self.stops = list(stops)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out, True
        keep = self._held_back()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string."""
        for size in range(min(len(self.pending), max(map(len, self.stops)) - 1), 0, -1):
            tail = self.pending[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0


@dataclass
class Sample:
    """One generated continuation."""

    text: str = ""
    new_tokens: int = 0
    finish_reason: str = "length"
    """'length' (max_new_tokens reached), 'stop' (a stop string) or 'eot' (end-of-text)."""


@dataclass
class GenerationResult:
    prompt_tokens: int
    samples: list[Sample]
    seconds: float
    """Wall time of prefill + decode."""
    first_token_seconds: float
    """Time to the first new token: the prefill plus one sampling step."""
    cropped_prompt_tokens: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(s.new_tokens for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cropped_prompt_tokens": self.cropped_prompt_tokens,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 6),
            "first_token_seconds": round(self.first_token_seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "settings": self.settings,
            "samples": [
                {"text": s.text, "new_tokens": s.new_tokens, "finish_reason": s.finish_reason}
                for s in self.samples
            ],
        }


def new_seed() -> int:
    """A fresh seed for when the user gave none; it is reported so the run can be repeated."""
    return int.from_bytes(os.urandom(4), "little")


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "",
    *,
    max_new_tokens: int = 500,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    use_kv_cache: bool = True,
    stride: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate num_samples continuations of `prompt` as text.

    on_text(sample_index, text) is called with each piece of a sample's text as soon
    as it is final: UTF-8-safe (the tokenizer's stream decoder holds back partial
    characters) and stop-safe (text that could begin a stop string is held back).
    A sample ends at a stop string (excluded from its text), at end-of-text, or at
    max_new_tokens; generation ends when every sample has. on_warning(message) hears
    of a prompt cropped to block_size before generation starts.
    """
    check_lengths(max_new_tokens, num_samples)
    check_sampling(temperature, top_k, top_p)
    stoppers = [StopStrings(stop) for _ in range(num_samples)]
    block_size = model.config.block_size
    prompt_ids, cropped = encode_prompt(tokenizer, prompt, block_size)
    if cropped and on_warning:
        on_warning(
            f"the prompt has {cropped + len(prompt_ids)} tokens, more than the model's "
            f"block_size={block_size}; only its last {block_size} tokens are used"
        )
    seed = new_seed() if seed is None else seed
    device = model.device
    rng = torch.Generator(device=device).manual_seed(seed)
    decoders = [tokenizer.stream_decoder() for _ in range(num_samples)]
    samples = [Sample() for _ in range(num_samples)]
    pieces: list[list[str]] = [[] for _ in range(num_samples)]
    emit = on_text or (lambda i, text: None)
    eot_id = tokenizer.eot_id

    def output(i: int, text: str) -> None:
        if text:
            pieces[i].append(text)
            emit(i, text)

    t0 = time.perf_counter()
    first_token_seconds = 0.0
    steps = generate(
        model, prompt_ids, max_new_tokens, num_samples=num_samples, temperature=temperature,
        top_k=top_k, top_p=top_p, generator=rng, use_kv_cache=use_kv_cache, stride=stride,
    )  # fmt: skip
    active = set(range(num_samples))
    for step, next_ids in enumerate(steps):
        ids = next_ids.tolist()
        if step == 0:
            first_token_seconds = time.perf_counter() - t0
        for i in sorted(active):
            samples[i].new_tokens += 1
            if ids[i] == eot_id:
                samples[i].finish_reason = "eot"
                active.discard(i)
                continue
            text, hit = stoppers[i].push(decoders[i].push([ids[i]]))
            output(i, text)
            if hit:
                samples[i].finish_reason = "stop"
                active.discard(i)
        if not active:
            break
    steps.close()
    seconds = time.perf_counter() - t0
    for i in range(num_samples):
        if samples[i].finish_reason != "stop":
            text, hit = stoppers[i].push(decoders[i].flush())
            output(i, text + stoppers[i].flush())
            if hit:
                samples[i].finish_reason = "stop"
        samples[i].text = "".join(pieces[i])
    return GenerationResult(
        prompt_tokens=len(prompt_ids),
        samples=samples,
        seconds=seconds,
        first_token_seconds=first_token_seconds,
        cropped_prompt_tokens=cropped,
        settings={
            "max_new_tokens": max_new_tokens,
            "num_samples": num_samples,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "stop": list(stop),
            "kv_cache": use_kv_cache,
            "stride": default_stride(block_size) if stride is None else stride,
            "device": str(device),
        },
    )


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from --prompt or --prompt-file (not both); '' when neither is given."""
    if prompt is not None and prompt_file is not None:
        raise MinigptError(
            "--prompt and --prompt-file were both given", hint="pass the prompt one way"
        )
    if prompt_file is None:
        return prompt or ""
    text = read_prompt_file(prompt_file)
    if not text:
        raise MinigptError(
            f"prompt file {prompt_file} is empty",
            hint="put some text in it, or leave out --prompt-file to start from scratch",
        )
    return text


def stats_line(result: GenerationResult) -> str:
    """The one line of numbers printed on stderr after generating."""
    settings = result.settings
    return (
        f"prompt tokens: {result.prompt_tokens}, new tokens: {result.new_tokens}"
        f" ({settings['num_samples']} sample{'s' if settings['num_samples'] > 1 else ''}),"
        f" {result.tokens_per_second:.1f} tokens/s in {result.seconds:.2f} s"
        f" (first token {1000 * result.first_token_seconds:.0f} ms,"
        f" kv cache {'on' if settings['kv_cache'] else 'off'}, {settings['device']},"
        f" seed {settings['seed']})"
    )


SAMPLE_SEPARATOR = "\n---------------\n"


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads. Decoding a small model is a chain of tiny matmuls: on a
    machine whose cores are busy, threads wait for each other far longer than they work."""
    if threads is None:
        return
    if not 1 <= threads <= 1024:
        raise MinigptError(
            f"--threads must be between 1 and 1024, got {threads}",
            hint="use 1 on a busy machine, or leave it out",
        )
    torch.set_num_threads(threads)
