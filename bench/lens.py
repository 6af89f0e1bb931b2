"""Benchmark `lens`, `attribute` and `patch` on GPT-2 small: wall time and peak memory.

    python bench/lens.py            # GPT-2 small, 64-token prompts (writes bench/results/lens.json)
    python bench/lens.py --quick    # a smoke run on a tiny model (about half a minute)
    python bench/lens.py --cpus 2   # pin the commands to 2 CPUs on a bigger machine
    python bench/lens.py --repeats 3   # the best of 3 runs of each (a busy machine)

The target: GPT-2 small (124M) runs each command on a 2-core CPU with a 64-token
prompt in under 60 s and under 2 GB. Each command is the real command line
(`python -m minigpt ...`) in a fresh process, as a user runs it: the wall time
counts the interpreter, the imports, loading the run and printing the table, and
the peak memory is the process's maximum resident set size (from os.wait4). A
first row loads the run and nothing else (a `python -c` that imports minigpt and
calls load_run), so "work s" (a command's wall time less that row's) is what the
command itself adds. One untimed load goes first, so that every row finds torch's
libraries and the weights in the page cache.

The run directory has GPT-2 small's shape (12 layers, 12 heads, 768 wide, context
1024, 50257 token ids, biases, tanh GELU) with random weights: time and memory do
not depend on what a model learned. GPT-2's BPE files need a download, so the
tokenizer is a char tokenizer over the first 50257 printable characters: as many
ids as GPT-2's, so the lens ranks and lists as many candidates. The prompts are
letters and digits, one token each. The corrupted prompt differs from the clean
one at its first token, the worst case for `--by layer-position` (every position
of every layer is rerun).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import torch

from minigpt.checkpoint import write_run_files
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "lens.json"
TARGET_SECONDS, TARGET_MB = 60, 2048
LOAD = (
    "import sys, time; start = time.perf_counter(); "
    "from minigpt.checkpoint import load_run; load_run(sys.argv[1]); "
    "print(f'load_run {time.perf_counter() - start:.3f} s')"
)  # the imports and load_run, as every command starts


def gpt2_small() -> GPTConfig:
    return GPTConfig(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
        bias=True, activation="gelu_tanh",
    )  # fmt: skip


def tiny() -> GPTConfig:
    return GPTConfig(vocab_size=128, block_size=64, n_layer=2, n_head=2, n_embd=32, bias=True)


def char_tokenizer(size: int) -> CharTokenizer:
    """A char tokenizer of the first `size` printable characters (ASCII first)."""
    printable = (chr(c) for c in range(32, sys.maxunicode) if chr(c).isprintable())
    return CharTokenizer(list(itertools.islice(printable, size)))


def make_run(run_dir: Path, config: GPTConfig, seed: int = 0) -> Path:
    """A run directory of this shape with random weights and a char tokenizer of its vocabulary size."""
    torch.manual_seed(seed)
    tokenizer = char_tokenizer(config.vocab_size)
    model = GPT(config).eval()
    return write_run_files(run_dir, model, tokenizer)


def prompts(n_tokens: int, seed: int = 0) -> tuple[str, str]:
    """A clean prompt of n_tokens letters and digits, and a corrupted one that differs
    from it at the first token only."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    picks = torch.randint(len(alphabet), (n_tokens,), generator=torch.Generator().manual_seed(seed))
    clean = "".join(alphabet[i] for i in picks.tolist())
    return clean, ("Z" if clean[0] != "Z" else "Y") + clean[1:]


def commands(run_dir: Path, n_tokens: int) -> dict[str, list[str]]:
    """name -> argv after `python`: loading alone, then each command."""
    clean, corrupt = prompts(n_tokens)
    run, answer = str(run_dir), ["--answer", "a", "--versus", "b"]
    patch = ["-m", "minigpt", "patch", run, "--clean", clean, "--corrupt", corrupt, *answer]
    return {
        "load the run": ["-c", LOAD, run],
        "lens": ["-m", "minigpt", "lens", run, "--prompt", clean],
        "attribute": ["-m", "minigpt", "attribute", run, "--prompt", clean, *answer],
        "patch --by head": [*patch, "--by", "head"],
        "patch --by layer-position": [*patch, "--by", "layer-position"],
    }


def measure(argv: list[str], cpus: int | None) -> dict:
    """Run `python argv` in a fresh process: wall seconds and peak resident memory."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if cpus:
        env["OMP_NUM_THREADS"] = str(cpus)
    pin = (lambda: os.sched_setaffinity(0, range(cpus))) if cpus else None
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                 env=env, cwd=ROOT, preexec_fn=pin)  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if child.returncode != 0:
        raise SystemExit(
            f"python {' '.join(argv[:3])} ... exited {child.returncode}:\n{text[-2000:]}"
        )
    kib = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(kib / 1024, 1),
        "output_tail": text[-300:],
    }


def best_of(argv: list[str], cpus: int | None, repeats: int) -> dict:
    """The fastest of `repeats` runs (a shared machine only ever adds time), with the
    highest peak memory of them."""
    runs = [measure(argv, cpus) for _ in range(repeats)]
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "peak_rss_mb": max(run["peak_rss_mb"] for run in runs), "repeats": repeats}


def summarise(rows: dict[str, dict]) -> list[list[str]]:
    """Add each row's work seconds and pass/fail to it; the table's lines."""
    load = rows["load the run"]
    load["load_run_seconds"] = float(load["output_tail"].split()[-2])  # "load_run X s"
    lines = []
    for name, row in rows.items():
        row["work_seconds"] = None if row is load else round(row["seconds"] - load["seconds"], 3)
        row["fast_enough"] = row["seconds"] < TARGET_SECONDS
        row["small_enough"] = row["peak_rss_mb"] < TARGET_MB
        work = "" if row["work_seconds"] is None else f"{row['work_seconds']:.1f}"
        lines.append([
            name, f"{row['seconds']:.1f}", work, f"{row['peak_rss_mb']:.0f}",
            "pass" if row["fast_enough"] else "FAIL", "pass" if row["small_enough"] else "FAIL",
        ])  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, 16-token prompts")
    parser.add_argument("--tokens", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--cpus", type=int, default=None, help="pin each command to this many CPUs")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs each")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    config, n_tokens = (tiny(), 16) if args.quick else (gpt2_small(), args.tokens)

    with tempfile.TemporaryDirectory() as tmp:
        argvs = commands(make_run(Path(tmp) / "run", config), n_tokens)
        machine = harness.machine(cpus=args.cpus or os.cpu_count())
        measure(argvs["load the run"], args.cpus)  # untimed: the files into the page cache
        rows = {name: best_of(argv, args.cpus, args.repeats) for name, argv in argvs.items()}
    machine["load_average_after"] = os.getloadavg()[0]  # the machine may be shared
    lines = summarise(rows)
    print(f"{config.describe()}; {n_tokens}-token prompts; {machine['cores']} cores, "
          f"load average {machine['load_average']:.2f} before, {machine['load_average_after']:.2f} after")  # fmt: skip
    headers = ["command", "wall s", "work s", "peak RSS MB", f"< {TARGET_SECONDS} s", f"< {TARGET_MB} MB"]  # fmt: skip
    harness.print_table(headers, lines, right={1, 2, 3})
    if args.quick:
        return
    for row in rows.values():
        del row["output_tail"]
    results = {
        "machine": machine,
        "model": config.to_dict(),
        "prompt_tokens": n_tokens,
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_MB},
        "commands": rows,
    }
    print(f"wrote {harness.write_json(args.out, results)}")


if __name__ == "__main__":
    main()
