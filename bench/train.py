"""Training throughput and quality.

    python bench/train.py              # throughput, loops and curves beside nanoGPT, the 180 s quality run, AdamW vs Muon
    python bench/train.py --quick      # a smoke run: few steps, 10 s of training
    python bench/train.py --skip-quality --skip-curves
    python bench/train.py --skip-quality --skip-curves --optimizer-repeats 3   # AdamW vs Muon, 3 runs each

Throughput: tokens/s of whole optimizer steps (forward, backward, AdamW) for the
nanoGPT CPU shape (4 layers, 4 heads, 128 wide, context 64, batch 12, vocab 65)
and the GPT-2 small shape at batch 1, with and without torch.compile, and the
model FLOPs utilisation (MFU): the model's FLOPs per token (6N for the weights'
matmuls forward and backward, plus 12 * n_layer * block_size * n_embd for attention,
as in the PaLM paper) times tokens/s, over this machine's fp32 matmul peak, measured
in the same run by timing a large torch.matmul.

GEMM ceiling: the same step's matmuls alone (every Linear's forward and two
gradient products, and attention's batched products), timed back to back on their
real shapes. Small matmuls run far below the large-matmul peak, so this rate over
the peak is the best MFU the shape can reach even if every other op were free.

Loops: `minigpt train`'s whole loop beside nanoGPT's recipe (bench/nanogpt_recipe.py)
on the nanoGPT CPU shape and the same token file, alternating, in this process (so
under the same OpenMP wait policy, which `minigpt.device` picks as `minigpt train`
does). Curves: the val loss of both loops every 250 of 2,000 steps of nanoGPT's CPU
shakespeare-char recipe on tiny shakespeare.

Quality: `minigpt train configs/shakespeare-char-cpu.toml` on tiny shakespeare
(../shared/data/tinyshakespeare/input.txt), the best val loss within its 180 s.

Optimizers: AdamW against Muon (train.optimizer = "muon", with Muon's own default
settings) in one run. Each is trained by the real `minigpt train
configs/shakespeare-char-cpu.toml` on tiny shakespeare for a fixed number of steps
(no clock: max_time 0, the cosine decay over the steps), in a fresh process, the
two alternating (adamw, muon, adamw, muon, ...) so that drift on a shared machine
hits both; round r uses seed 1337 + r for both. From each run's metrics.jsonl:
the val loss at equal steps (the evaluations), and at equal seconds of training
(each run's val loss linearly interpolated between its evaluations, at evenly
spaced times that every run reached; the clock counts the evaluations, which are
the same for both). Each run's peak memory is its process's maximum resident set
size from os.wait4, read by a small launcher process: a child's ru_maxrss starts at
the RSS of whoever forked it, and this process holds torch and the models.
In this process, on random tokens: the milliseconds of forward + backward (with
gradient clipping) and of optimizer.step() alone, the step's share of the two, and
the optimizer state's size (every state tensor's bytes: AdamW keeps two moments per
parameter, Muon one momentum buffer per matrix, and AdamW's two for the rest), on
the nanoGPT CPU shape and GPT-2 small's. Muon's Newton-Schulz iterations cost the
same per step whatever the batch, so GPT-2's share is also given at the tokens per
step of configs/gpt2-124m.toml, with forward + backward scaled to that many tokens.
MB is 10^6 bytes.

Prints a table and writes bench/results/train.json and bench/results/train.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minigpt.device import choose_wait_policy  # noqa: E402

WAIT_POLICY = choose_wait_policy()  # before torch loads, as `minigpt train` does

import harness  # noqa: E402 (bench/harness.py; the script's folder is on sys.path)
import torch  # noqa: E402

from minigpt.checkpoint import read_metrics  # noqa: E402
from minigpt.config import load_config  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.optim import make_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CPU_CONFIG = REPO / "configs" / "shakespeare-char-cpu.toml"

SHAPES = {
    # name: (GPTConfig, batch size)
    "nanoGPT CPU (4L/4H/128, ctx 64, batch 12)": (
        GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False),
        12,
    ),
    "GPT-2 small (12L/12H/768, ctx 1024, batch 1)": (
        GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True),
        1,
    ),
}


LOOP_STEPS = 300  # per loop and round


def _bench_gpu():
    """bench/gpu.py as a module (the bench folder is not a package): its loop timings."""
    if "bench_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_gpu"]


def matmul_peak(seconds: float = 2.0, n: int = 2048) -> float:
    """This machine's fp32 matmul FLOP/s: the best of repeated n x n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_matmuls(config: GPTConfig, batch_size: int) -> list[tuple[str, tuple, tuple]]:
    """Every matmul one training step runs, as (name, A shape, B shape) of A @ B.

    Each Linear (in -> out) on N = B*T rows runs three products: the forward
    X (N, in) @ W^T (in, out), and backward dX = dY (N, out) @ W (out, in) and
    dW = dY^T (out, N) @ X (N, in). Attention runs Q K^T and A V forward and four
    batched products backward (dA, dV, dQ, dK), each over B*H matrices.
    """
    c = config
    T, C, d = c.block_size, c.n_embd, c.d_head
    n, bh = batch_size * T, batch_size * c.n_head  # rows of the Linears; attention matrices
    linears = [("qkv", C, 3 * C), ("attn out", C, C), ("mlp fc", C, 4 * C), ("mlp proj", 4 * C, C)]
    products = []
    for name, d_in, d_out in linears * c.n_layer + [("lm_head", C, c.vocab_size)]:
        products += [
            (f"{name} fwd", (n, d_in), (d_in, d_out)),
            (f"{name} dX", (n, d_out), (d_out, d_in)),
            (f"{name} dW", (d_out, n), (n, d_in)),
        ]
    for _ in range(c.n_layer):
        products += [
            ("QK^T fwd", (bh, T, d), (bh, d, T)),
            ("AV fwd", (bh, T, T), (bh, T, d)),
            ("dA = dO V^T", (bh, T, d), (bh, d, T)),
            ("dV = A^T dO", (bh, T, T), (bh, T, d)),
            ("dQ = dS K", (bh, T, T), (bh, T, d)),
            ("dK = dS^T Q", (bh, T, T), (bh, T, d)),
        ]
    return products


