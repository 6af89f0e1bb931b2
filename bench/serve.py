"""Serving under load: aggregate tokens/s and time to first token at 1, 4 and 16
concurrent clients, against the same requests served one at a time.

    python bench/serve.py                      # the default model's shape, random weights
    python bench/serve.py --run checkpoints/default --threads 2
    python bench/serve.py --quick              # a smoke run: few requests, short answers

It starts `minigpt serve` as a process on 127.0.0.1 and sends every level the same
--requests streamed completions (seeded, so each has one right answer), from that
many client threads at once. A level is bounded in requests and in --max-seconds.

"one at a time" is the same requests sent by one client, each after the last ended:
what a server without batching gives. tokens/s counts the completion tokens every
response reports, over the level's wall time. Time to first token is from sending a
request to its first streamed chunk. A response is "wrong" when its text differs
from that request's text one at a time (seeded sampling writes the same text however
it is batched), and "lost" when it failed or never came.

Prints a markdown table and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import machine, print_table, write_json

LEVELS = (1, 4, 16)
PROMPTS = ("def ", "import os\n", "class Point:\n", "for i in range(", "    return ", "# ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_run(folder: Path) -> Path:
    """A run directory with the default config's shape and random weights (speed does
    not depend on the values), over a char tokenizer of printable ASCII."""
    import torch

    from minigpt.checkpoint import write_run_files
    from minigpt.config import load_config
    from minigpt.model import GPT
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("".join(chr(c) for c in range(32, 127)) + "\n\t")
    torch.manual_seed(0)
    model = GPT(load_config(None, []).model.with_vocab(tokenizer.vocab_size)).eval()
    return write_run_files(folder / "default-shape", model, tokenizer)


def start_server(run: Path, port: int, max_batch: int, threads: int | None) -> subprocess.Popen:
    env = {**os.environ}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "minigpt", "serve", str(run), "--port", str(port)]
    command += ["--max-batch", str(max_batch)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
    server.kill()
    sys.exit("the server did not answer /health within 120 s")


def one_request(client: httpx.Client, url: str, body: dict) -> dict:
    """Send one streamed completion; its text, completion tokens and timings."""
    started = time.perf_counter()
    first = None
    text, tokens = [], 0
    with client.stream("POST", url, json=body, timeout=300) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            first = first if first is not None else time.perf_counter() - started
            for choice in chunk.get("choices", []):
                text.append(choice.get("text", ""))
                tokens += len(choice.get("token_ids") or [])
    return {
        "ok": True,
        "text": "".join(text),
        "tokens": tokens,
        "ttft": first,
        "seconds": time.perf_counter() - started,
    }


def run_level(url: str, bodies: list[dict], clients: int, max_seconds: float) -> dict:
    """Send `bodies` from `clients` threads at once; each thread takes the next body."""
    results: list[dict | None] = [None] * len(bodies)
    next_body = iter(range(len(bodies)))
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client_loop() -> None:
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                with lock:
                    index = next(next_body, None)
                if index is None:
                    return
                try:
                    results[index] = one_request(client, url, bodies[index])
                except httpx.HTTPError as err:
                    results[index] = {"ok": False, "error": str(err)}

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    done = [r for r in results if r and r["ok"]]
    ttfts = sorted(r["ttft"] for r in done if r["ttft"] is not None)
    return {
        "clients": clients,
        "seconds": seconds,
        "tokens": sum(r["tokens"] for r in done),
        "tokens_per_s": sum(r["tokens"] for r in done) / seconds,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run directory (default: the default shape)")
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per request")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--max-seconds", type=float, default=300, help="per level")
    parser.add_argument("--quick", action="store_true", help="8 requests of 16 tokens")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "serve.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 8, 16
    with tempfile.TemporaryDirectory() as folder:
        run = args.run or default_run(Path(folder))
        port = free_port()
        server = start_server(run, port, args.max_batch, args.threads)
        try:
            report = bench(f"http://127.0.0.1:{port}", args)
        finally:
            server.terminate()
            server.wait(30)
    report["machine"] = machine(server_threads=args.threads, max_batch=args.max_batch)
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


def bench(base: str, args: argparse.Namespace) -> dict:
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    bodies = [
        {
            "model": model,
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": args.max_tokens,
            "temperature": 0.8,
            "seed": 1000 + i,
            "stream": True,
            "return_token_ids": True,
        }
        for i in range(args.requests)
    ]
    url = f"{base}/v1/completions"
    run_level(url, bodies[:2], 2, args.max_seconds)  # warm-up: threads, allocations
    alone = run_level(url, bodies, 1, args.max_seconds)
    levels = [alone] + [run_level(url, bodies, c, args.max_seconds) for c in LEVELS[1:]]
    expected = [r["text"] if r and r["ok"] else None for r in alone["results"]]
    rows = []
    for level in levels:
        lost = sum(1 for r in level["results"] if not (r and r["ok"]))
        wrong = sum(
            1
            for r, want in zip(level["results"], expected, strict=True)
            if r and r["ok"] and want is not None and r["text"] != want
        )
        level.update(lost=lost, wrong=wrong, speedup=level["tokens_per_s"] / alone["tokens_per_s"])
        rows.append(
            [
                level["clients"],
                f"{level['tokens_per_s']:.0f}",
                f"{level['speedup']:.2f}x",
                f"{level['ttft_median_s'] * 1000:.0f}" if level["ttft_median_s"] else "-",
                f"{level['ttft_p90_s'] * 1000:.0f}" if level["ttft_p90_s"] else "-",
                f"{len(level['results']) - lost}/{len(level['results'])}",
                lost,
                wrong,
            ]
        )
    headers = ["clients", "tokens/s", "vs one at a time", "TTFT median ms", "TTFT p90 ms"]
    headers += ["responses", "lost", "wrong"]
    print_table(headers, rows, right=range(8))
    for level in levels:
        del level["results"]
    return {"requests": args.requests, "max_tokens": args.max_tokens, "levels": levels}


if __name__ == "__main__":
    main()
