"""The settings of a generation, and one draw from the model's logits.

`Sampling` is what the user asked for (how many tokens and samples, temperature,
top-k, top-p, seed, stop strings, how the cache is used), refused at construction
when it means nothing, so the decode loop (`minigpt.generate`) never checks it.
`sample_next` turns the logits of the last position into the next ids.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from minigpt.errors import MinigptError
from minigpt.text import StopStrings

MAX_NEW_TOKENS = 1_000_000
"""More new tokens than this in one call is a typo, not a request."""
MAX_NUM_SAMPLES = 1024
MAX_SEED = 2**64 - 1
"""torch's generators take seeds in [0, 2**64)."""


# --- what the user asked for -----------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """The settings of one generation, refused at construction when they mean nothing.

    max_new_tokens: new tokens per sample; num_samples: samples, decoded as one batch.
    temperature 0 is greedy; top_k / top_p (None: off) narrow the draw (see sample_next).
    seed: of the draws (None: a fresh one, reported in the result); stop: strings a
    sample ends before; use_kv_cache=False recomputes every step (same tokens, slower);
    stride: free cache slots after a crop at context overflow (None: block_size // 4).
    static_decode: decode with the static-shape step of `minigpt.fast_decode`: on CUDA it
    is captured once as a CUDA graph and replayed every step; on a CPU it is compiled
    by inductor; elsewhere it runs as it is. The same tokens as the eager steps (tests
    hold it).
    """

    max_new_tokens: int = 500
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    use_kv_cache: bool = True
    stride: int | None = None
    static_decode: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise MinigptError(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS:,},"
                f" got {self.max_new_tokens}",
                hint="ask for a few hundred tokens, e.g. max_new_tokens 500",
                param="max_new_tokens",
            )
        if not 1 <= self.num_samples <= MAX_NUM_SAMPLES:
            raise MinigptError(
                f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, got {self.num_samples}",
                hint="samples are generated as one batch; a handful is plenty",
                param="num_samples",
            )
        finite = isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
        if not finite or self.temperature < 0:
            raise MinigptError(
                f"temperature must be a finite number >= 0, got {self.temperature}",
                hint="use 0 for greedy decoding, 0.7-1.0 for varied text",
                param="temperature",
            )
        if self.top_k is not None and self.top_k < 1:
            raise MinigptError(
                f"top_k must be at least 1, got {self.top_k}",
                hint="top_k 1 is greedy; leave it out to sample from the whole vocabulary",
                param="top_k",
            )
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise MinigptError(
                f"top_p must be in (0, 1], got {self.top_p}",
                hint="0.9 keeps the smallest set of tokens holding 90% of the probability;"
                " 1 disables it",
                param="top_p",
            )
        StopStrings(self.stop)  # refuses an empty stop string
        check_seed(self.seed)
        if self.static_decode and not self.use_kv_cache:
            raise MinigptError(
                "static_decode (a static-shape step) writes into the KV cache, which is turned off",
                hint="turn the KV cache on, or static_decode off",
                param="static_decode",
            )
        if self.stride is not None and self.stride < 0:
            raise MinigptError(
                f"stride must be at least 0, got {self.stride}",
                hint="0 crops the context at every step; leave it out for block_size // 4",
                param="stride",
            )

    def stride_for(self, block_size: int) -> int:
        """The stride this generation uses with a model of this block_size."""
        return default_stride(block_size) if self.stride is None else self.stride

    def to_json(self, block_size: int) -> dict:
        """The settings as reported with a result (the stride resolved for block_size)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "num_samples": self.num_samples,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
            "kv_cache": self.use_kv_cache,
            "stride": self.stride_for(block_size),
            "static_decode": self.static_decode,
        }


def with_settings(sampling: Sampling | None, settings: dict[str, Any]) -> Sampling:
    """`sampling` (default: `Sampling()`) with the keyword settings in place of its own."""
    if sampling is None:
        return Sampling(**settings)
    return replace(sampling, **settings) if settings else sampling


def default_stride(block_size: int) -> int:
    """Free cache slots after a crop: a quarter of the context."""
    return block_size // 4


def check_seed(seed: int | None) -> None:
    """A seed is None (a fresh one) or an integer torch's generators take."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise MinigptError(
            f"seed must be an integer from 0 to 2**64 - 1 = {MAX_SEED}, got {seed}",
            hint="any number in that range repeats a generation; leave it out for a fresh one",
            param="seed",
        )


def new_seed() -> int:
    """A fresh seed for when the user gave none; it is reported so the run can be repeated."""
    return int.from_bytes(os.urandom(4), "little")


# --- one sampling step ---------------------------------------------------------------


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> Tensor:
    """Logits at the last position (B, V) -> next token ids (B,).

    Order: top-k (exactly k, clamped to V) -> temperature -> top-p -> a draw from
    `generator`. Temperature 0 is argmax whatever top-k and top-p say.
    vocab_limit: only ids below it are ever drawn (a model's vocabulary padded past
    its tokenizer's has rows for ids the tokenizer cannot decode); None: all V.
    """
    logits = logits[..., :vocab_limit]  # (B, V'): the ids beyond are never candidates
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
        candidates, candidate_ids = logits, None  # (B, V), the ids are the positions
    candidates = over_temperature(candidates, temperature)
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(candidates, dim=-1)  # (B, k), sorted descending
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the
        # tokens before it already hold top_p. The first token is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        candidates = candidates.masked_fill(mass_before >= top_p, float("-inf"))
    probs = torch.softmax(candidates, dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into candidates
    if candidate_ids is None:
        return choice.squeeze(-1)
    return candidate_ids.gather(-1, choice).squeeze(-1)


def over_temperature(logits: Tensor, temperature: float) -> Tensor:
    """(logits - their max) / temperature, row by row: the same softmax as logits /
    temperature, but finite or -inf for any temperature > 0.

    Dividing first overflows: logits / 1e-40 is +inf, and softmax of +inf is NaN.
    Shifted, the top logit is 0 and the rest negative, so a tiny temperature sends
    them to -inf: the draw becomes the argmax, which is what such a temperature means.
    The top logit stays 0 even when the temperature underflows to 0 in float32 (0 / 0).
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), <= 0
    return torch.where(shifted == 0, shifted, shifted / temperature)
