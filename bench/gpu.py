"""Speed on a GPU: training tokens/s and MFU, and decode tokens/s against Hugging Face.

    python bench/gpu.py                       # on the GPU (cuda), about 4-6 minutes
    python bench/gpu.py --device cpu --quick  # the same code paths on tiny shapes, seconds

Training, as nanoGPT's recipes set it (no biases; dropout 0.2 for shakespeare-char):
the GPT-2 124M shape (4 micro-batches of 16 x 1024 = 65,536 tokens per step, the
issue's recipe) and shakespeare-char (6L/6H/384, 64 x 256), on random tokens, bf16
autocast and torch.compile on CUDA (fp32, eager on a CPU). Three columns:

- "bare step": whole optimizer steps (forward, backward, clip, AdamW as `minigpt
  train` builds it) on one fixed batch, the median;
- "`minigpt train`": `minigpt.train.train` itself for TRAIN_LOOP_STEPS steps
  (batches drawn from a token file, the lr schedule, the loss read every
  log_interval, the final evaluation and save), ms/step from its own metrics from
  step 10 on, so that compilation is not counted;
- "nanoGPT recipe": bench/nanogpt_recipe.py, nanoGPT's model and loop re-typed (it
  cannot be installed on a machine without a network), timed the same way on the
  same token file.

MFU is the model's FLOPs per token (6N + 12 * n_layer * block_size * n_embd, as
bench/train.py) times tokens/s over the device's dense bf16 peak (H100/H200: 989
TFLOP/s, A100: 312), or over a measured fp32 matmul peak on a CPU.

Decode: greedy `minigpt.generate` at batch 1 and 8, fp32 and bf16, for the
shakespeare-char and GPT-2 small shapes (random weights, a 16-token prompt), the
KV cache against recomputing every step at 500 tokens, and Hugging Face
`generate` on the same weights when transformers is installed. "captured" is
static_decode=True (`minigpt generate --compile`): on CUDA each step replays a CUDA
graph; on a CPU the same static-shape step runs without one.

Kernels: the 8 kernels that take the most time in 20 eager decode steps of GPT-2
small at batch 1, fp32 against bf16 (torch.profiler): where bf16's time goes.

Prints tables and writes bench/results/gpu.json with the device and torch version.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minigpt.checkpoint import METRICS_FILE
from minigpt.config import load_config
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.train import TrainData, make_optimizer, train

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "gpu.json"
BF16_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def _bench_module(name: str):
    """bench/NAME.py as a module (the bench folder is not a package), loaded once."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before it runs: its dataclasses look themselves up there
        spec.loader.exec_module(module)
    return sys.modules[key]


def shapes(quick: bool) -> dict[str, tuple[GPTConfig, int]]:
    """name -> (config, training batch); biases on, so Hugging Face's GPT-2 matches."""
    if quick:
        tiny = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=64, bias=True)
        return {"tiny (2L/2H/64)": (tiny, 4)}
    return {
        "shakespeare-char (6L/6H/384)": (
            GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=True),
            64,
        ),
        "GPT-2 small (12L/12H/768)": (
            GPTConfig(
                vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True
            ),
            16,
        ),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAKS.items():
            if key in name:
                return peak, f"{name} dense bf16"
        return float("nan"), f"{name} (peak unknown)"
    return _bench_module("train").matmul_peak(seconds=0.5), "measured fp32 matmul"


def train_rate(config: GPTConfig, batch: int, accum: int, device: torch.device,
               steps: int) -> dict:  # fmt: skip
    """Median ms per optimizer step, tokens/s and MFU's numerator (FLOPs per token)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, load_config(), device)
    cuda = device.type == "cuda"
    step_model = torch.compile(model) if cuda else model
    x = torch.randint(config.vocab_size, (batch, config.block_size), device=device)
    y = torch.randint(config.vocab_size, (batch, config.block_size), device=device)

    def step() -> None:
        for _ in range(accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                _, loss = step_model(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if cuda else 1):  # compile and warm up
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    c = model.config
    return {
        "step_ms": seconds * 1e3,
        "tokens_per_s": batch * accum * c.block_size / seconds,
        "flops_per_token": 6 * model.num_params() + 12 * c.n_layer * c.block_size * c.n_embd,
        "dtype": "bf16 autocast" if cuda else "float32",
        "compiled": cuda,
    }


TRAIN_LOOP_STEPS = 60


def training_shapes(quick: bool) -> dict[str, tuple[GPTConfig, int, int]]:
    """name -> (config, batch, accumulation steps) as nanoGPT's recipes train them: no
    biases, dropout 0.2 for shakespeare-char (its config/train_shakespeare_char.py)."""
    rows = {}
    for name, (config, batch) in shapes(quick).items():
        dropout = 0.2 if config.vocab_size == 65 and not quick else 0.0
        accum = 4 if config.block_size >= 1024 else 1  # GPT-2: 65,536 tokens per step
        rows[name] = (dataclasses.replace(config, bias=False, dropout=dropout), batch, accum)
    return rows


def loop_rates(config: GPTConfig, batch: int, accum: int, device: torch.device, steps: int,
               compile: bool, rounds: int = 1) -> dict:  # fmt: skip
    """`minigpt.train.train` beside nanoGPT's recipe (bench/nanogpt_recipe.py) on the
    same token file, `steps` optimizer steps each, timed from step 10 to the last so
    that compilation is not counted; with rounds > 1 they alternate and each keeps
    its best round (a shared machine slows whichever runs at a busy moment)."""
    recipe = _bench_module("nanogpt_recipe")
    rng = np.random.default_rng(0)
    tokens = rng.integers(config.vocab_size, size=4_000_000, dtype=np.uint16)
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "train.bin"
        tokens.tofile(tokens_file)
        for _ in range(rounds):
            rates = minigpt_loop_rate(config, tokens, batch, accum, device, steps, compile)
            rates |= recipe.train_loop_rate(
                config, tokens_file, batch, accum, steps, device, compile
            )
            for key, value in rates.items():
                if key in best and key.endswith("_ms"):
                    value = min(value, best[key])
                elif key in best and key.endswith("_per_s"):
                    value = max(value, best[key])
                best[key] = value
    best["loop_over_recipe"] = best["loop_tokens_per_s"] / best["recipe_tokens_per_s"]
    best["best_loop_over_recipe"] = (
        best["loop_best_tokens_per_s"] / best["recipe_best_tokens_per_s"]
    )
    return best


def run_config(config: GPTConfig, **train_settings):
    """The RunConfig of `minigpt train` for a benchmark's model and [train] settings."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "dropout")
    sets = [f"model.{key}={getattr(config, key)}" for key in keys]
    sets += [f"train.{key}={value}" for key, value in train_settings.items()]
    return load_config(None, sets)