def gemm_ceiling(config: GPTConfig, batch_size: int, seconds: float = 1.0) -> dict:
    """FLOP/s this machine reaches on exactly the matmuls of one training step.

    Runs all of `step_matmuls` back to back (as a step would, with the operands'
    real layouts: the backward products read transposed views, as autograd does)
    and takes the fastest pass. tokens/s at that rate is the most any kernel
    fusion could give if everything except the matmuls were free.
    """
    operands = []
    for name, a_shape, b_shape in step_matmuls(config, batch_size):
        a = torch.randn(*a_shape[::-1]).mT if name.endswith("dW") else torch.randn(*a_shape)
        b = torch.randn(*b_shape[::-1]).mT if name.endswith("fwd") and len(b_shape) == 2 else (
            torch.randn(*b_shape)
        )  # fmt: skip
        operands.append((a, b))
    flops = sum(2 * a.shape[:-1].numel() * b.shape[-1] * a.shape[-1] for a, b in operands)

    def one_pass() -> None:
        for a, b in operands:
            torch.matmul(a, b)

    one_pass()  # warm-up
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    tokens = batch_size * config.block_size
    return {"matmul_flops_per_step": flops, "flops_per_s": flops / best,
            "step_ms": best * 1e3, "tokens_per_s": tokens / best}  # fmt: skip


def flops_per_token(model: GPT) -> float:
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.block_size * c.n_embd


def throughput(config: GPTConfig, batch_size: int, compile: bool, steps: int, warmup: int) -> dict:
    """Median tokens/s of full training steps on random tokens."""
    from minigpt.config import load_config

    torch.manual_seed(0)
    model = GPT(config)
    optimizer = make_optimizer(model, load_config(), torch.device("cpu"))
    step_model = torch.compile(model) if compile else model
    x = torch.randint(config.vocab_size, (batch_size, config.block_size))
    y = torch.randint(config.vocab_size, (batch_size, config.block_size))

    def step() -> None:
        _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup_s = sum(harness.timings(step, warmup))  # compiling, when asked, happens here
    seconds = harness.median_of(step, steps)
    tokens = batch_size * config.block_size
    return {
        "compile": compile,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens / seconds,
        "flops_per_token": flops_per_token(model),
        "warmup_s": warmup_s,
    }


