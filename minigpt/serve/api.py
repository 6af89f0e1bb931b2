"""The HTTP API: OpenAI's `/v1/completions` and `/v1/models`, `/health`, and the page.

    request ──► guard (API key, Host) ──► route ──► plan ──► Scheduler.submit ──► Job
                                                              │
    response ◄── one JSON object, or SSE chunks ◄── Job.events() (the decode thread's)

The event loop never runs the model: the scheduler's thread decodes every request
in one batch, and the one forward an echo with logprobs needs runs in a worker
thread. Every answer other than 200 is OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`: bad JSON and every type or range
error are 400 naming the field (never FastAPI's 422 and its pydantic dump), a model
this server does not serve 404, a full queue 429 with Retry-After, a server that is
shutting down 503, and anything else 500 with one sentence (logged, never a
traceback). A client that leaves mid-answer cancels its job: its rows are freed at
the next step. Nothing here reads or writes a file.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from minigpt.batching import TokenLogprob
from minigpt.errors import MinigptError
from minigpt.serve.completions import (
    Answer,
    ApiError,
    CompletionRequest,
    Plan,
    bad_request,
    encode_prompts,
    plan_completion,
    validation_message,
)
from minigpt.serve.scheduler import QueueFull, ShuttingDown

if TYPE_CHECKING:
    from minigpt.model import GPT
    from minigpt.serve.scheduler import Job, Scheduler
    from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.serve")

PROTECTED = ("/v1", "/api")
"""Path prefixes that need the API key when the server has one; /health, / and the
page's files stay open."""
MAX_BODY_BYTES = 1 << 26
"""A request body larger than this (64 MiB: 64 prompts of a million characters) is
refused with 413 before it is read whole, so no client can fill the server's memory."""
RETRY_AFTER_S = 1
"""What a 429 tells the client to wait before trying again."""


def create_app(
    model: GPT,
    tokenizer: Tokenizer,
    model_id: str,
    scheduler: Scheduler,
    api_key: str | None = None,
    allowed_hosts: set[str] | None = None,
) -> FastAPI:
    """The server's app over a started (or soon started) scheduler.

    api_key: with it, /v1/* and /api/* need `Authorization: Bearer <api_key>`.
    allowed_hosts: the Host header names a request may carry (None: any), so that a web
    page cannot reach a server on loopback by rebinding its own name (DNS rebinding).
    """
    from minigpt.serve import page

    app = FastAPI(
        title="minigpt",
        docs_url=None,  # the interactive docs load scripts from a CDN
        redoc_url=None,
    )
    app.state.model, app.state.tokenizer = model, tokenizer
    app.state.model_id, app.state.scheduler = model_id, scheduler
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(MinigptError, _refused_input)
    _add_routes(app)
    app.include_router(page.router)
    return app


# --- errors --------------------------------------------------------------------------


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ApiError)
    return error_response(err)


async def _refused_input(request: Request, err: Exception) -> JSONResponse:
    """A route's bad input (a MinigptError, as the page's /api/attention raises): 400
    naming its field."""
    assert isinstance(err, MinigptError)
    return error_response(bad_request(err))


async def _invalid_request(request: Request, err: Exception) -> JSONResponse:
    """Bad JSON or a field of the wrong type: 400 naming the field, not FastAPI's 422."""
    assert isinstance(err, RequestValidationError)
    errors = err.errors()
    message, param = validation_message(errors[0]) if errors else ("bad request", None)
    return error_response(ApiError(400, message, param=param))


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    """Starlette's own answers (no such route, a method the route lacks) as OpenAI's."""
    assert isinstance(err, HTTPException)
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        err.status_code
    )
    message = f"{request.method} {request.url.path}: {err.detail}"
    headers = dict(err.headers or {})
    return error_response(ApiError(err.status_code, message, type=kind, code=code, headers=headers))


