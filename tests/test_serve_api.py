"""The HTTP API over a real uvicorn server on loopback, spoken to by the official
`openai` client and by plain HTTP where the exact error object matters.

One server per module (a tiny learned-position model, an API key, the loopback Host
check), started in a thread on a free port; a second, rotary one for the prompt that
only a rolling cache can take.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"
MODEL_ID = "tiny"
CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
MAX_WAITING = 8
IDLE = {"status": "ok", "model": MODEL_ID, "running": 0, "waiting": 0}


def start_server(model, tokenizer, api_key=KEY, max_batch=4):
    """A served app in a thread: (base url, scheduler, stop function)."""
    from minigpt.serve.api import create_app
    from minigpt.serve.scheduler import Scheduler
    from minigpt.serve.server import LOOPBACK_NAMES, bind, make_server, url_of

    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_waiting=MAX_WAITING)
    app = create_app(model, tokenizer, MODEL_ID, scheduler, api_key, allowed_hosts=LOOPBACK_NAMES)
    sock = bind("127.0.0.1", 0)
    server = make_server(app, scheduler, sock)
    scheduler.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started

    def stop():
        server.should_exit = True
        thread.join(10)
        sock.close()

    return url_of(sock), scheduler, stop


@pytest.fixture(scope="module")
def tiny_model(tiny_gpt):
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(CHARS)
    return tiny_gpt(tokenizer.vocab_size, block_size=32), tokenizer


@pytest.fixture(scope="module")
def served(tiny_model):
    url, scheduler, stop = start_server(*tiny_model)
    yield url
    stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0)


def greedy(client, prompt="hello", max_tokens=12, **extra):
    return client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra
    )


# --- what the openai client gets -------------------------------------------------------


def test_a_greedy_completion_is_what_generate_writes(client, tiny_model):
    from minigpt.generate import generate_text

    model, tokenizer = tiny_model
    result = greedy(client, "hello", 12)
    alone = generate_text(model, tokenizer, "hello", temperature=0, max_new_tokens=12)
    choice = result.choices[0]
    assert choice.text == alone.samples[0].text
    assert (choice.index, choice.finish_reason) == (0, "length")
    assert result.object == "text_completion" and result.model == MODEL_ID
    assert result.id.startswith("cmpl-")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 12)
    assert result.usage.total_tokens == 17


def test_streamed_chunks_join_to_the_whole_answer(client):
    whole = greedy(client, "abc", 10).choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt="abc",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in pieces) == whole
    assert [c.choices[0].finish_reason for c in pieces][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in pieces[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_list_prompts_and_n_come_back_in_openais_order(client):
    result = client.completions.create(
        model=MODEL_ID, prompt=["ab", "cd"], n=2, max_tokens=6, temperature=0
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    texts = [c.text for c in result.choices]
    assert texts[0] == texts[1] == greedy(client, "ab", 6).choices[0].text
    assert texts[2] == texts[3] == greedy(client, "cd", 6).choices[0].text
    assert result.usage.prompt_tokens == 4 and result.usage.completion_tokens == 24


def test_a_seeded_request_repeats_and_its_choices_differ(client):
    def sample():
        result = client.completions.create(
            model=MODEL_ID, prompt="the", n=3, max_tokens=16, temperature=1.0, seed=7
        )
        return [c.text for c in result.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1  # each choice draws from its own seed


def test_a_stop_string_ends_the_choice_before_it(client):
    text = greedy(client, "hello", 16).choices[0].text
    stop = text[5:7]
    result = greedy(client, "hello", 16, stop=[stop, "zzzz"])
    assert result.choices[0].text == text[: text.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_logprobs_name_the_chosen_token_and_the_most_likely(client):
    result = greedy(client, "hello", 6, logprobs=3)
    logprobs = result.choices[0].logprobs
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert logprobs.text_offset == list(range(6))
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert logprob <= 0 and len(top) == 3
        assert top[token] == logprob == max(top.values())  # greedy: the best one


def test_echo_with_logprobs_scores_the_prompt_with_the_first_token_null(client):
    result = greedy(client, "hello", 4, logprobs=0, echo=True)
    choice = result.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith("hello") and len(choice.text) == 9
    assert logprobs.tokens[:5] == list("hello")
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])  # logprobs=0: the chosen
    assert logprobs.text_offset == list(range(9))


def test_echo_logprobs_are_those_of_the_model(client, tiny_model):
    import torch

    model, tokenizer = tiny_model
    ids = tokenizer.encode("hello")
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    expected = torch.log_softmax(logits[0, :-1], dim=-1)[range(4), ids[1:]].tolist()
    scored = greedy(client, "hello", 1, logprobs=1, echo=True).choices[0].logprobs
    assert scored.token_logprobs[1:5] == pytest.approx(expected, abs=1e-5)


def test_return_token_ids_gives_the_prompt_and_choice_ids(client, tiny_model):
    tokenizer = tiny_model[1]
    result = greedy(client, "hello", 5, extra_body={"return_token_ids": True})
    choice = result.choices[0].model_dump()
    assert choice["prompt_token_ids"] == tokenizer.encode("hello")
    assert tokenizer.decode(choice["token_ids"]) == choice["text"]


def test_a_stream_with_echo_logprobs_and_token_ids_adds_up_to_the_whole(http):
    body = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    body["return_token_ids"] = True
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    pieces = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert (
        pieces[0]["text"] == "hello" and pieces[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    )
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert sum((p["token_ids"] for p in pieces), []) == whole["token_ids"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert sum((p["logprobs"][key] for p in pieces), []) == whole["logprobs"][key]


def test_models_lists_and_retrieves_the_served_one(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_health_is_open_and_counts_the_rows(served):
    assert httpx.get(f"{served}/health").json() == IDLE


def test_a_rotary_model_takes_a_prompt_longer_than_its_context(tiny_gpt):
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(CHARS)
    model = tiny_gpt(tokenizer.vocab_size, block_size=16, position="rope")
    url, _, stop = start_server(model, tokenizer, api_key=None)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        result = greedy(client, "abcdefghij" * 3, 20)
        assert result.usage.prompt_tokens == 16  # the last block_size tokens
        assert result.usage.completion_tokens == 20
    finally:
        stop()


# --- errors: OpenAI's error object, never a traceback --------------------------------

BAD = [
    # (body, status, param, words in the message)
    ('{"prompt": "ab",', 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "JSON object"),
    ({"prompt": 3}, 400, "prompt", "string"),
    ({"prompt": "ab", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({"prompt": "ab", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be"),
    ({"prompt": "ab", "max_tokens": -3}, 400, "max_tokens", "max_tokens must be"),
    ({"prompt": "ab", "max_tokens": 10**9}, 400, "max_tokens", "max_tokens must be"),
    ({"prompt": "a" * 40}, 400, "prompt", "context of 32"),
    ({"prompt": "ab", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "more than the 4"),
    ({"prompt": "ab", "stop": ""}, 400, "stop", "empty"),
    ({"prompt": "ab", "logprobs": 6}, 400, "logprobs", "from 0 to 5"),
    ({"prompt": "ab", "temperature": -1}, 400, "temperature", "temperature must be"),
    ({"prompt": "ab", "top_p": 0}, 400, "top_p", "top_p must be"),
    ({"prompt": "ab", "top_k": 0}, 400, "top_k", "top_k must be"),
    ({"prompt": "ab", "seed": -1}, 400, "seed", "seed must be"),
    ({"prompt": []}, 400, "prompt", "empty list"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "token ids"),
    ({"prompt": [[1, 2]]}, 400, "prompt", "token ids"),
    ({"prompt": ["ab"] * 20, "n": 4}, 400, "n", "more than the 64"),
    ({"prompt": "ab", "n": 0}, 400, "n", "at least 1"),
    ({"prompt": "AB"}, 400, "prompt", "never saw"),
    ({"prompt": "ab", "max_token": 5}, 400, "max_token", "unrecognized"),
    ({"prompt": "ab", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"max_tokens": 5}, 400, "prompt", "required"),
    ({"prompt": "ab", "model": "gpt-4"}, 404, "model", "serves 'tiny'"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD)
def test_bad_input_gets_openais_error_object(http, body, status, param, words):
    if isinstance(body, str):
        response = http.post(
            "/v1/completions", content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"] and "Traceback" not in response.text
    if status == 404:
        assert error["code"] == "model_not_found"


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError) as refused:
        greedy(client, "ab", 0)
    assert refused.value.body["param"] == "max_tokens"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}]
)
def test_without_the_key_the_api_is_401_and_health_stays_open(served, headers):
    response = httpx.post(f"{served}/v1/completions", json={"prompt": "ab"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served}/v1/models", headers=headers).status_code == 401
    assert httpx.post(f"{served}/api/attention", headers=headers).status_code == 401
    assert httpx.get(f"{served}/health", headers=headers).status_code == 200


def test_a_host_that_is_not_loopback_is_refused(http):
    response = http.get("/health", headers={"Host": "evil.example:8000"})
    assert response.status_code == 400 and "Host" in response.json()["error"]["message"]
    assert http.get("/health", headers={"Host": "localhost:8000"}).status_code == 200


def test_a_request_past_the_waiting_line_gets_429_with_retry_after(http):
    response = http.post("/v1/completions", json={"prompt": "ab", "n": MAX_WAITING + 1})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_past_the_limit_is_413_before_it_is_read_whole(http, monkeypatch, chunked):
    import minigpt.serve.api

    monkeypatch.setattr(minigpt.serve.api, "MAX_BODY_BYTES", 1000)
    body = json.dumps({"prompt": "a" * 2000}).encode()
    content = iter([body[:600], body[600:]]) if chunked else body  # chunked: no length
    headers = {"Content-Type": "application/json"}
    response = http.post("/v1/completions", content=content, headers=headers)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_an_unknown_route_is_openais_404(http):
    response = http.get("/v1/chat")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def wait_until_idle(http, timeout=5.0) -> dict:
    """/health once no row runs (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while (health := http.get("/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return health


def test_a_client_that_disconnects_mid_stream_frees_its_row(http):
    body = {"prompt": "ab", "max_tokens": 100_000, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert http.get("/health").json()["running"] == 1
    assert wait_until_idle(http) == IDLE


def test_a_client_that_gives_up_waiting_for_a_whole_answer_frees_its_row(http):
    body = {"prompt": "ab", "max_tokens": 100_000}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=0.5)
    assert wait_until_idle(http) == IDLE


# --- in-process: a closed scheduler, a failure nobody expected -----------------------


def answer(app, body):
    """POST body to app in-process (no server): (status, JSON, or a stream's lines)."""

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/completions", json=body)
            if body.get("stream") and response.status_code == 200:
                return response.status_code, [line for line in response.text.split("\n") if line]
            return response.status_code, response.json()

    return asyncio.run(post())


def test_a_server_that_is_shutting_down_answers_503(tiny_model):
    from minigpt.serve.api import create_app
    from minigpt.serve.scheduler import Scheduler

    model, tokenizer = tiny_model
    scheduler = Scheduler(model, tokenizer, max_batch=1)
    scheduler.close(0)
    status, body = answer(create_app(model, tokenizer, MODEL_ID, scheduler), {"prompt": "ab"})
    assert status == 503 and body["error"]["code"] == "shutting_down"


def test_an_unexpected_failure_is_500_with_one_sentence(tiny_model, caplog):
    from minigpt.serve.api import create_app

    class Broken:
        running = waiting = 0

        def submit(self, *args, **kwargs):
            raise RuntimeError("a bug deep inside")

    model, tokenizer = tiny_model
    status, body = answer(create_app(model, tokenizer, MODEL_ID, Broken()), {"prompt": "ab"})
    assert status == 500
    assert body == {
        "error": {
            "message": "the server failed to answer",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "a bug deep inside" in caplog.text  # logged, not returned
    assert "a bug deep inside" not in json.dumps(body)


def test_a_model_that_writes_nan_is_a_500_or_an_error_ending_the_stream(tiny_gpt):
    import torch

    from minigpt.serve.api import create_app
    from minigpt.serve.scheduler import Scheduler
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(CHARS)
    model = tiny_gpt(tokenizer.vocab_size, block_size=32)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # the logit of token 0 is never a number
    scheduler = Scheduler(model, tokenizer, max_batch=2)
    scheduler.start()
    try:
        app = create_app(model, tokenizer, MODEL_ID, scheduler)
        status, body = answer(app, {"prompt": "ab"})
        assert status == 500 and "non-finite" in body["error"]["message"]
        status, lines = answer(app, {"prompt": "ab", "stream": True})
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert "non-finite" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
    finally:
        scheduler.close(0)


# --- serve with the compiled decode step ------------------------------------------------

SERVE_COMPILED = (
    "import sys; from minigpt.serve.server import serve;"
    " serve(sys.argv[1], port=0, device='cpu', max_batch=2, compile_step=True)"
)


def test_a_server_with_the_compiled_step_answers_what_generate_writes(tiny_model, tmp_path):
    from minigpt.checkpoint import write_run_files
    from minigpt.generate import generate_text

    model, tokenizer = tiny_model
    run_dir = write_run_files(tmp_path / MODEL_ID, model, tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "MINIGPT_API_KEY"}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_COMPILED, str(run_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(server.stdout.readline()), daemon=True).start()
    try:
        serving = re.fullmatch(r"serving tiny at (http://\S+)\n", lines.get(timeout=120))
        assert serving, "the server printed no serving line"
        body = {"prompt": "hello", "max_tokens": 40, "temperature": 0}  # past block_size=32
        answer = httpx.post(f"{serving.group(1)}/v1/completions", json=body, timeout=60).json()
    finally:
        server.kill()
        server.wait()
    alone = generate_text(model, tokenizer, "hello", temperature=0, max_new_tokens=40)
    assert answer["choices"][0]["text"] == alone.samples[0].text
    assert "compiled the decode step for 2 rows in" in server.stderr.read()
