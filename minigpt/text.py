"""Text as a sampler makes it: UTF-8-safe streaming, stop strings, and the result a
command prints.

Tokens arrive one at a time, and neither a token nor a piece of text is final when it
arrives: a token may hold half of a UTF-8 character (the tokenizer's stream decoder
holds it back), and the text may be the start of a stop string, which must not be
printed if the string completes. `SampleStream` gives out only what is final.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from minigpt.errors import MinigptError
from minigpt.tokenizer import Tokenizer


class StopStrings:
    """Cuts a stream of text before the first stop string, even one split across tokens.

    `push(text)` returns the text that is certain to be output and whether a stop
    string was hit; the tail that could still begin a stop string is held back
    until the next push (or `flush`).
    """

    def __init__(self, stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise MinigptError(
                "a stop string is empty", hint="give every stop string some text", param="stop"
            )
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


class SampleStream:
    """One sample's text as its tokens arrive: UTF-8-safe (the tokenizer's stream
    decoder holds back partial characters) and cut before a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stopper = StopStrings(stop)
        self.eot_id = tokenizer.eot_id
        self.sample = Sample()
        self.pieces: list[str] = []

    @property
    def ended(self) -> bool:
        """Whether the sample ended early (end-of-text or a stop string)."""
        return self.sample.finish_reason != "length"

    def push(self, token_id: int) -> str:
        """Take the sample's next token; return the text that became final ('' if none)."""
        self.sample.new_tokens += 1
        if token_id == self.eot_id:
            self.sample.finish_reason = "eot"
            return ""
        text, hit = self.stopper.push(self.decoder.push([token_id]))
        if hit:
            self.sample.finish_reason = "stop"
        self.pieces.append(text)
        return text

    def finish(self) -> str:
        """Release the text still held back once decoding is over; the sample is complete."""
        text = ""
        if self.sample.finish_reason != "stop":
            text, hit = self.stopper.push(self.decoder.flush())
            text += self.stopper.flush()
            if hit:
                self.sample.finish_reason = "stop"
        self.pieces.append(text)
        self.sample.text = "".join(self.pieces)
        return text


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