class Guard:
    """The ASGI middleware in front of every route: the Host check, the API key, and
    the last word on an exception nothing else caught (500, one sentence, logged)."""

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: set[str] | None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        started, received = False, 0

        async def send_noting_start(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def receive_at_most(limit: int = MAX_BODY_BYTES) -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a body sent without its length, or lying about it
                raise HTTPException(413, f"the request body is larger than {limit:,} bytes")
            return message

        try:
            await self.app(scope, receive_at_most, send_noting_start)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:  # else the client sees the stream end early
                failed = ApiError(500, "the server failed to answer", type="server_error")
                await error_response(failed)(scope, receive, send)

    def _refusal(self, scope: dict) -> ApiError | None:
        """Why a request is refused before any route sees it: a Host that is not this
        server's, a missing or wrong key, a body said to be too large; or None."""
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                return ApiError(400, f"the Host header {host!r} is not this server's")
        path = scope.get("path", "")
        protected = any(path == p or path.startswith(p + "/") for p in PROTECTED)
        if self.key is not None and protected and not self._has_key(headers):
            return ApiError(
                401,
                "a valid API key is required: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = headers.get("content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            message = f"the request body is larger than {MAX_BODY_BYTES:,} bytes"
            return ApiError(413, message, code="request_too_large")
        return None

    def _has_key(self, headers: dict[str, bytes]) -> bool:
        assert self.key is not None
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def _host_name(host: str) -> str:
    """A Host header without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _refused(err: Exception) -> ApiError:
    """What the scheduler refused a job for, as the answer a client gets."""
    if isinstance(err, QueueFull):
        return ApiError(
            429,
            str(err),
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(err, ShuttingDown):
        return ApiError(
            503, "the server is shutting down", type="server_error", code="shutting_down"
        )
    assert isinstance(err, MinigptError)
    return bad_request(err, param="prompt")


# --- routes --------------------------------------------------------------------------


def _add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> dict:
        state = request.app.state
        return {
            "status": "ok",
            "model": state.model_id,
            "running": state.scheduler.running,
            "waiting": state.scheduler.waiting,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return {"object": "list", "data": [_model_card(request)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        card = _model_card(request)
        if model_id != card["id"]:
            raise ApiError(
                404,
                f"the model {model_id!r} does not exist here: this server serves {card['id']!r}",
                param="model",
                code="model_not_found",
            )
        return card

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await complete(request, body)


def _model_card(request: Request) -> dict:
    state = request.app.state
    return {
        "id": state.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "minigpt",
        "max_model_len": state.model.config.block_size,
    }


async def complete(request: Request, body: CompletionRequest) -> Response:
    """POST /v1/completions: check, encode, submit; then stream the job's events or
    wait for them all."""
    state = request.app.state
    plan = plan_completion(body, state.model_id)
    prompt_ids = await run_in_threadpool(encode_prompts, state.tokenizer, plan.prompts)
    try:
        job = state.scheduler.submit(
            prompt_ids, plan.sampling, n=plan.n, logprobs=_asked_logprobs(plan)
        )
    except (QueueFull, ShuttingDown, MinigptError) as err:
        raise _refused(err) from err
    try:
        answer = Answer(plan, state.tokenizer, state.model_id, job.prompt_ids)
        echoed = await _echoes(state, plan, answer)
    except BaseException:
        job.cancel()
        raise
    if plan.stream:
        return EventStream(_chunks(job, answer, echoed), job)
    return await _whole_answer(request, job, answer, echoed)


def _asked_logprobs(plan: Plan) -> int:
    """The most likely tokens the scheduler reports per token: OpenAI's logprobs=0
    still wants the chosen token's logprob, which the scheduler gives with any top."""
    if plan.logprobs is None:
        return 0
    return max(1, plan.logprobs)


async def _echoes(state: Any, plan: Plan, answer: Answer) -> list[dict]:
    """Each choice's echoed prompt, as its first piece (none without echo)."""
    if not plan.echo:
        return []
    per_prompt: list[list[TokenLogprob | None]] = [[] for _ in answer.prompt_ids]
    if plan.logprobs is not None:
        top = _asked_logprobs(plan)
        vocab = state.tokenizer.vocab_size
        for i, ids in enumerate(answer.prompt_ids):
            per_prompt[i] = await run_in_threadpool(prompt_logprobs, state.model, ids, top, vocab)
    return [
        answer.echo(choice.index, per_prompt[choice.index // plan.n]) for choice in answer.choices
    ]


@torch.inference_mode()
def prompt_logprobs(
    model: GPT, ids: list[int], top: int, vocab_limit: int
) -> list[TokenLogprob | None]:
    """The logprob of each prompt token given those before it, from one forward of the
    prompt (for echo with logprobs): the first token has none. Run in a worker thread."""
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)  # (1, T)
    logits, _ = model(idx)  # (1, T, V)
    logprobs = torch.log_softmax(logits[0, :-1, :vocab_limit].float(), dim=-1)  # (T-1, V')
    chosen = logprobs.gather(-1, idx[0, 1:, None]).squeeze(-1).tolist()  # (T-1,)
    best, best_ids = logprobs.topk(min(top, vocab_limit), dim=-1)  # (T-1, top)
    entries: list[TokenLogprob | None] = [None]
    for token_id, logprob, values, top_ids in zip(
        ids[1:], chosen, best.tolist(), best_ids.tolist(), strict=True
    ):
        entries.append(TokenLogprob(token_id, logprob, list(zip(top_ids, values, strict=True))))
    return entries


# --- answering -----------------------------------------------------------------------


async def _chunks(job: Job, answer: Answer, echoed: list[dict]) -> AsyncIterator[str]:
    """The SSE stream: a chunk per piece of a choice, the usage if asked, then [DONE].
    A choice that fails ends the stream with an error object."""
    for piece in echoed:
        yield _event(answer.chunk(piece))
    async for event in job.events():
        if event.error is not None:
            failed = ApiError(500, event.error, type="server_error")
            yield _event(failed.body())
            break
        piece = answer.add(event)
        if _says_something(piece, answer.plan):
            yield _event(answer.chunk(piece))
    else:
        if answer.plan.include_usage:
            yield _event(answer.usage_chunk())
    yield "data: [DONE]\n\n"


def _says_something(piece: dict, plan: Plan) -> bool:
    """Whether a piece is worth a chunk: text, a finish, or tokens the client asked to see."""
    has_tokens = bool(piece.get("token_ids")) or bool(
        piece["logprobs"] and piece["logprobs"]["tokens"]
    )
    return bool(piece["text"]) or piece["finish_reason"] is not None or has_tokens


def _event(data: dict) -> str:
    import json

    return f"data: {json.dumps(data, allow_nan=False)}\n\n"


class EventStream(StreamingResponse):
    """A stream of server-sent events that cancels its job however it ends: finished
    (a no-op), cut by an error, or left by a client that disconnected."""

    def __init__(self, chunks: AsyncIterator[str], job: Job):
        super().__init__(chunks, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _whole_answer(request: Request, job: Job, answer: Answer, echoed: list[dict]) -> Response:
    """Wait for every event of the job, unless the client leaves first (then cancel it)."""
    collected = asyncio.ensure_future(_collect(job, answer))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collected.done():
            job.cancel()
            collected.cancel()
    if not collected.done() or collected.cancelled():
        return Response(status_code=499)  # nobody is there to read it
    error = collected.result()
    if error is not None:
        raise ApiError(500, error, type="server_error")
    return JSONResponse(answer.response())


async def _collect(job: Job, answer: Answer) -> str | None:
    """Add every event of the job to the answer; the first choice's error, or None."""
    async for event in job.events():
        if event.error is not None:
            job.cancel()
            return event.error
        answer.add(event)
    return None


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