def quality_run(max_time: float | None) -> dict:
    """Train configs/shakespeare-char-cpu.toml on tiny shakespeare; best val loss and timing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [
            sys.executable, "-m", "minigpt", "train", str(CPU_CONFIG),
            "--data", str(SHAKESPEARE), "--out", str(out),
            "--set", f"data.data_dir={Path(tmp) / 'data'}",
        ]  # fmt: skip
        if max_time is not None:
            command += ["--max-time", str(max_time)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"quality run failed:\n{proc.stderr[-2000:]}")
        records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    return {
        "command": "minigpt train configs/shakespeare-char-cpu.toml --data "
        "../shared/data/tinyshakespeare/input.txt"
        + (f" --max-time {max_time}" if max_time else ""),
        "best_val_loss": min(r["val_loss"] for r in evals),
        "final_val_loss": evals[-1]["val_loss"],
        "steps": steps[-1]["step"],
        "tokens": steps[-1]["tokens"],
        "train_seconds": evals[-1]["time"],
        "wall_seconds_with_startup": wall,
    }


def curves(steps: int, eval_interval: int) -> dict:
    """Validation loss every eval_interval steps of `minigpt train` and of nanoGPT's
    recipe, on tiny shakespeare by characters with nanoGPT's CPU recipe (its README:
    config/train_shakespeare_char.py with 4L/4H/128, context 64, batch 12, dropout 0,
    max_iters = lr_decay_iters = steps), each estimated on 20 random val batches
    (bench/gpu.py's loss_curves). Speed is another matter: this is the loss curve."""
    recipe = _bench_gpu()._bench_module("nanogpt_recipe").SHAKESPEARE_CHAR
    config, batch = SHAPES["nanoGPT CPU (4L/4H/128, ctx 64, batch 12)"]
    text = SHAKESPEARE.read_text(encoding="utf-8")
    curve = _bench_gpu().loss_curves(
        text, config, batch, recipe, torch.device("cpu"), compile=False, steps=steps,
        eval_interval=eval_interval, eval_iters=20,
    )  # fmt: skip
    return {
        "recipe": "nanoGPT's shakespeare-char on a CPU (4L/4H/128, ctx 64, batch 12, lr 1e-3)"
    } | curve


OPTIMIZERS = ("adamw", "muon")
MB = 1e6
GPT2_TOKENS_PER_STEP = 491_520  # configs/gpt2-124m.toml's train.tokens_per_step

RUN_AND_MEASURE = """
import json, os, subprocess, sys
log, command = sys.argv[1], sys.argv[2:]
with open(log, "wb") as out:
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""
"""A launcher: runs the command, waits for it with os.wait4 and prints its exit code
and peak RSS. It is small, so the command's ru_maxrss starts at its size, not ours."""


def run_measured(command: list[str], log: Path) -> dict:
    """Run `command` through the launcher: its wall seconds and peak RSS in MB."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_AND_MEASURE, str(log), *command],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"the launcher failed:\n{proc.stderr[-2000:]}")
    reply = json.loads(proc.stdout.splitlines()[-1])
    if reply["rc"] != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... exited {reply['rc']}:\n"
                         f"{log.read_text(errors='replace')[-2000:]}")  # fmt: skip
    rss_bytes = reply["maxrss_kib"] * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes
    return {"wall_seconds": wall, "peak_rss_mb": rss_bytes / MB}


def optimizer_run(optimizer: str, steps: int, eval_interval: int, eval_iters: int,
                  seed: int, tmp: Path) -> dict:  # fmt: skip
    """`minigpt train configs/shakespeare-char-cpu.toml` for `steps` steps with this
    optimizer: its evaluations (step, seconds of training, val loss) and peak RSS."""
    out = tmp / f"{optimizer}-{seed}"
    command = [
        sys.executable, "-m", "minigpt", "train", str(CPU_CONFIG),
        "--data", str(SHAKESPEARE), "--out", str(out), "--max-iters", str(steps),
        "--seed", str(seed),
        "--set", f"data.data_dir={tmp / 'data'}",  # prepared by the first run, then reused
        "--set", "train.max_time=0", "--set", "train.decay_by_time=false",
        "--set", f"train.eval_interval={eval_interval}", "--set", f"train.eval_iters={eval_iters}",
        "--set", f"train.optimizer={optimizer}",
    ]  # fmt: skip
    measured = run_measured(command, tmp / f"{optimizer}-{seed}.log")
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    return {
        "optimizer": optimizer,
        "seed": seed,
        "evals": [{"step": r["step"], "time": r["time"], "val_loss": r["val_loss"]} for r in evals],
        "best_val_loss": min(r["val_loss"] for r in evals),
        "final_val_loss": evals[-1]["val_loss"],
        "train_seconds": evals[-1]["time"],
        "ms_per_step": evals[-1]["time"] / evals[-1]["step"] * 1e3,
    } | measured


def interpolate(evals: list[dict], seconds: float) -> float:
    """The val loss at `seconds` of training, linear between the two evaluations around it."""
    for before, after in zip(evals, evals[1:], strict=False):
        if before["time"] <= seconds <= after["time"]:
            share = (seconds - before["time"]) / (after["time"] - before["time"])
            return before["val_loss"] + share * (after["val_loss"] - before["val_loss"])
    if len(evals) == 1 and evals[0]["time"] == seconds:
        return evals[0]["val_loss"]
    raise ValueError(f"{seconds} s is outside the evaluations' times")


def optimizer_curves(steps: int, eval_interval: int, eval_iters: int, repeats: int) -> dict:
    """AdamW and Muon trained alternately, `repeats` runs each: the val loss at equal
    steps and at equal seconds (the mean over runs, and each run's), and each run."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeats):
            for optimizer in OPTIMIZERS:
                run = optimizer_run(optimizer, steps, eval_interval, eval_iters, 1337 + round_,
                                    Path(tmp))  # fmt: skip
                print(f"  {optimizer:5} seed {run['seed']}: best val loss {run['best_val_loss']:.4f} "
                      f"in {run['train_seconds']:.1f} s ({run['ms_per_step']:.1f} ms/step), "
                      f"peak RSS {run['peak_rss_mb']:.0f} MB")  # fmt: skip
                runs.append(run)
    by_optimizer = {name: [r for r in runs if r["optimizer"] == name] for name in OPTIMIZERS}
    eval_steps = [e["step"] for e in runs[0]["evals"]]
    at_steps = {
        name: [[next(e["val_loss"] for e in r["evals"] if e["step"] == step) for r in rs]
               for step in eval_steps]
        for name, rs in by_optimizer.items()
    }  # fmt: skip
    # the times every run reached: from the latest first evaluation to the earliest last one
    start = max(r["evals"][0]["time"] for r in runs)
    end = min(r["evals"][-1]["time"] for r in runs)
    points = len(eval_steps) if end >= start else 0  # 0: no time that every run reached
    times = [min(end, start + (end - start) * i / max(1, points - 1)) for i in range(points)]
    at_seconds = {
        name: [[interpolate(r["evals"], t) for r in rs] for t in times]
        for name, rs in by_optimizer.items()
    }
    return {
        "config": "configs/shakespeare-char-cpu.toml",
        "steps": steps, "eval_interval": eval_interval, "eval_iters": eval_iters,
        "repeats": repeats,
        "equal_steps": {"steps": eval_steps, "val_loss": at_steps},
        "equal_seconds": {"seconds": times, "val_loss": at_seconds},
        "runs": runs,
    }  # fmt: skip


def state_bytes(optimizer) -> int:
    """The bytes of every tensor the optimizer keeps per parameter (moments, momentum)."""
    return sum(
        value.numel() * value.element_size()
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor)
    )


def optimizer_step_share(config: GPTConfig, batch_size: int, optimizer_name: str,
                         steps: int, warmup: int) -> dict:  # fmt: skip
    """Median ms of forward + backward (+ gradient clipping) and of optimizer.step()
    alone, over `steps` training steps on random tokens, and the optimizer's state."""
    torch.manual_seed(0)
    model = GPT(config)
    run_config = load_config(None, [f"train.optimizer={optimizer_name}"])
    optimizer = make_optimizer(model, run_config, torch.device("cpu"))
    x = torch.randint(config.vocab_size, (batch_size, config.block_size))
    y = torch.randint(config.vocab_size, (batch_size, config.block_size))
    forward_backward, optimizer_step = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        middle = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:  # the first step also allocates the state
            forward_backward.append(middle - start)
            optimizer_step.append(end - middle)
    fb_ms = statistics.median(forward_backward) * 1e3
    step_ms = statistics.median(optimizer_step) * 1e3
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "optimizer": optimizer_name,
        "forward_backward_ms": fb_ms,
        "optimizer_step_ms": step_ms,
        "step_share": step_ms / (fb_ms + step_ms),
        "state_mb": state_bytes(optimizer) / MB,
        "params_mb": params / MB,
        "tokens_per_step": batch_size * config.block_size,
        "steps": steps,
        "warmup": warmup,
    }


