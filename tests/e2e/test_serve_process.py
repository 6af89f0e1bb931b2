"""`minigpt serve` as a user runs it: a process that prints one line and serves, ends
with 143 on SIGTERM within seconds (a stream in flight ends), warns when it can be
reached from other machines without a key, and refuses a port in use or a missing
`serve` extra in one sentence with exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
EXIT_WITHIN_S = 8  # the grace the server gives requests in flight, and its way out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt):
    """A tiny run directory (untrained weights: these tests are about the process)."""
    from minigpt.checkpoint import write_run_files
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    model = tiny_gpt(tokenizer.vocab_size, block_size=32)
    return write_run_files(tmp_path_factory.mktemp("serve") / "tiny", model, tokenizer)


def env() -> dict[str, str]:
    """This checkout's minigpt, one thread, and no API key from the caller's environment."""
    return {
        **{k: v for k, v in os.environ.items() if k != "MINIGPT_API_KEY"},
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def servers(run_dir, serving):
    """The module's servers, started at once (importing torch is most of their start)."""
    return {
        "loopback": serving(run_dir, "--device", "cpu"),
        "every interface": serving(run_dir, "--device", "cpu", "--host", "0.0.0.0"),
    }


def test_serve_prints_its_line_serves_and_sigterm_mid_stream_exits_143(servers):
    server = servers["loopback"]
    url = server.url()
    assert url.startswith("http://127.0.0.1:")
    done = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 3})
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
    body = {"prompt": "ab", "max_tokens": 1_000_000, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=20) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        started = time.monotonic()
        code, stderr = server.stop(within=EXIT_WITHIN_S)
        rest = [line for line in lines if line]
    assert code == 143 and time.monotonic() - started < EXIT_WITHIN_S
    assert rest[-1] == "data: [DONE]"  # the stream was cut, and ended as a stream ends
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert stderr.strip().splitlines()[-1] == "terminated" and "Traceback" not in stderr


def test_serving_every_interface_without_a_key_warns(servers):
    server = servers["every interface"]
    assert server.url().startswith("http://0.0.0.0:")
    code, stderr = server.stop(signal.SIGINT, within=EXIT_WITHIN_S)
    assert code == 130
    warning = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "--api-key" in warning[0]


def refused(result: subprocess.CompletedProcess) -> list[str]:
    """The stderr lines of a refusal: exit 2, one error line and a hint, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 2, lines
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    return lines


def test_a_port_in_use_is_one_sentence_and_exit_2(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "minigpt", "serve", str(run_dir), "--port", str(port)],
            env=env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    error, hint = refused(result)
    assert f"port {port}" in error and "in use" in error and "--port" in hint


def test_a_missing_serve_extra_says_how_to_install_it(run_dir):
    blocked = (
        "import sys; sys.modules['fastapi'] = None; sys.argv[1:] = ['serve', sys.argv[1]]; "
        "from minigpt.__main__ import run; run()"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, str(run_dir)],
        env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    error, hint = refused(result)
    assert "FastAPI" in error and hint == 'hint: pip install "minigpt[serve]"'
