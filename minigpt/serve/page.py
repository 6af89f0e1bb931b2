"""The web page `minigpt serve` shows at `/`, and the one route it adds to the API: the
attention of the step that wrote a token.

The page (static/index.html, app.js, style.css: plain files, no build step, nothing
fetched from anywhere else) streams a completion from /v1/completions and shades each
token by its probability. Clicking a token asks POST /api/attention for the step that
wrote it:

    token p was drawn from the logits of position p-1, so that step's attention is
    row p-1 of every head's A (the query of position p-1) over the keys of its
    context: the last block_size tokens ending at p-1.

The weights are the model's own (`heads.capture_attention` on that window), and each
head is labelled with the role inspect-heads gives it (`heads.inspect_heads` on the
repeated random probe), measured once per app and kept on `app.state`.

A request never chooses a file: the assets are a fixed list, read from the package.
"""

from __future__ import annotations

import functools
import json
import threading
from importlib import resources

import fastapi
import torch
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from minigpt.errors import MinigptError
from minigpt.heads import REPEATED_PROBES, capture_attention, inspect_heads, repeated_probe
from minigpt.heads import token_labels as label_tokens
from minigpt.heads_run import MIN_PROBE
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer

router = fastapi.APIRouter()

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""Every file the page is made of, and its media type: the only files served."""

MAX_BODY_BYTES = 256 * 1024
"""The largest /api/attention body read; 4096 token ids take under 40 KB."""
MIN_MAX_TOKENS = 4096
"""The fewest token ids /api/attention takes, whatever the context: the page sends the
prompt and every token written after it, and offers at most 1024 new tokens."""
NO_ROLE = "mixed"
"""inspect-heads' word for a head that no rule matched: shown without a label."""


@functools.cache
def asset(name: str) -> bytes:
    """One file of the page, read from the package (an installed wheel ships them)."""
    return resources.files("minigpt.serve").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return Response(asset("index.html"), media_type=ASSETS["index.html"])


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    if name not in ASSETS:
        raise fastapi.HTTPException(404, "the page has no such file")
    return Response(asset(name), media_type=ASSETS[name])


# --------------------------------------------------------------------------- attention


@router.post("/api/attention")
async def attention(request: fastapi.Request) -> dict:
    """`{"token_ids": [...], "position": p}` -> the attention of the step that wrote
    token p (see `step_attention`); a bad body is a MinigptError (400)."""
    state = request.app.state
    body = await read_body(request, MAX_BODY_BYTES)
    ids, position = parse_attention_request(
        body, state.tokenizer.vocab_size, max_token_ids(state.model.config.block_size)
    )
    roles = await run_in_threadpool(app_head_roles, state)
    return await run_in_threadpool(
        step_attention, state.model, state.tokenizer, ids, position, roles
    )


async def read_body(request: fastapi.Request, limit: int) -> bytes:
    """The request body, refused once it passes `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> MinigptError:
    return MinigptError(
        f"the request body is larger than {limit // 1024} KB",
        hint="send the token ids of one completion",
    )


def max_token_ids(block_size: int) -> int:
    """How many token ids /api/attention takes for a model of this context."""
    return max(4 * block_size, MIN_MAX_TOKENS)


def parse_attention_request(body: bytes, vocab_size: int, limit: int) -> tuple[list[int], int]:
    """(token_ids, position) of an /api/attention body, or a MinigptError naming the field."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MinigptError(
            "the request body is not valid JSON",
            hint='send {"token_ids": [...], "position": p}',
        ) from err
    if not isinstance(request, dict):
        raise MinigptError(
            "the request body must be a JSON object",
            hint='send {"token_ids": [...], "position": p}',
        )
    ids = request.get("token_ids")
    if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
        raise MinigptError(
            "token_ids must be a list of integers",
            hint="send the prompt's token ids followed by the generated ones",
            param="token_ids",
        )
    if not 2 <= len(ids) <= limit:
        raise MinigptError(
            f"token_ids must hold from 2 to {limit} ids, got {len(ids)}",
            hint="send the ids up to the clicked token",
            param="token_ids",
        )
    if not all(0 <= i < vocab_size for i in ids):
        raise MinigptError(
            f"token_ids must be ids of this model's vocabulary, from 0 to {vocab_size - 1}",
            hint="send ids the server returned",
            param="token_ids",
        )
    position = request.get("position")
    if not _is_int(position) or not 1 <= position < len(ids):
        raise MinigptError(
            f"position must be an integer from 1 to {len(ids) - 1}, got {position!r:.40}",
            hint="the index in token_ids of a token the model wrote after another",
            param="position",
        )
    return ids, position


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def step_attention(
    model: GPT, tokenizer: Tokenizer, ids: list[int], position: int, roles: list
) -> dict:
    """The attention of the step that wrote ids[position], for every layer and head.

    Its query is position q = position - 1, over the keys of its context, the last
    block_size tokens ending at q: positions start..q. Returns {"tokens": the keys'
    labels, "start", "query": q, "layers": [layer][head] -> the weights of keys
    start..q (each list sums to 1), "roles": [layer][head] -> role or None}.
    """
    query = position - 1
    start = max(0, query + 1 - model.config.block_size)
    window = ids[start : query + 1]
    with torch.inference_mode():
        idx = torch.tensor([window], dtype=torch.long, device=model.device)
        A = capture_attention(model, idx)[0, :, :, -1, :].cpu()  # (L, H, T): the last row
    layers = [[[round(w, 6) for w in head] for head in layer] for layer in A.tolist()]
    return {
        "tokens": label_tokens(tokenizer, window),
        "start": start,
        "query": query,
        "layers": layers,
        "roles": roles,
    }


# --------------------------------------------------------------------------- roles

_roles_lock = threading.Lock()


def app_head_roles(state) -> list[list[str | None]]:
    """The heads' roles, measured on first use and kept on the app's state."""
    with _roles_lock:
        roles = getattr(state, "head_roles", None)
        if roles is None:
            roles = state.head_roles = head_roles(state.model, state.tokenizer)
    return roles


def head_roles(model: GPT, tokenizer: Tokenizer) -> list[list[str | None]]:
    """[layer][head] -> the role inspect-heads gives the head, or None where none is known.

    As `minigpt inspect-heads` does by default: the repeated random probe of half-length
    min(32, block_size // 2), no importance (roles do not use it). A head no rule matches
    ("mixed"), or every head of a model whose context is too short for the probe, is None.
    """
    L, H = model.config.n_layer, model.config.n_head
    n = min(32, model.config.block_size // 2)
    if n < MIN_PROBE:
        return [[None] * H for _ in range(L)]
    with torch.inference_mode():
        probes = list(repeated_probe(tokenizer, n, REPEATED_PROBES))
        inspection = inspect_heads(model, tokenizer, probes, repeated=n)
    roles = [[inspection.head(layer, head).role for head in range(H)] for layer in range(L)]
    return [[None if role == NO_ROLE else role for role in layer] for layer in roles]