def optimizers_section(quick: bool, skip_gpt2: bool, steps: int | None, repeats: int) -> dict:
    """AdamW against Muon: trained side by side, then each one's step timed in here."""
    steps = steps or (40 if quick else 3000)
    eval_interval = max(1, steps // (4 if quick else 12))
    print(f"optimizers: {steps} steps of configs/shakespeare-char-cpu.toml, "
          f"{repeats} run{'s' if repeats > 1 else ''} of each, alternating")  # fmt: skip
    result = optimizer_curves(steps, eval_interval, 5 if quick else 40, repeats)
    result["step_share"] = []
    for name, (config, batch) in SHAPES.items():
        small = config.n_embd < 512
        if skip_gpt2 and not small:
            continue
        timed = (5 if small else 1) if quick else (30 if small else 3)
        warmup = (2 if small else 0) if quick else (5 if small else 1)
        for optimizer in OPTIMIZERS:
            row = optimizer_step_share(config, batch, optimizer, timed, warmup)
            row["shape"] = name
            if not small:  # Newton-Schulz per step, forward + backward per token
                scale = GPT2_TOKENS_PER_STEP / row["tokens_per_step"]
                row["step_share_at_recipe_tokens"] = row["optimizer_step_ms"] / (
                    row["forward_backward_ms"] * scale + row["optimizer_step_ms"]
                )
            result["step_share"].append(row)
    return result


def _losses(values: list[float]) -> str:
    """A table cell: the mean of the runs' val losses, and each run's when there are several."""
    mean = f"{statistics.fmean(values):.4f}"
    return mean if len(values) == 1 else f"{mean} ({' / '.join(f'{v:.4f}' for v in values)})"


def optimizer_tables(section: dict) -> list[str]:
    """The optimizers section as Markdown: equal steps, equal seconds, the runs, the step."""
    runs = "mean" + (f" of {section['repeats']} runs (each run)" if section["repeats"] > 1 else "")
    steps, seconds = section["equal_steps"], section["equal_seconds"]
    lines = [f"AdamW against Muon, {section['config']} for {section['steps']} steps "
             f"(no clock; cosine decay over the steps), val loss on "
             f"{section['eval_iters']} batches, {runs}:", ""]  # fmt: skip
    lines += [harness.markdown_table(
        ["val loss at step", *OPTIMIZERS],
        [[step, *(_losses(steps["val_loss"][name][i]) for name in OPTIMIZERS)]
         for i, step in enumerate(steps["steps"])],
        right=range(3),
    ), ""]  # fmt: skip
    lines += [harness.markdown_table(
        ["val loss at seconds of training (interpolated)", *OPTIMIZERS],
        [[f"{t:.1f}", *(_losses(seconds["val_loss"][name][i]) for name in OPTIMIZERS)]
         for i, t in enumerate(seconds["seconds"])],
        right=range(3),
    ), ""]  # fmt: skip
    lines += [harness.markdown_table(
        ["run", "seed", "best val loss", "train s", "ms/step (evals too)", "peak RSS MB"],
        [[r["optimizer"], r["seed"], f"{r['best_val_loss']:.4f}", f"{r['train_seconds']:.1f}",
          f"{r['ms_per_step']:.1f}", f"{r['peak_rss_mb']:.0f}"] for r in section["runs"]],
        right=range(1, 6),
    ), ""]  # fmt: skip
    lines += [harness.markdown_table(
        ["shape", "optimizer", "fwd+bwd ms", "optimizer.step() ms", "step's share",
         f"share at {GPT2_TOKENS_PER_STEP:,} tokens/step (fwd+bwd scaled)", "state MB",
         "params MB"],
        [[r["shape"], r["optimizer"], f"{r['forward_backward_ms']:.1f}",
          f"{r['optimizer_step_ms']:.1f}", f"{100 * r['step_share']:.1f}%",
          f"{100 * r['step_share_at_recipe_tokens']:.2f}%"
          if "step_share_at_recipe_tokens" in r else "-",
          f"{r['state_mb']:.1f}", f"{r['params_mb']:.1f}"] for r in section["step_share"]],
        right=range(2, 8),
    )]  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few steps, 10 s quality run")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument(
        "--skip-curves", action="store_true", help="no val-loss curves beside nanoGPT's recipe"
    )
    parser.add_argument("--skip-gpt2", action="store_true", help="only the nanoGPT CPU shape")
    parser.add_argument(
        "--skip-optimizers", action="store_true", help="no AdamW against Muon section"
    )
    parser.add_argument(
        "--optimizer-steps", type=int, help="steps of each AdamW and Muon run (default 3000)"
    )
    parser.add_argument(
        "--optimizer-repeats", type=int, help="runs of each optimizer (default 2; 1 with --quick)"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = parser.parse_args()

    peak = matmul_peak(1.0 if args.quick else 3.0)
    print(
        f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads, "
        f"OpenMP wait policy {WAIT_POLICY})"
    )
    rows = []
    shapes = {n: s for n, s in SHAPES.items() if not (args.skip_gpt2 and s[0].n_embd >= 512)}
    for name, (config, batch) in shapes.items():
        small = config.n_embd < 512
        steps = (5 if small else 1) if args.quick else (30 if small else 4)
        warmup = (3 if small else 0) if args.quick else (10 if small else 2)
        modes = (False,) if args.skip_compile or (args.quick and not small) else (False, True)
        for compile in modes:
            result = throughput(config, batch, compile, steps, warmup)
            result.update(shape=name, mfu=result["tokens_per_s"] * result["flops_per_token"] / peak)
            rows.append(result)
            print(
                f"{name:48} {'compiled' if compile else 'eager':8} "
                f"{result['tokens_per_s']:>9,.0f} tok/s  {result['step_ms']:>8.1f} ms/step  "
                f"MFU {100 * result['mfu']:5.1f}%"
            )
    # The ceiling: the same step's matmuls alone, at this machine's speed on their shapes.
    ceilings = {}
    for name, (config, batch) in shapes.items():
        if args.quick and config.n_embd >= 512:
            continue  # one pass of GPT-2's matmuls takes seconds
        ceilings[name] = gemm_ceiling(config, batch, 0.5 if args.quick else 2.0)
        print(
            f"{name:48} {'GEMMs':8} {ceilings[name]['tokens_per_s']:>9,.0f} tok/s  "
            f"{ceilings[name]['step_ms']:>8.1f} ms/step  "
            f"({ceilings[name]['flops_per_s'] / 1e9:.1f} GFLOP/s on the step's matmul shapes)"
        )
    # a busy machine can depress either measurement: the peak is the better of two, at
    # the start and after the throughput runs, so MFU is never flattered by a slow peak
    peak = max(peak, matmul_peak(1.0 if args.quick else 3.0))
    for result in rows:
        result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / peak
    for ceiling in ceilings.values():
        ceiling["mfu"] = ceiling["flops_per_s"] / peak
    print(f"fp32 matmul peak, best of two: {peak / 1e9:.1f} GFLOP/s; MFU: "
          + ", ".join(f"{100 * r['mfu']:.1f}%" for r in rows)
          + "; ceiling (matmuls only): "
          + ", ".join(f"{100 * c['mfu']:.1f}%" for c in ceilings.values()))  # fmt: skip
    # The whole loop, `minigpt train`'s against nanoGPT's recipe (bench/nanogpt_recipe.py),
    # on the nanoGPT CPU shape: the peer, in the same run on the same machine.
    loop_shape, (loop_config, loop_batch) = next(iter(SHAPES.items()))
    loops = _bench_gpu().loop_rates(
        loop_config, loop_batch, 1, torch.device("cpu"), 20 if args.quick else LOOP_STEPS,
        compile=False, rounds=1 if args.quick else 2,
    )  # fmt: skip
    loops["shape"] = loop_shape
    print(
        f"{loop_shape:48} {'loops':8} minigpt train {loops['loop_step_ms']:.1f} ms/step, "
        f"nanoGPT recipe {loops['recipe_step_ms']:.1f} ms/step: "
        f"{loops['loop_over_recipe']:.3f}x the recipe's tokens/s "
        f"({loops['best_loop_over_recipe']:.3f}x in each one's best 10 steps)"
    )
    curve = None
    if not args.skip_curves:
        curve = curves(100, 50) if args.quick else curves(2000, 250)
        print("val loss, minigpt train vs nanoGPT's recipe: " + ", ".join(
            f"step {step}: {a:.4f} vs {b:.4f}"
            for step, a, b in zip(curve["steps"], curve["minigpt_val"], curve["recipe_val"], strict=True)
        ))  # fmt: skip
    quality = None
    if not args.skip_quality:
        quality = quality_run(10.0 if args.quick else None)
        print(
            f"quality: best val loss {quality['best_val_loss']:.4f} after "
            f"{quality['train_seconds']:.0f} s ({quality['steps']} steps) — {quality['command']}"
        )
    optimizers = None
    if not args.skip_optimizers:
        optimizers = optimizers_section(
            args.quick, args.skip_gpt2, args.optimizer_steps,
            args.optimizer_repeats or (1 if args.quick else 2),
        )  # fmt: skip
        print("\n".join(optimizer_tables(optimizers)))

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": harness.cpu_name(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": WAIT_POLICY,
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "matmul_peak_flops": peak,
        "throughput": rows,
        "gemm_ceiling": ceilings,
        "loops": loops,
        "curves": curve,
        "quality": quality,
        "optimizers": optimizers,
        "quick": args.quick,
    }
    out = harness.write_json(args.out, report)
    lines = [
        f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads, "
        f"OpenMP wait policy {WAIT_POLICY}, load average {os.getloadavg()[0]:.1f}",
        "",
        "| shape | mode | tokens/s | ms/step | MFU |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r['shape']} | {'compiled' if r['compile'] else 'eager'} | "
            f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {100 * r['mfu']:.1f}% |"
            for r in rows
        ),
        *(
            f"| {name} | matmuls only (ceiling) | {c['tokens_per_s']:,.0f} | "
            f"{c['step_ms']:.1f} | {100 * c['mfu']:.1f}% |"
            for name, c in ceilings.items()
        ),
    ]
    lines += [
        "",
        "| whole training loop, " + loop_shape + " | ms/step | tokens/s |",
        "|---|---:|---:|",
        f"| `minigpt train` | {loops['loop_step_ms']:.1f} | {loops['loop_tokens_per_s']:,.0f} |",
        f"| nanoGPT's recipe (bench/nanogpt_recipe.py) | {loops['recipe_step_ms']:.1f} "
        f"| {loops['recipe_tokens_per_s']:,.0f} |",
        f"| minigpt / nanoGPT | | **{loops['loop_over_recipe']:.3f}x** "
        f"({loops['best_loop_over_recipe']:.3f}x in each one's best 10 steps) |",
    ]
    if curve:
        lines += [
            "",
            f"| val loss at step | `minigpt train` | {curve['recipe']} |",
            "|---:|---:|---:|",
            *(
                f"| {step} | {a:.4f} | {b:.4f} |"
                for step, a, b in zip(
                    curve["steps"], curve["minigpt_val"], curve["recipe_val"], strict=True
                )
            ),
        ]
    if quality:
        lines += [
            "",
            f"Quality: best val loss **{quality['best_val_loss']:.4f}** in "
            f"{quality['train_seconds']:.0f} s of training ({quality['steps']} steps): "
            f"`{quality['command']}`",
        ]
    if optimizers:
        lines += ["", *optimizer_tables(optimizers)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
