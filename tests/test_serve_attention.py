"""The page's routes (minigpt.serve.page) in the server's app, without its scheduler:
the assets, and POST /api/attention against the model's own attention. The real
`minigpt serve` in a browser is tests/e2e/test_serve_page.py."""

import re
import tomllib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from minigpt.errors import MinigptError
from minigpt.heads import capture_attention, inspect_heads, repeated_probe
from minigpt.serve import page
from minigpt.serve.api import create_app

REPO = Path(__file__).resolve().parents[1]
KEY = "page-key"


@pytest.fixture(scope="module")
def client(tiny):
    """The server's app over the `tiny` model (block_size 32, 2 layers of 3 heads), with an
    API key; the page's routes never touch the scheduler, so there is none."""
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny", scheduler=None, api_key=KEY)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def ids_of(tokenizer, text):
    return tokenizer.encode(text)


# --------------------------------------------------------------------------- the assets


def test_the_page_and_its_assets_are_served_and_load_nothing_from_elsewhere(client):
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    linked = re.findall(r'(?:src|href)="([^"]+)"', index.text)
    assert sorted(linked) == ["/static/app.js", "/static/style.css"]
    for name, media in page.ASSETS.items():
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == media
        assert not re.search(r"https?://|//cdn|@import", response.text), name


@pytest.mark.parametrize(
    "path",
    [
        "/static/page.py",
        "/static/..%2Fpage.py",
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/static/../serve/page.py",
        "/static/",
        "/static/index.html%00.py",
        "/static/.%2Fapp.js",
    ],
)
def test_no_request_reads_a_file_off_the_list(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text and "[tool" not in response.text  # no file came back


def test_an_installed_wheel_ships_the_assets():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = declared["package-data"]["minigpt.serve"]
    static = REPO / "minigpt" / "serve" / "static"
    shipped = {p.name for pattern in patterns for p in static.glob(pattern.removeprefix("static/"))}
    assert shipped == set(page.ASSETS) == {p.name for p in static.iterdir()}


# --------------------------------------------------------------------------- attention


def test_attention_is_the_models_own_for_the_step_that_wrote_the_token(client, tiny):
    model, tokenizer = tiny
    ids = ids_of(tokenizer, "the cat sat on the mat")
    position = 9
    response = client.post("/api/attention", json={"token_ids": ids, "position": position})
    assert response.status_code == 200, response.text
    step = response.json()
    assert step["start"] == 0 and step["query"] == position - 1
    assert step["tokens"] == list("the cat s")
    want = capture_attention(model, torch.tensor([ids[:position]]))[0, :, :, -1]  # (L, H, T)
    got = torch.tensor(step["layers"])
    assert got.shape == (2, 3, position)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3), atol=1e-4, rtol=0)


def test_past_the_context_the_step_sees_its_last_block_size_tokens(client, tiny):
    model, tokenizer = tiny
    ids = ids_of(tokenizer, "abcdefghijklmnopqrstuvwxyz " * 2)  # 54 tokens, block_size 32
    position = 45
    step = client.post("/api/attention", json={"token_ids": ids, "position": position}).json()
    start = position - 32
    assert (step["start"], step["query"], len(step["tokens"])) == (start, 44, 32)
    want = capture_attention(model, torch.tensor([ids[start:position]]))[0, :, :, -1]
    torch.testing.assert_close(torch.tensor(step["layers"]), want, atol=1e-5, rtol=0)


def test_a_rotary_model_with_grouped_heads_gets_its_steps_attention(tiny_gpt):
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("abcdefgh ")
    model = tiny_gpt(tokenizer.vocab_size, position="rope", n_head=4, n_kv_head=2)
    app = create_app(model, tokenizer, "rope", scheduler=None)
    ids = tokenizer.encode("abcdefgh " * 3)  # 27 tokens, block_size 16
    with TestClient(app) as client:
        step = client.post("/api/attention", json={"token_ids": ids, "position": 25}).json()
    assert (step["start"], step["query"]) == (25 - 16, 24)
    want = capture_attention(model, torch.tensor([ids[9:25]]))[0, :, :, -1]
    torch.testing.assert_close(torch.tensor(step["layers"]), want, atol=1e-5, rtol=0)
    assert len(step["roles"]) == 2 and all(len(layer) == 4 for layer in step["roles"])


def test_heads_carry_inspect_heads_roles_measured_once(client, tiny, monkeypatch):
    model, tokenizer = tiny
    probes = list(repeated_probe(tokenizer, 16))
    inspection = inspect_heads(model, tokenizer, probes, repeated=16)
    want = [
        [None if h.role == "mixed" else h.role for h in inspection.heads[layer * 3 : layer * 3 + 3]]
        for layer in range(2)
    ]
    body = {"token_ids": ids_of(tokenizer, "hello"), "position": 2}
    assert client.post("/api/attention", json=body).json()["roles"] == want
    monkeypatch.setattr(page, "head_roles", lambda *args: pytest.fail("measured twice"))
    assert client.post("/api/attention", json=body).json()["roles"] == want


def test_a_context_too_short_for_the_probe_has_no_roles(tiny_gpt):
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("abc")
    assert page.head_roles(tiny_gpt(3, block_size=3), tokenizer) == [[None, None]] * 2


BAD = {
    "not JSON": (b"{token_ids", None),
    "a list": (b"[1, 2]", None),
    "no token_ids": (b'{"position": 1}', "token_ids"),
    "token_ids a string": (b'{"token_ids": "abc", "position": 1}', "token_ids"),
    "a float id": (b'{"token_ids": [1, 2.5], "position": 1}', "token_ids"),
    "a bool id": (b'{"token_ids": [1, true], "position": 1}', "token_ids"),
    "one id": (b'{"token_ids": [1], "position": 1}', "token_ids"),
    "a negative id": (b'{"token_ids": [1, -1], "position": 1}', "token_ids"),
    "an id past the vocabulary": (b'{"token_ids": [1, 28], "position": 1}', "token_ids"),
    "too many ids": (b'{"token_ids": [' + b"1," * 4096 + b'1], "position": 1}', "token_ids"),
    "no position": (b'{"token_ids": [1, 2]}', "position"),
    "position 0": (b'{"token_ids": [1, 2], "position": 0}', "position"),
    "position past the ids": (b'{"token_ids": [1, 2], "position": 2}', "position"),
    "position a string": (b'{"token_ids": [1, 2], "position": "1"}', "position"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_body_is_refused_naming_its_field(case):
    body, param = BAD[case]
    with pytest.raises(MinigptError) as refused:
        page.parse_attention_request(body, vocab_size=28, limit=page.max_token_ids(32))
    assert refused.value.param == param and str(refused.value)


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{token_ids", None),
        (b'{"token_ids": [1, 2], "position": 2}', "position"),
        (b'{"token_ids": [' + b" " * page.MAX_BODY_BYTES + b"1, 2]}", None),
    ],
    ids=["not JSON", "a bad position", "a huge body"],
)
def test_a_bad_body_gets_openais_error_object(client, body, param):
    response = client.post(
        "/api/attention", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]


def test_the_attention_needs_the_key_and_the_page_does_not(tiny):
    model, tokenizer = tiny
    with TestClient(create_app(model, tokenizer, "tiny", scheduler=None, api_key=KEY)) as bare:
        body = {"token_ids": [1, 2], "position": 1}
        assert bare.post("/api/attention", json=body).status_code == 401
        assert bare.get("/").status_code == 200 and bare.get("/static/app.js").status_code == 200
