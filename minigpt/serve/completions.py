"""`POST /v1/completions` in OpenAI's words: the request, checked; the scheduler's
events, turned into OpenAI's choices, chunks and logprobs objects.

    JSON body ──► CompletionRequest (types) ──► plan_completion (limits, Sampling)
        ──► Scheduler.submit ──► ChoiceEvents ──► Choices ──► one response, or SSE chunks

What is OpenAI's and what is ours: `top_k` is an extension, and `return_token_ids`
is vLLM's (each choice then carries `prompt_token_ids`, and `token_ids` for the
tokens it adds). OpenAI's parameters that this server cannot honour (penalties,
`logit_bias`, `best_of`, `suffix`) are accepted at their neutral values only and
refused otherwise, so no request is quietly answered as if it had asked something
else. Nothing here touches a file or runs the model; that is the scheduler's thread.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, field_validator

from minigpt.errors import MinigptError
from minigpt.sampling import Sampling

if TYPE_CHECKING:
    from minigpt.batching import TokenLogprob
    from minigpt.serve.scheduler import ChoiceEvent
    from minigpt.tokenizer import Tokenizer

MAX_CHOICES = 64
"""Choices one request may ask for (n times the prompts): more is a batch job, not a request."""
MAX_STOPS = 4
"""OpenAI's limit on stop strings."""
MAX_LOGPROBS = 5
"""OpenAI's limit on the most likely tokens reported per position."""
MAX_PROMPT_CHARS = 1_000_000
"""A prompt longer than this is refused before it is tokenised (tokenising it would hold
up the server, and no model here has a context that long)."""

LEAST_LOGPROB = -9999.0
"""The logprob reported for a token the model gives no chance (OpenAI's convention)."""

API_NAMES = {
    "max_new_tokens": "max_tokens",
    "num_samples": "n",
    "prompts": "prompt",
    "prompt_ids": "prompt",
}
"""The library's name of an argument -> the request field that sets it (MinigptError.param)."""


class ApiError(Exception):
    """An answer other than 200, as OpenAI writes it: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.code}}


def bad_request(err: MinigptError, param: str | None = None) -> ApiError:
    """A MinigptError (bad input, worded as the library names it) as a 400 naming the
    request's field."""
    message, hint = err.renamed(API_NAMES)
    text = f"{message}; {hint}" if hint else message
    return ApiError(400, text, param=API_NAMES.get(err.param or "", err.param) or param)


# --- the request ---------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    """A last chunk with no choices and the request's usage."""


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions. Types are strict (a string is no number) and
    unknown fields are refused, so a typo is named instead of ignored; `None` is a
    field's default, as OpenAI takes it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    user: str | None = None
    top_k: int | None = None
    """An extension: sample among the k most likely tokens."""
    return_token_ids: bool | None = False
    """vLLM's extension: the token ids of the prompt and of each choice."""
    # OpenAI's, honoured at their neutral values only (see plan_completion)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        """Token ids as a prompt (a list of ints, or of lists) are OpenAI's, not ours:
        say so rather than 'not a valid string'."""
        if isinstance(value, list) and any(isinstance(p, int | list) for p in value):
            raise ValueError(
                "a prompt given as token ids is not supported by this server: send text"
            )
        return value


EXPECTED = {
    "prompt": "a string or a list of strings",
    "stop": "a string or a list of strings",
    "model": "a string",
    "user": "a string",
    "suffix": "a string",
    "stream_options": 'an object such as {"include_usage": true}',
    "logit_bias": "an object of token ids to numbers",
}
"""What a field must be, where it is not a plain number or boolean."""


def validation_message(error: dict) -> tuple[str, str | None]:
    """One of pydantic's errors about the body -> (a sentence, the field at fault)."""
    loc = [str(part) for part in error.get("loc", ())][1:]  # without 'body'
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc or kind == "model_attributes_type":
        return (
            "the request body must be a JSON object, sent as Content-Type: application/json",
            None,
        )
    param = loc[0]
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"{param} is required", param
    if kind == "value_error":
        return str(error.get("msg", "")).removeprefix("Value error, "), param
    kinds = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}
    wanted = EXPECTED.get(param) or kinds.get(kind, "of another type")
    return f"{param} must be {wanted}, got {_shown(error.get('input'))}", param


