"""The chunked LM-head loss (`train.loss_chunk`) against the full one: peak memory, step time.

    python bench/loss.py                  # CPU: a GPT-2-vocabulary model, 8 x 256 tokens
    python bench/loss.py --device cuda    # GPT-2 small, 16 x 1024 tokens, bf16, compiled
    python bench/loss.py --quick          # tiny shapes, seconds

A whole optimizer step (forward, backward, clipping, AdamW as `minigpt train`
builds it: bench/gpu.py's bare step) on one fixed batch, the median of --steps after
a warm-up. Each setting runs in a process of its own, so that its peak memory is its
own: the peak resident set on a CPU (the weights and optimizer state included),
`torch.cuda.max_memory_allocated` over the timed steps on a GPU (compilation's own
peak left out). --rounds alternate the settings and keep each one's best time (the
machine is shared). The same seed and batch for all: their losses agree to float
rounding, and the table prints them.

Prints a table and writes bench/results/loss.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results" / "loss.json"
SHAPES = {
    # device kind: (GPTConfig arguments, batch, loss_chunk settings compared)
    "cpu": (dict(vocab_size=50304, block_size=256, n_layer=6, n_head=6, n_embd=384), 8, (0, 256, 1024)),
    "cuda": (dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 16, (0, 2048)),
    "quick": (dict(vocab_size=1000, block_size=32, n_layer=2, n_head=2, n_embd=64), 4, (0, 16)),
}  # fmt: skip


def one_setting(device_name: str, shape: str, chunk: int, steps: int) -> dict:
    """Time `steps` optimizer steps with loss_chunk=chunk (bench/gpu.py's bare step);
    this process's peak memory."""
    from minigpt.device import choose_wait_policy

    choose_wait_policy()  # before torch loads, as `minigpt train` does
    import torch
    from gpu import train_rate  # bench/gpu.py: this script's folder is on sys.path

    from minigpt.model import GPTConfig

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as `minigpt train` on a GPU
    arguments, batch, _ = SHAPES[shape]
    rates = train_rate(GPTConfig(**arguments, bias=False), batch, 1, device, steps, chunk)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)  # of the timed steps (train_rate)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"loss_chunk": chunk, "step_ms": rates["step_ms"], "peak_mib": peak / 2**20,
            "loss": rates["loss"]}  # fmt: skip


def compare(device_name: str, shape: str, steps: int, rounds: int) -> dict:
    """Every loss_chunk setting of the shape, each in a fresh process, alternating."""
    arguments, batch, chunks = SHAPES[shape]
    best: dict[int, dict] = {}
    for _ in range(rounds):
        for chunk in chunks:
            command = [sys.executable, __file__, "--device", device_name, "--child",
                       f"{shape},{chunk},{steps}"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"loss_chunk={chunk} failed: {done.stderr.strip()[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if chunk not in best or row["step_ms"] < best[chunk]["step_ms"]:
                best[chunk] = row
    full = best[0]
    for row in best.values():
        row["memory_vs_full"] = row["peak_mib"] / full["peak_mib"]
        row["speed_vs_full"] = full["step_ms"] / row["step_ms"]
    shape_name = "{n_layer}L/{n_head}H/{n_embd}, vocab {vocab_size}".format(**arguments)
    return {"shape": f"{shape_name}, {batch} x {arguments['block_size']} tokens",
            "rows": [best[chunk] for chunk in chunks]}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"\n{result['shape']} on {result['device']} (torch {result['torch']})\n")
    headers = ["loss_chunk", "step ms", "peak memory MiB", "memory / full", "speed / full", "loss"]
    cells = [
        [row["loss_chunk"] or "full", f"{row['step_ms']:,.0f}", f"{row['peak_mib']:,.0f}",
         f"{row['memory_vs_full']:.2f}", f"{row['speed_vs_full']:.2f}x", f"{row['loss']:.5f}"]
        for row in result["rows"]
    ]  # fmt: skip
    harness.print_table(headers, cells, right=range(6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # shape,chunk,steps: one setting
    args = parser.parse_args()
    if args.child:
        shape, chunk, steps = args.child.split(",")
        print(json.dumps(one_setting(args.device, shape, int(chunk), int(steps))))
        return
    import torch

    shape = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    steps, rounds = (2, 1) if args.quick else (args.steps, args.rounds)
    result = compare(args.device, shape, steps, rounds)
    result |= {
        "device": harness.device_name(args.device),
        "torch": torch.__version__,
    }  # fmt: skip
    print_table(result)
    harness.write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
