"""Benchmark `inspect-heads`: time for the full table with importance, and HTML size.

    python bench/heads.py           # the issue's targets (writes bench/results/heads.json)
    python bench/heads.py --quick   # a smoke run in a few seconds

1. The default model (configs' default shape, char vocabulary of the stdlib corpus
   size), the repeated probe, ablation importance and |dL/dgate| over 8
   validation batches: wall time of metrics + table (target < 20 s on CPU).
2. A 6-layer, 6-head, 384-wide model on a 256-token prompt: the self-contained
   HTML viewer's size (target < 5 MB) and the time to write it.

Weights are random: timing and size do not depend on what a model learned.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import numpy as np
import torch
from rich.console import Console

from minigpt import heads, render
from minigpt.heads_run import validation_batches
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "heads.json"
DEFAULT_VOCAB = 100  # about the char vocabulary of the built-in stdlib corpus


def char_tokenizer(size: int) -> CharTokenizer:
    return CharTokenizer([chr(32 + i) for i in range(size)])


def time_table(config: GPTConfig, n_batches: int, seed: int = 0) -> dict:
    """Probe + metrics + importance on n_batches validation batches + the rich table."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    tokenizer = char_tokenizer(config.vocab_size)
    val_tokens = (
        np.random.default_rng(seed).integers(0, config.vocab_size, 50_000).astype(np.uint16)
    )
    start = time.perf_counter()
    probes = list(heads.repeated_probe(tokenizer, config.block_size // 2))
    batches = validation_batches(val_tokens, config.block_size, n_batches=n_batches)
    inspection = heads.inspect_heads(
        model, tokenizer, probes, repeated=config.block_size // 2,
        importance_batches=batches, importance_source="random validation tokens",
    )  # fmt: skip
    computed = time.perf_counter() - start
    render.print_table(Console(file=io.StringIO(), width=160), inspection)
    total = time.perf_counter() - start
    return {
        "model": config.to_dict(),
        "validation_batches": n_batches,
        "batch": list(batches[0][0].shape),
        "probe_sequences": len(probes),
        "seconds_metrics_and_importance": round(computed, 3),
        "seconds_total_with_table": round(total, 3),
    }


def html_size(config: GPTConfig, prompt_tokens: int, seed: int = 0) -> dict:
    """Write the HTML viewer for a prompt of prompt_tokens tokens and measure it."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    tokenizer = char_tokenizer(config.vocab_size)
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,))
    inspection = heads.inspect_heads(model, tokenizer, [prompt])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "heads.html"
        start = time.perf_counter()
        render.save_html(path, inspection)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
    return {
        "model": f"{config.n_layer} layers x {config.n_head} heads, n_embd {config.n_embd}",
        "prompt_tokens": prompt_tokens,
        "html_bytes": size,
        "html_mb": round(size / 1e6, 3),
        "seconds_write": round(seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    table_config = GPTConfig(vocab_size=DEFAULT_VOCAB)  # the default run's model
    html_config = GPTConfig(
        vocab_size=DEFAULT_VOCAB, block_size=256, n_layer=6, n_head=6, n_embd=384
    )
    n_batches, prompt_tokens = 8, 256
    if args.quick:
        table_config = GPTConfig(
            vocab_size=DEFAULT_VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=32
        )
        html_config = GPTConfig(
            vocab_size=DEFAULT_VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=32
        )
        n_batches, prompt_tokens = 2, 64

    table = time_table(table_config, n_batches)
    page = html_size(html_config, prompt_tokens)
    results = {
        "quick": args.quick,
        "machine": harness.machine(threads=torch.get_num_threads()),
        "table": table,
        "html": page,
        "targets": {"table_seconds": 20, "html_mb": 5},
    }
    print(f"{'measure':<44} {'value':>10} {'target':>8}")
    print(f"{'table + importance (' + str(n_batches) + ' val batches), s':<44} "
          f"{table['seconds_total_with_table']:>10.2f} {'< 20':>8}")  # fmt: skip
    print(f"{'HTML, ' + page['model'] + ', ' + str(prompt_tokens) + ' tok, MB':<44} "
          f"{page['html_mb']:>10.2f} {'< 5':>8}")  # fmt: skip
    if not args.quick:
        harness.write_json(args.out, results)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