def _shown(value: Any, limit: int = 40) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Plan:
    """A checked request: its prompts, choices per prompt, Sampling and what to report."""

    prompts: list[str]
    n: int
    sampling: Sampling
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    token_ids: bool


def plan_completion(request: CompletionRequest, model_id: str) -> Plan:
    """Check what pydantic cannot (the model, the limits, the neutral-only fields) and
    build the Sampling, whose own checks name the field at fault. Raises ApiError."""
    if request.model is not None and request.model != model_id:
        raise ApiError(
            404,
            f"the model {request.model!r} does not exist here: this server serves {model_id!r}",
            param="model",
            code="model_not_found",
        )
    _refuse_unsupported(request)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    n = 1 if request.n is None else request.n
    _check_counts(prompts, n, request)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    try:
        sampling = Sampling(
            max_new_tokens=16 if request.max_tokens is None else request.max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
            stop=stop,
        )
    except MinigptError as err:
        raise bad_request(err) from err
    options = request.stream_options
    return Plan(
        prompts=prompts,
        n=n,
        sampling=sampling,
        logprobs=request.logprobs,
        echo=bool(request.echo),
        stream=bool(request.stream),
        include_usage=bool(options and options.include_usage),
        token_ids=bool(request.return_token_ids),
    )


def _refuse_unsupported(request: CompletionRequest) -> None:
    """OpenAI's fields this server cannot honour, unless they ask for nothing."""
    neutral = {
        "presence_penalty": request.presence_penalty in (None, 0),
        "frequency_penalty": request.frequency_penalty in (None, 0),
        "best_of": request.best_of in (None, 1, request.n),
        "logit_bias": not request.logit_bias,
        "suffix": not request.suffix,
    }
    for param, ok in neutral.items():
        if not ok:
            raise ApiError(400, f"{param} is not supported by this server", param=param)
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream", param="stream_options")