def minigpt_loop_rate(config: GPTConfig, tokens: np.ndarray, batch: int, accum: int,
                      device: torch.device, steps: int, compile: bool) -> dict:  # fmt: skip
    """ms/step and tokens/s of `minigpt.train.train` itself, from its metrics."""
    tokenizer = CharTokenizer([chr(ord("!") + i) for i in range(config.vocab_size)])
    split = len(tokens) * 9 // 10
    data = TrainData(tokenizer, tokens[:split], tokens[split:])
    c = config
    with tempfile.TemporaryDirectory() as out:
        settings = dict(batch_size=batch, grad_accum=accum, max_iters=steps,
                        eval_interval=steps, eval_iters=1, log_interval=10, warmup_iters=10,
                        compile=compile, device=device, out_dir=out)  # fmt: skip
        train(run_config(c, **settings), data=data)
        with open(Path(out) / METRICS_FILE) as f:
            times = {  # seconds of training when each step's loss was read
                r["step"]: r["time"] for r in map(json.loads, f) if "loss" in r and "time" in r
            }
    return _bench_module("nanogpt_recipe").step_rates(
        "loop_", times, batch * accum * c.block_size, first_timed=10
    )


def decode_kernels(device: torch.device, quick: bool, top: int = 8) -> dict:
    """The `top` ops by device time (self) in 20 eager decode steps, per dtype."""
    from torch.profiler import ProfilerActivity, profile

    name, (config, _) = list(shapes(quick).items())[-1]
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    result = {"shape": name, "steps": 20}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = GPT(config).eval().to(device=device, dtype=dtype)
        run = minigpt_decode(model, list(range(16)), 20, 1)
        run()  # warm-up
        with profile(activities=[activity]) as prof:
            run()
            sync(device)
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
        result[str(dtype).removeprefix("torch.")] = [
            {"name": e.key[:70], "calls": e.count, "us": getattr(e, attr)} for e in events[:top]
        ]
    return result


def decode_seconds(run, device: torch.device, repeats: int = 2) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def minigpt_decode(
    model: GPT, prompt: list[int], n: int, batch: int, kv: bool = True, static: bool = False
):
    def run() -> None:
        settings = dict(num_samples=batch, temperature=0, use_kv_cache=kv, static_decode=static)
        for _ in generate(model, prompt, n, **settings):
            pass

    return run


def hf_decode(hf, prompt: list[int], n: int, batch: int, device: torch.device):
    input_ids = torch.tensor([prompt] * batch, device=device)
    mask = torch.ones_like(input_ids)

    @torch.inference_mode()
    def run() -> None:
        hf.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip

    return run


def decode_rows(quick: bool, device: torch.device) -> list[dict]:
    """tok/s of minigpt's eager decode (and Hugging Face's) per shape, dtype and batch."""
    try:
        to_hf = _bench_module("generate").to_hf
    except ImportError:
        to_hf = None
    n = 8 if quick else 200
    rows = []
    for name, (config, _) in shapes(quick).items():
        torch.manual_seed(0)
        base = GPT(config).eval()
        prompt = torch.randint(config.vocab_size, (16,)).tolist()
        for dtype in (torch.float32, torch.bfloat16):
            model = GPT(config).eval()
            model.load_state_dict(base.state_dict())
            model = model.to(device=device, dtype=dtype)
            hf = _hf_model(to_hf, base, device, dtype)
            for batch in (1, 8):
                row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch}
                seconds = decode_seconds(minigpt_decode(model, prompt, n, batch), device)
                row["minigpt_tok_s"] = n * batch / seconds
                captured = minigpt_decode(model, prompt, n, batch, static=True)
                row["captured_tok_s"] = n * batch / decode_seconds(captured, device)
                if hf is not None:
                    seconds = decode_seconds(hf_decode(hf, prompt, n, batch, device), device)
                    row["hf_tok_s"] = n * batch / seconds
                rows.append(row)
    return rows


