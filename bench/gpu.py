"""Speed on a GPU: training tokens/s and MFU, and decode tokens/s against Hugging Face.

    python bench/gpu.py                       # on the GPU (cuda), minutes
    python bench/gpu.py --device cpu --quick  # the same code paths on tiny shapes, seconds

Training, as nanoGPT's recipes set it (no biases; dropout 0.2 for shakespeare-char):
the GPT-2 124M shape (4 micro-batches of 16 x 1024 = 65,536 tokens per step, the
GPT-2 recipe) and shakespeare-char (6L/6H/384, 64 x 256), on random tokens, bf16
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
graph; on a CPU the same static-shape step is compiled by inductor. "no read-ahead" is the
captured loop reading each step's ids before it queues the next step's graph (on
CUDA the loop queues it first, so the GPU works while the host reads).

"graph step us" is the captured step alone, 100 of them back to back with no read
between: the graph's own time, the floor under the captured tok/s (the rest of a
token's time is the host's draw and bookkeeping).

Kernels: the 8 kernels that take the most time in 20 eager decode steps of GPT-2
small at batch 1, fp32 against bf16 (torch.profiler): where bf16's time goes; on
CUDA also the kernels launched per token, which a captured step replays at once.

Muon (`muon`): configs/gpt2-124m-muon.toml's block (rotary, QK-norm, ReLU², no
biases) on the GPT-2 training shape, the bare step trained by Muon (its settings in
that file) beside the same model trained by AdamW: the Newton-Schulz iterations'
cost is the difference, with the peak GPU memory of each (Muon keeps one momentum
buffer per matrix where AdamW keeps two moments).

Loss (`--only loss`, not in a plain run): a training step of GPT-2 small with
`train.loss_chunk` against the full loss, step time and peak GPU memory, each in a
process of its own (bench/loss.py).

Curve (`--only curve`, not in a plain run): nanoGPT's shakespeare-char recipe for
2,000 steps trained by `minigpt train` and by the recipe on tiny shakespeare, the val
loss of both every 250 steps: the issue's "same loss curve". It reads the copy that
`minigpt train` downloads (data/shakespeare/input.txt) or ../shared's; a GPU machine
cannot download, so carry data/shakespeare there.

Every compiled measurement starts from a fresh compiler (`torch._dynamo.reset()`),
as in a process of its own. The sections run decode first and training (minutes of
compiling) last; `--only` picks some. One that fails is recorded as its error and
the rest still run, and the JSON is written after each section: a GPU lease is one
shot, and a run cut short keeps what it measured. On a lent GPU machine with torch:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu.py --out "$OUT/gpu.json"

Prints tables and writes bench/results/gpu.json with the device and torch version.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.autograd import DeviceType

from minigpt import generate as generate_module
from minigpt.checkpoint import METRICS_FILE, read_metrics
from minigpt.config import load_config
from minigpt.fast_decode import StaticDecoder
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.optim import make_optimizer
from minigpt.tokenizer import CharTokenizer
from minigpt.train import train
from minigpt.train_data import TrainData

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
        if str(BENCH) not in sys.path:  # as when it runs as a script: it imports harness
            sys.path.append(str(BENCH))
        spec.loader.exec_module(module)
    return sys.modules[key]


harness = _bench_module("harness")  # timing, tables and JSON, shared by the bench scripts


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


def fresh_compiler() -> None:
    """Forget every graph compiled so far, as a new process would: torch.compile keeps
    what it learned of a function's shapes, and a second model of another shape (the
    GPT-2 rows after shakespeare-char) would otherwise be compiled with symbolic sizes."""
    torch._dynamo.reset()


def measure(row: dict, key: str, fn, *args) -> None:
    """row[key] = fn(*args), or row[key + "_error"] = what went wrong: on a one-shot GPU
    run one failing cell (a capture on another torch, say) must not cost the rest."""
    try:
        row[key] = fn(*args)
    except Exception as error:  # noqa: BLE001 - reported in the row and on stderr
        row[f"{key}_error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_PEAKS.items():
            if key in name:
                return peak, f"{name} dense bf16"
        return float("nan"), f"{name} (peak unknown)"
    return _bench_module("train").matmul_peak(seconds=0.5), "measured fp32 matmul"


def train_rate(config: GPTConfig, batch: int, accum: int, device: torch.device,
               steps: int, loss_chunk: int = 0, optimizer_sets: tuple = ()) -> dict:  # fmt: skip
    """Median ms per optimizer step, tokens/s, MFU's numerator (FLOPs per token) and the
    last step's loss; on CUDA the peak memory of the timed steps is left in
    torch.cuda.max_memory_allocated. loss_chunk: as train.loss_chunk. optimizer_sets:
    `--set` items of the optimizer (e.g. "train.optimizer=muon"); AdamW's defaults without."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, load_config(None, list(optimizer_sets)), device)
    cuda = device.type == "cuda"
    fresh_compiler()
    step_model = torch.compile(model, dynamic=False) if cuda else model  # as `minigpt train`
    x = torch.randint(config.vocab_size, (batch, config.block_size), device=device)
    y = torch.randint(config.vocab_size, (batch, config.block_size), device=device)

    def step() -> torch.Tensor:
        for _ in range(accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                _, loss = step_model(x, y, loss_chunk=loss_chunk)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3 if cuda else 1):  # compile and warm up
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # the steps' peak, not the compiler's
    losses = []
    seconds = harness.median_of(lambda: losses.append(step()), steps, device)
    loss = losses[-1]
    c = model.config
    return {
        "step_ms": seconds * 1e3,
        "tokens_per_s": batch * accum * c.block_size / seconds,
        "flops_per_token": 6 * model.num_params() + 12 * c.n_layer * c.block_size * c.n_embd,
        "dtype": "bf16 autocast" if cuda else "float32",
        "compiled": cuda,
        "loss": float(loss),
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
            fresh_compiler()
            rates = minigpt_loop_rate(config, tokens, batch, accum, device, steps, compile)
            fresh_compiler()  # nanoGPT compiles in a process of its own
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
        records = read_metrics(Path(out) / METRICS_FILE)
    times = {  # seconds of training when each step's loss was read
        r["step"]: r["time"] for r in records if "loss" in r and "time" in r
    }
    return _bench_module("nanogpt_recipe").step_rates(
        "loop_", times, batch * accum * c.block_size, first_timed=10
    )


def loss_curves(text: str, config: GPTConfig, batch: int, recipe, device: torch.device,
                compile: bool, steps: int, eval_interval: int, eval_iters: int) -> dict:  # fmt: skip
    """Validation loss every eval_interval steps of `minigpt train` and of nanoGPT's
    recipe (bench/nanogpt_recipe.py), both trained on `text` by characters split as
    nanoGPT's prepare.py does (the first 90% trains), with the recipe's optimizer and
    schedule (max_iters = lr_decay_iters = steps) and the config's model and dropout;
    each loss estimated on eval_iters random val batches, as nanoGPT's estimate_loss.
    Speed is `loop_rates`' matter: this is the loss curve, and the two must match."""
    tokenizer = CharTokenizer.from_text(text)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    split = len(ids) * 9 // 10
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        train_file, val_file = Path(tmp) / "train.bin", Path(tmp) / "val.bin"
        ids[:split].tofile(train_file)
        ids[split:].tofile(val_file)
        fresh_compiler()
        theirs = _bench_module("nanogpt_recipe").train_loop_rate(
            config, train_file, batch, 1, steps, device, compile, recipe=recipe,
            val_file=val_file, eval_interval=eval_interval, eval_iters=eval_iters,
        )  # fmt: skip
        settings = dict(batch_size=batch, max_iters=steps, eval_interval=eval_interval,
                        eval_iters=eval_iters, lr=recipe.lr, min_lr=recipe.min_lr,
                        warmup_iters=recipe.warmup_iters, beta2=recipe.beta2,
                        weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip,
                        compile=compile, device=device, out_dir=Path(tmp) / "run")  # fmt: skip
        fresh_compiler()
        train(run_config(config, **settings), data=TrainData(tokenizer, ids[:split], ids[split:]))
        records = read_metrics(Path(tmp) / "run" / METRICS_FILE)
    ours = {r["step"]: r["val_loss"] for r in records if "val_loss" in r and r["step"] > 0}
    return {
        "steps": sorted(ours),
        "minigpt_val": [ours[step] for step in sorted(ours)],
        "recipe_val": [theirs["recipe_val_losses"][step] for step in sorted(ours)],
    }


CORPUS = (BENCH.parent / "data" / "shakespeare" / "input.txt",  # where `minigpt train` puts it
          BENCH.parents[1] / "shared" / "data" / "tinyshakespeare" / "input.txt")  # fmt: skip


def curve_section(quick: bool, device: torch.device, corpus: Path | None = None) -> dict:
    """nanoGPT's shakespeare-char recipe (its config/train_shakespeare_char.py: 6L/6H/384,
    context 256, batch 64, dropout 0.2, lr 1e-3) for 2,000 steps, trained by
    `minigpt train` and by the recipe on tiny shakespeare, the val loss every 250 steps
    (of 200 batches, as that config estimates it); bf16 and torch.compile on CUDA.
    corpus: another text file to train on (default: the first of CORPUS found)."""
    path = corpus or next((p for p in CORPUS if p.exists()), None)
    if path is None:
        raise FileNotFoundError(
            f"tiny shakespeare is at none of {', '.join(map(str, CORPUS))}: run `minigpt train`"
            " once to download it, or copy it to the first (on a lent GPU machine, carry it)"
        )
    text = path.read_text(encoding="utf-8")
    name, (config, batch, _) = next(iter(training_shapes(quick).items()))
    recipe = _bench_module("nanogpt_recipe").SHAKESPEARE_CHAR
    steps, eval_interval, eval_iters = (40, 20, 2) if quick else (2000, 250, 200)
    curves = loss_curves(text[: 100_000 if quick else None], config, batch, recipe, device,
                         device.type == "cuda", steps, eval_interval, eval_iters)  # fmt: skip
    return {"shape": name, "batch": batch, "dropout": config.dropout, "corpus": str(path),
            "eval_iters": eval_iters} | curves  # fmt: skip


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
            harness.sync(device)
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        events = sorted(averages, key=lambda e: getattr(e, attr), reverse=True)
        name = str(dtype).removeprefix("torch.")
        result[name] = [
            {"name": e.key[:70], "calls": e.count, "us": getattr(e, attr)} for e in events[:top]
        ]
        if device.type == "cuda":  # what a captured step replays: every kernel of a token
            kernels = sum(e.count for e in averages if e.device_type == DeviceType.CUDA)
            result[f"{name}_kernels_per_token"] = kernels / result["steps"]
    return result


def decode_rate(run, tokens: int, device: torch.device) -> float:
    """Tokens per second of a decode closure (`minigpt_decode`, `hf_decode`)."""
    return tokens / decode_seconds(run, device)


def decode_seconds(run, device: torch.device, repeats: int = 2) -> float:
    return harness.best_of(run, repeats, device, warmup=1)


def minigpt_decode(model: GPT, prompt: list[int], n: int, batch: int, kv: bool = True,
                   static: bool = False, read_ahead: bool = True):  # fmt: skip
    """A closure that decodes n tokens greedily. read_ahead=False: the loop reads each
    step's ids before it queues the next step, as before `computes_ahead` (CUDA)."""

    def run() -> None:
        settings = dict(num_samples=batch, temperature=0, use_kv_cache=kv, static_decode=static)
        ahead = generate_module.computes_ahead
        if not read_ahead:
            generate_module.computes_ahead = lambda device: False
        try:
            for _ in generate(model, prompt, n, **settings):
                pass
        finally:
            generate_module.computes_ahead = ahead

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
                tokens = n * batch
                eager = minigpt_decode(model, prompt, n, batch)
                measure(row, "minigpt_tok_s", decode_rate, eager, tokens, device)
                captured = minigpt_decode(model, prompt, n, batch, static=True)
                measure(row, "captured_tok_s", decode_rate, captured, tokens, device)
                plain = minigpt_decode(model, prompt, n, batch, static=True, read_ahead=False)
                measure(row, "captured_plain_tok_s", decode_rate, plain, tokens, device)
                measure(row, "step_us", captured_step_us, model, prompt, batch, device)
                if hf is not None:
                    theirs = hf_decode(hf, prompt, n, batch, device)
                    measure(row, "hf_tok_s", decode_rate, theirs, tokens, device)
                rows.append(row)
                print(f"  {row}", flush=True)
    return rows


@torch.inference_mode()
def captured_step_us(model: GPT, prompt: list[int], batch: int, device: torch.device,
                     steps: int = 100) -> float:  # fmt: skip
    """Microseconds per captured decode step alone, `steps` of them back to back with no
    read of the logits between: the graph's own time on CUDA, the floor under the
    captured tok/s (the rest of a token's time is the host's draw and bookkeeping)."""
    kv_cache = model.new_kv_cache(batch)
    ids = torch.tensor([prompt] * batch, device=device)  # (B, T)
    model(ids, kv_cache=kv_cache, last_only=True)
    decoder = StaticDecoder(model, kv_cache, mode="graph" if device.type == "cuda" else "eager")
    last = ids[:, -1:]  # (B, 1): any ids do, the time does not depend on them
    steps = min(steps, kv_cache.remaining - 1)
    decoder(last)  # captures the graph on CUDA
    harness.sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        decoder(last)
    harness.sync(device)
    return (time.perf_counter() - start) / steps * 1e6


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


def training_rows(quick: bool, device: torch.device, peak: float) -> list[dict]:
    """One row per training shape: the bare step, `minigpt train`'s loop and the recipe's."""
    rows = []
    cuda = device.type == "cuda"
    for name, (config, batch, accum) in training_shapes(quick).items():
        row = {"shape": name, "batch": batch, "accum": accum, "dropout": config.dropout}
        steps = 20 if quick else TRAIN_LOOP_STEPS
        measure(row, "bare", train_rate, config, batch, accum, device, 3 if quick else 20)
        measure(row, "loops", loop_rates, config, batch, accum, device, steps, cuda)
        row |= row.pop("bare", {}) | row.pop("loops", {})
        for prefix in ("", "loop_", "recipe_"):
            if f"{prefix}tokens_per_s" in row and "flops_per_token" in row:  # not if one failed
                row[f"{prefix}mfu"] = row[f"{prefix}tokens_per_s"] * row["flops_per_token"] / peak
        rows.append(row)
        print(f"  {row}", flush=True)
    return rows


MUON_CONFIG = BENCH.parent / "configs" / "gpt2-124m-muon.toml"


def muon_rows(quick: bool, device: torch.device, peak: float) -> list[dict]:
    """configs/gpt2-124m-muon.toml's model (rotary, QK-norm, ReLU², no biases) at the
    GPT-2 training shape's batch: the bare step with Muon (its muon_* settings) beside
    the same model with AdamW, so the Newton-Schulz cost shows as the difference."""
    run = load_config(MUON_CONFIG)
    (name, (shape, batch)), *_ = reversed(shapes(quick).items())  # GPT-2's, or the tiny one
    model = dataclasses.replace(
        run.model, vocab_size=shape.vocab_size, block_size=shape.block_size,
        n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
    )  # fmt: skip
    accum = 4 if shape.block_size >= 1024 else 1
    muon_sets = [f"train.{key}={getattr(run.train, key)}" for key in
                 ("optimizer", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_adjust_lr")]  # fmt: skip
    rows = []
    for optimizer, sets in (("adamw", ()), ("muon", tuple(muon_sets))):
        row = {"shape": f"{name}, {MUON_CONFIG.name}'s block", "batch": batch, "accum": accum,
               "optimizer": optimizer}  # fmt: skip
        measure(row, "bare", train_rate, model, batch, accum, device, 3 if quick else 20, 0, sets)
        row |= row.pop("bare", {})
        if "tokens_per_s" in row:
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        print(f"  {row}", flush=True)
    return rows


SECTIONS = ("decode", "kv_cache", "kernels", "training", "muon", "loss", "curve")
"""In the order they run: the decode targets first, the training (minutes of compiling)
last, so that a run cut short by its time limit keeps the most."""
DEFAULT_SECTIONS = SECTIONS[:-2]
"""What a plain run measures: the decode and training speed targets.
The loss section (two more GPT-2 compilations) and the curve (two 2,000-step runs, a
few minutes) run when asked: `--only loss curve`."""


def run_section(name: str, quick: bool, device: torch.device, peak: float,
                corpus: Path | None = None):  # fmt: skip
    if name == "decode":
        return decode_rows(quick, device)
    if name == "kv_cache":
        return kv_against_recompute(quick, device)
    if name == "kernels":
        return decode_kernels(device, quick)
    if name == "curve":
        return curve_section(quick, device, corpus)
    if name == "muon":
        return muon_rows(quick, device, peak)
    if name == "loss":  # bench/loss.py: train.loss_chunk against the full loss, GPT-2 small
        shape = "quick" if quick else device.type
        return _bench_module("loss").compare(str(device), shape, steps=2 if quick else 10, rounds=1)
    return training_rows(quick, device, peak)


def _num(row: dict, key: str, spec: str) -> str:
    """row[key] formatted, or '-' when it is missing (its error is printed below the row)."""
    return format(row[key], spec) if key in row else "-"


def _ratio(row: dict, top: str, bottom: str) -> str:
    return f"{row[top] / row[bottom]:.2f}x" if top in row and bottom in row else "-"


def print_tables(result: dict) -> None:
    print(f"\n{result['device']} (torch {result['torch']}), peak {result['peak_label']}")
    for name in SECTIONS:
        if isinstance(result.get(name), dict) and "error" in result[name]:
            print(f"\n{name}: failed: {result[name]['error']}")
    if isinstance(result.get("training"), list):
        print("\n| training | dtype | bare step ms | tokens/s | MFU | `minigpt train` ms/step "
              "| tokens/s | MFU | nanoGPT recipe ms/step | tokens/s | MFU | minigpt / recipe "
              "| in the best 10 steps |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in result["training"]:
            cells = [
                f"{row['shape']} x batch {row['batch']} x {row['accum']}"
                + (f", dropout {row['dropout']}" if row["dropout"] else ""),
                row.get("dtype", "-"),
            ]
            for prefix in ("", "loop_", "recipe_"):
                cells += [_num(row, f"{prefix}step_ms", ".1f"),
                          _num(row, f"{prefix}tokens_per_s", ",.0f"),
                          _num(row, f"{prefix}mfu", ".1%")]  # fmt: skip
            cells += [
                _num(row, "loop_over_recipe", ".3f"),
                _num(row, "best_loop_over_recipe", ".3f"),
            ]
            print("| " + " | ".join(cells) + " |")
            for key in (k for k in row if k.endswith("_error")):
                print(f"  {key}: {row[key]}")
    if isinstance(result.get("decode"), list):
        print("\n| decode | dtype | batch | eager tok/s | captured tok/s | captured / eager "
              "| captured, no read-ahead | graph step us | HF tok/s | captured / HF |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in result["decode"]:
            print(f"| {row['shape']} | {row['dtype']} | {row['batch']} "
                  f"| {_num(row, 'minigpt_tok_s', ',.0f')} | {_num(row, 'captured_tok_s', ',.0f')} "
                  f"| {_ratio(row, 'captured_tok_s', 'minigpt_tok_s')} "
                  f"| {_num(row, 'captured_plain_tok_s', ',.0f')} | {_num(row, 'step_us', '.0f')} "
                  f"| {_num(row, 'hf_tok_s', ',.0f')} | {_ratio(row, 'captured_tok_s', 'hf_tok_s')} |")  # fmt: skip
            for key in (k for k in row if k.endswith("_error")):
                print(f"  {key}: {row[key]}")
    kernels = result.get("kernels", {})
    for dtype in ("float32", "bfloat16"):
        if dtype not in kernels:
            continue
        per_token = kernels.get(f"{dtype}_kernels_per_token")
        count = f", {per_token:.0f} kernels per token" if per_token else ""
        print(f"\n{kernels['shape']}, {dtype}, {kernels['steps']} eager decode steps at batch 1"
              f"{count}:")  # fmt: skip
        for e in kernels[dtype]:
            print(f"  {e['us'] / 1e3:8.2f} ms  {e['calls']:5d} calls  {e['name']}")
    loss = result.get("loss", {})
    if "rows" in loss:
        print(f"\nChunked LM-head loss (train.loss_chunk), a training step of {loss['shape']}:")
        for row in loss["rows"]:
            print(f"  loss_chunk {row['loss_chunk'] or 'full':>5}: {row['step_ms']:8.1f} ms "
                  f"({row['speed_vs_full']:.2f}x), peak {row['peak_mib']:,.0f} MiB "
                  f"({row['memory_vs_full']:.2f}), loss {row['loss']:.5f}")  # fmt: skip
    curve = result.get("curve", {})
    if "steps" in curve:
        print(f"\nVal loss, {curve['shape']} x batch {curve['batch']}, dropout {curve['dropout']},"
              f" on {Path(curve['corpus']).name} ({curve['eval_iters']} batches each):")  # fmt: skip
        print("| step | `minigpt train` | nanoGPT recipe | difference |\n|---:|---:|---:|---:|")
        for step, ours, theirs in zip(curve["steps"], curve["minigpt_val"], curve["recipe_val"],
                                      strict=True):  # fmt: skip
            print(f"| {step} | {ours:.4f} | {theirs:.4f} | {ours - theirs:+.4f} |")
    if isinstance(result.get("muon"), list):
        print("\n| optimizer | shape | dtype | bare step ms | tokens/s | MFU | peak MiB |")
        print("|---|---|---|---:|---:|---:|---:|")
        for row in result["muon"]:
            print(f"| {row['optimizer']} | {row['shape']} x batch {row['batch']} x {row['accum']} "
                  f"| {row.get('dtype', '-')} | {_num(row, 'step_ms', '.1f')} "
                  f"| {_num(row, 'tokens_per_s', ',.0f')} | {_num(row, 'mfu', '.1%')} "
                  f"| {_num(row, 'peak_mib', ',.0f')} |")  # fmt: skip
    kv = result.get("kv_cache", {})
    if "speedup" in kv:
        print(f"\nKV cache vs recompute, {kv['shape']}, {kv['tokens']} tokens: "
              f"{kv['kv_tok_s']:,.0f} vs {kv['recompute_tok_s']:,.0f} tok/s ({kv['speedup']:.2f}x); "
              f"captured {kv['captured_tok_s']:,.0f} tok/s ({kv['captured_speedup']:.2f}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help="run these sections (default: all but loss and curve, in this order)",
    )
    parser.add_argument("--corpus", type=Path, help="the curve's text (default: tiny shakespeare)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as `minigpt train` runs on a GPU
    started = time.perf_counter()
    peak, peak_label = peak_flops(device)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": harness.device_name(device),
        "torch": torch.__version__,
        "quick": args.quick,
        "peak_flops": peak,
        "peak_label": peak_label,
    }  # fmt: skip
    print(f"{result['device']}, torch {result['torch']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        print(f"[{time.perf_counter() - started:4.0f} s] {name}", flush=True)
        try:
            result[name] = run_section(name, args.quick, device, peak, args.corpus)
        except Exception as error:  # noqa: BLE001 - the other sections still run
            result[name] = {"error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()
        result["seconds"] = time.perf_counter() - started
        harness.write_json(args.out, result)  # after every section: a run cut short keeps it
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_tables(result)
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