def _check_counts(prompts: list[str], n: int, request: CompletionRequest) -> None:
    """The prompts, n, stop and logprobs within OpenAI's limits (and ours: MAX_CHOICES)."""
    if not prompts:
        raise ApiError(400, "prompt is an empty list: give at least one prompt", param="prompt")
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}", param="n")
    if n * len(prompts) > MAX_CHOICES:
        raise ApiError(
            400,
            f"{len(prompts)} prompt(s) x n={n} is {n * len(prompts)} choices, more than the"
            f" {MAX_CHOICES} one request may ask for",
            param="n" if n > 1 else "prompt",
        )
    longest = max(len(p) for p in prompts)
    if longest > MAX_PROMPT_CHARS:
        raise ApiError(
            400,
            f"a prompt has {longest:,} characters, more than the {MAX_PROMPT_CHARS:,} allowed",
            param="prompt",
        )
    if isinstance(request.stop, list) and len(request.stop) > MAX_STOPS:
        raise ApiError(
            400,
            f"stop has {len(request.stop)} strings, more than the {MAX_STOPS} allowed",
            param="stop",
        )
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise ApiError(
            400,
            f"logprobs must be from 0 to {MAX_LOGPROBS}, got {request.logprobs}",
            param="logprobs",
        )


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's ids, uncropped: the scheduler refuses or crops one past the
    context, and starts an empty one where a new document would."""
    try:
        return [tokenizer.encode_prompt(prompt) if prompt else [] for prompt in prompts]
    except MinigptError as err:
        raise bad_request(err, param="prompt") from err


# --- the answer ----------------------------------------------------------------------


@dataclass
class Choice:
    """One choice as it is answered: its text, tokens and logprobs so far, and where
    the next token's text starts in the choice's text (OpenAI's text_offset)."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    """The tokens it generated (never the echoed prompt's)."""
    logprobs: dict[str, list] | None = None
    offset: int = 0
    finish_reason: str | None = None


class Answer:
    """What one request has said so far: its choices, in OpenAI's order (prompt by
    prompt, n choices each), and the fields every response and chunk carries."""

    def __init__(
        self,
        plan: Plan,
        tokenizer: Tokenizer,
        model_id: str,
        prompt_ids: list[list[int]],
    ):
        self.plan, self.tokenizer = plan, tokenizer
        self.prompt_ids = prompt_ids
        self.head = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
        }
        self.choices = [Choice(i) for i in range(len(prompt_ids) * plan.n)]
        self.completion_tokens = 0

    def prompt_of(self, index: int) -> list[int]:
        """The ids of the prompt a choice continues."""
        return self.prompt_ids[index // self.plan.n]

    def echo(self, index: int, prompt_logprobs: Sequence[TokenLogprob | None]) -> dict:
        """The choice's first piece when echo is asked: its prompt (with the prompt's
        logprobs, the first null, when logprobs is asked too)."""
        text = self.plan.prompts[index // self.plan.n]
        return self._add(index, text, self.prompt_of(index), prompt_logprobs)

    def add(self, event: ChoiceEvent) -> dict:
        """An event of the scheduler -> the choice's piece, as a chunk's choice."""
        self.completion_tokens += len(event.token_ids)
        choice = self.choices[event.index]
        choice.token_ids.extend(event.token_ids)
        choice.finish_reason = event.finish_reason
        piece = self._add(event.index, event.text, event.token_ids, event.logprobs)
        if self.plan.token_ids:
            piece["token_ids"] = list(event.token_ids)
        return {**piece, "finish_reason": event.finish_reason}

    def _add(self, index: int, text: str, ids: list[int], logprobs: Sequence) -> dict:
        """The piece of a choice that says `text`, made of the tokens `ids`."""
        choice = self.choices[index]
        piece: dict[str, Any] = {"index": index, "text": text, "logprobs": None}
        if self.plan.logprobs is not None:
            piece["logprobs"] = self._logprobs(choice, ids, logprobs)
            _extend(choice, piece["logprobs"])
        if self.plan.token_ids:
            piece["token_ids"] = []
            if not choice.text:  # the choice's first piece names its prompt
                piece["prompt_token_ids"] = self.prompt_of(index)
        choice.text.append(text)
        piece["finish_reason"] = None
        return piece

    def _logprobs(self, choice: Choice, ids: list[int], logprobs: Sequence) -> dict:
        """OpenAI's logprobs object for these tokens: their texts, their logprobs, the
        most likely tokens at each position (and the chosen one), where each starts."""
        decode = self.tokenizer.decode
        tokens = [decode([i]) for i in ids]
        offsets = []
        for token in tokens:
            offsets.append(choice.offset)
            choice.offset += len(token)
        entries = list(logprobs) + [None] * (len(ids) - len(logprobs))
        tops: list[dict[str, float] | None] = []
        for token, entry in zip(tokens, entries, strict=True):
            if entry is None:
                tops.append(None)
                continue
            best = entry.top[: self.plan.logprobs]
            tops.append(
                {**{decode([i]): _finite(lp) for i, lp in best}, token: _finite(entry.logprob)}
            )
        return {
            "tokens": tokens,
            "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def chunk(self, piece: dict) -> dict:
        """A chunk of the stream: one choice's piece."""
        chunk = {**self.head, "choices": [piece]}
        if self.plan.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self) -> dict:
        prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt_tokens + self.completion_tokens,
        }

    def usage_chunk(self) -> dict:
        return {**self.head, "choices": [], "usage": self.usage()}

    def response(self) -> dict:
        """The whole answer, once every choice has finished (not streamed)."""
        choices = []
        for choice in self.choices:
            one: dict[str, Any] = {"index": choice.index, "text": "".join(choice.text)}
            one["logprobs"] = choice.logprobs
            one["finish_reason"] = choice.finish_reason
            if self.plan.token_ids:
                one["prompt_token_ids"] = self.prompt_of(choice.index)
                one["token_ids"] = choice.token_ids
            choices.append(one)
        return {**self.head, "choices": choices, "usage": self.usage()}


def _finite(logprob: float) -> float:
    """A logprob as JSON can hold it: a token the model gives no chance is -9999, as
    OpenAI writes it, not -inf (which is not JSON)."""
    return max(logprob, LEAST_LOGPROB) if logprob == logprob else LEAST_LOGPROB


def _extend(choice: Choice, logprobs: dict) -> None:
    """Add a piece's logprobs object to the choice's whole one."""
    if choice.logprobs is None:
        choice.logprobs = {key: [] for key in logprobs}
    for key, values in logprobs.items():
        choice.logprobs[key].extend(values)