def _hf_model(to_hf, model: GPT, device: torch.device, dtype: torch.dtype):
    if to_hf is None:
        return None
    try:
        return to_hf(model).to(device=device, dtype=dtype)
    except ImportError:  # transformers is not installed
        return None


def kv_against_recompute(quick: bool, device: torch.device) -> dict:
    """The cache's speed-up at 500 tokens of the first shape, fp32, batch 1."""
    name, (config, _) = next(iter(shapes(quick).items()))
    n = 16 if quick else 500
    torch.manual_seed(0)
    model = GPT(config).eval().to(device)
    prompt = torch.randint(config.vocab_size, (16,)).tolist()
    cached = decode_seconds(minigpt_decode(model, prompt, n, 1, kv=True), device, repeats=1)
    captured = decode_seconds(minigpt_decode(model, prompt, n, 1, static=True), device, repeats=1)
    recomputed = decode_seconds(minigpt_decode(model, prompt, n, 1, kv=False), device, repeats=1)
    return {"shape": name, "tokens": n, "kv_tok_s": n / cached, "captured_tok_s": n / captured,
            "recompute_tok_s": n / recomputed, "speedup": recomputed / cached,
            "captured_speedup": recomputed / captured}  # fmt: skip


def print_tables(result: dict) -> None:
    print(f"\n{result['device']} (torch {result['torch']}), peak {result['peak_label']}\n")
    print("| training | dtype | bare step ms | tokens/s | MFU | `minigpt train` ms/step "
          "| tokens/s | MFU | nanoGPT recipe ms/step | tokens/s | MFU | minigpt / recipe "
          "| in the best 10 steps |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["training"]:
        cells = [
            f"{row['shape']} x batch {row['batch']} x {row['accum']}"
            + (f", dropout {row['dropout']}" if row["dropout"] else ""),
            row["dtype"],
        ]
        for prefix in ("", "loop_", "recipe_"):
            cells += [f"{row[f'{prefix}step_ms']:.1f}", f"{row[f'{prefix}tokens_per_s']:,.0f}",
                      f"{row[f'{prefix}mfu']:.1%}"]  # fmt: skip
        print("| " + " | ".join(cells) + f" | {row['loop_over_recipe']:.3f}x "
              f"| {row['best_loop_over_recipe']:.3f}x |")  # fmt: skip
    print("\n| decode | dtype | batch | eager tok/s | captured tok/s | captured / eager "
          "| HF tok/s | captured / HF |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in result["decode"]:
        eager, captured, hf = row["minigpt_tok_s"], row["captured_tok_s"], row.get("hf_tok_s")
        print(f"| {row['shape']} | {row['dtype']} | {row['batch']} | {eager:,.0f} "
              f"| {captured:,.0f} | {captured / eager:.2f}x | {f'{hf:,.0f}' if hf else '-'} "
              f"| {f'{captured / hf:.2f}x' if hf else '-'} |")  # fmt: skip
    kernels = result["kernels"]
    for dtype in ("float32", "bfloat16"):
        print(f"\n{kernels['shape']}, {dtype}, {kernels['steps']} eager decode steps at batch 1:")
        for e in kernels[dtype]:
            print(f"  {e['us'] / 1e3:8.2f} ms  {e['calls']:5d} calls  {e['name']}")
    kv = result["kv_cache"]
    print(f"\nKV cache vs recompute, {kv['shape']}, {kv['tokens']} tokens: "
          f"{kv['kv_tok_s']:,.0f} vs {kv['recompute_tok_s']:,.0f} tok/s ({kv['speedup']:.2f}x); "
          f"captured {kv['captured_tok_s']:,.0f} tok/s ({kv['captured_speedup']:.2f}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as `minigpt train` runs on a GPU
    started = time.perf_counter()
    peak, peak_label = peak_flops(device)
    training = []
    cuda = device.type == "cuda"
    for name, (config, batch, accum) in training_shapes(args.quick).items():
        row = {"shape": name, "batch": batch, "accum": accum, "dropout": config.dropout}
        row |= train_rate(config, batch, accum, device, 3 if args.quick else 20)
        steps = 20 if args.quick else TRAIN_LOOP_STEPS
        row |= loop_rates(config, batch, accum, device, steps, compile=cuda)
        for prefix in ("", "loop_", "recipe_"):
            row[f"{prefix}mfu"] = row[f"{prefix}tokens_per_s"] * row["flops_per_token"] / peak
        training.append(row)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "peak_flops": peak,
        "peak_label": peak_label,
        "training": training,
        "decode": decode_rows(args.quick, device),
        "kv_cache": kv_against_recompute(args.quick, device),
        "kernels": decode_kernels(device, args.quick),
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - started
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
