"""Sampling speed: tokens/s with and without the KV cache, and against Hugging Face.

    python bench/generate.py                 # the full table (minutes on a laptop CPU)
    python bench/generate.py --quick         # a smoke run: 32 tokens, small shapes, one repeat
    python bench/generate.py --threads 1 --max-seconds 30
    python bench/generate.py --cpu-decode-only --repeats 3   # eager, compiled, int8, HF

Three shapes with random weights (speed does not depend on the values): the
default config, the shakespeare-char config and GPT-2 small; batch 1 and 8;
128, 512 and 2048 new tokens after an 8-token prompt, greedy. tokens/s counts
every sample's tokens (batch x new tokens / seconds), best of --repeats runs.

Past block_size the cache is cropped and prefilled again every block_size / 4
tokens (see minigpt/generate.py); recomputing runs the same windows at every step.
A cell whose one run is estimated to take longer than --max-seconds is skipped
(recompute: n forwards of a full window; cache: from the shorter length's rate).

The Hugging Face column runs `GPT2LMHeadModel.generate(use_cache=True, greedy)`
on the same shape with the same weights (copied over; exact GELU, so both models
compute the same function and their greedy tokens are compared), in the same
process, interleaved with minigpt. GPT-2 has learned positions too, so its
length is kept within n_positions: those rows use block_size - 8 new tokens
(at most --hf-tokens). Needs `pip install transformers` (the `bench` extra).

Rolling cache: the shakespeare-char shape with rotary positions
(`position="rope"`), whose KV cache is a ring, against the same shape with learned
positions (cropped and prefilled again every block_size / 4 tokens), at 1 x and
8 x block_size new tokens, batch 1: tokens/s, and the 8 x / 1 x ratio (1.0 when a
token past block_size costs what one before it costs). `--rolling-only` runs
just this table.

CPU decode: the paths `generate --compile` and `--quantize int8` take, at batch 1
on the CPU, greedy after an 8-token prompt, random weights (biases on): the default
shape at 120 new tokens (within its block) and 512 (cropped and prefilled again
every block_size / 4 tokens), GPT-2 small at 128 (`--decode-tokens` sets one length
for all). Four paths, one untimed run of each, then --repeats rounds of one of each
in turn, best of each:
- eager float32: `generate(..., static_decode=False)`;
- compiled float32: `static_decode=True`, the decode step compiled by inductor;
  compiled ahead by `compile_decode_step`, whose seconds are shown apart;
- int8: a deep copy through `quantize_int8`, compiled the same way;
- HF: `GPT2LMHeadModel.generate` on the same weights (within block_size only).
tok/s is new tokens / seconds of the whole call, prefill included; first token is
the time from the call to the first id (prefill and one draw; HF's is taken by a
streamer, which generate hands each id as soon as it is drawn). Every path's greedy
ids are compared with eager float32's: the share equal, and how many come before
the first difference.

The bandwidth bound (at each shape's first length). The bytes a decode step reads:
every linear layer's weight and bias (the LM head among them; its matrix is also
the tied token embedding and counts once; int8 counts its int8 data and its
scales) and every norm's gain and bias; not the token and position tables, of which
a step reads one row each. Plus the KV cache: the compiled step attends over all
its cache's slots (the unwritten ones masked; the next power of two above the
positions the run reaches, at most block_size), an eager step over the positions
in its context (the mean over the run). bytes x tok/s is the bandwidth a path draws.
The machine's read bandwidth: torch.sum over 2 GiB of float32, far more than any
L3 cache (up to about 500 MB on server CPUs), best of 5; a 1 GiB copy is shown too
(bytes read and written). The ceiling is that bandwidth / bytes per token. "At its
size" reads a tensor as large as the step's bytes instead, over and over: bytes
that fit in the cache come faster than DRAM's. Resident size: `weight_bytes` of
each model, and what a fresh process's RSS grows by for the float32 model and
after quantize_int8 (Linux; freed memory trimmed). `--cpu-decode-only` runs just
this part (bench/results/generate-cpu-decode.json).

Prints markdown tables and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import torch

from minigpt.errors import MinigptError
from minigpt.fast_decode import compile_decode_step, static_cache_length
from minigpt.generate import generate, window_start
from minigpt.model import GPT, GPTConfig
from minigpt.quantize import Int8Embedding, quantize_int8, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 8


def model_shapes() -> dict[str, GPTConfig]:
    """name -> config; biases on everywhere so the Hugging Face GPT-2 has the same weights."""
    default = {"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128}
    path = ROOT / "configs" / "default.toml"
    if path.exists():
        model = tomllib.loads(path.read_text())["model"]
        default = {k: model[k] for k in ("block_size", "n_layer", "n_head", "n_embd")}
    return {
        # vocab: about the number of distinct characters in the Python standard library
        "default (char)": GPTConfig(vocab_size=128, bias=True, **default),
        "shakespeare-char": GPTConfig(
            vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=True
        ),
        "gpt2-small": GPTConfig(
            vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True
        ),
    }


def minigpt_run(model: GPT, prompt: list[int], n: int, batch: int, use_kv_cache: bool):
    def run() -> list[int]:
        ids = [step for step in generate(model, prompt, n, num_samples=batch, temperature=0,
                                         use_kv_cache=use_kv_cache)]  # fmt: skip
        return torch.stack(ids, dim=1)[0].tolist()

    return run


@torch.inference_mode()
def recompute_estimate(model: GPT, batch: int, n: int) -> float:
    """Seconds that n recomputing steps would take: n forwards of a full window, upper bound."""
    window = torch.zeros((batch, model.config.block_size), dtype=torch.long)
    model(window, last_only=True)
    start = time.perf_counter()
    model(window, last_only=True)
    return n * (time.perf_counter() - start)


def to_hf(model: GPT):
    """The same network as a transformers GPT2LMHeadModel (Conv1D weights are transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=None,
        pad_token_id=0,
    )  # fmt: skip
    hf = GPT2LMHeadModel(hf_config).eval()
    ours = model.state_dict()
    state = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
        "lm_head.weight": ours["tok_emb.weight"],
    }
    names = {"ln_1": "ln_attn", "ln_2": "ln_mlp"}
    linears = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj",
               "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}  # fmt: skip
    for i in range(c.n_layer):
        for hf_name, name in names.items():
            for p in ("weight", "bias"):
                state[f"transformer.h.{i}.{hf_name}.{p}"] = ours[f"blocks.{i}.{name}.{p}"]
        for hf_name, name in linears.items():
            state[f"transformer.h.{i}.{hf_name}.weight"] = ours[f"blocks.{i}.{name}.weight"].T
            state[f"transformer.h.{i}.{hf_name}.bias"] = ours[f"blocks.{i}.{name}.bias"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and "masked_bias" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def hf_run(hf, prompt: list[int], n: int, batch: int):
    input_ids = torch.tensor([prompt] * batch)
    attention_mask = torch.ones_like(input_ids)

    @torch.inference_mode()
    def run() -> list[int]:
        out = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    return run


def rolling_rows(quick: bool, repeats: int) -> list[dict]:
    """tok/s at 1 x and 8 x block_size new tokens, rotary (rolling) and learned positions."""
    shape = model_shapes()["shakespeare-char"]
    if quick:
        shape = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, bias=True)
    rows = []
    for position in ("rope", "learned"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**shape.to_dict(), "position": position})).eval()
        prompt = torch.randint(0, shape.vocab_size, (PROMPT_TOKENS,)).tolist()
        minigpt_run(model, prompt, 8, 1, True)()  # warm-up
        rates = {}
        for times in (1, 8):
            n = times * shape.block_size
            rates[times] = n / harness.best_of(minigpt_run(model, prompt, n, 1, True), repeats)
        rows.append({
            "position": position, "block_size": shape.block_size,
            "tokens_per_s_1x": rates[1], "tokens_per_s_8x": rates[8],
            "ratio_8x_over_1x": rates[8] / rates[1],
        })  # fmt: skip
        print(position, fmt(rates[1]), fmt(rates[8]), flush=True)
    return rows


def print_rolling(rows: list[dict]) -> None:
    block_size = rows[0]["block_size"]
    headers = ["positions (KV cache)", f"tok/s at {block_size} new tokens",
               f"tok/s at {8 * block_size}", "8x / 1x"]  # fmt: skip
    cells = [
        ["rope (rolling)" if r["position"] == "rope" else "learned (crop + prefill)",
         fmt(r["tokens_per_s_1x"]), fmt(r["tokens_per_s_8x"]), f"{r['ratio_8x_over_1x']:.2f}"]
        for r in rows
    ]  # fmt: skip
    print()
    harness.print_table(headers, cells, right={1, 2, 3})


# --- CPU decode: eager, compiled, int8 and Hugging Face at batch 1 ------------------

DRAM_BYTES = 2 * 2**30
"""The tensor the memory bandwidth is read from: 4 x a 480 MB L3 (as large as server
CPUs' come), so that almost every byte comes from DRAM."""

RSS_SCRIPT = """
import ctypes, gc, json, sys
import torch
from minigpt.model import GPT, GPTConfig
from minigpt.quantize import quantize_int8

def rss():  # bytes resident, after giving freed memory back to the system
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = open("/proc/self/status").read().split("VmRSS:")[1]
    return int(status.split()[0]) * 1024

# a first quantize_int8 loads what it needs once: part of the baseline, not the weights
quantize_int8(GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8)))
base = rss()
model = GPT(GPTConfig(**json.loads(sys.argv[1]))).eval().requires_grad_(False)
fp32 = rss() - base
quantize_int8(model)
print(json.dumps({"fp32": fp32, "int8": rss() - base}))
"""


def cpu_decode_shapes(quick: bool, tokens: int | None) -> list[tuple[str, GPTConfig, tuple]]:
    """(name, config, new-token counts): the default model within its block (no crop)
    and at 4 x block_size (cropped and prefilled again every block_size / 4 tokens);
    GPT-2 small within its block."""
    shapes = model_shapes()
    default, gpt2 = shapes["default (char)"], shapes["gpt2-small"]
    if quick:
        default = GPTConfig(
            vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=64, bias=True
        )
        gpt2 = GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=2, n_embd=64, bias=True)
    lengths = {
        "default (char)": (default.block_size - PROMPT_TOKENS, 4 * default.block_size),
        "gpt2-small": (32 if quick else 128,),
    }
    if tokens:
        lengths = {name: (tokens,) for name in lengths}
    return [("default (char)", default, lengths["default (char)"]),
            ("gpt2-small", gpt2, lengths["gpt2-small"])]  # fmt: skip


def decode_models(
    model: GPT, positions: int
) -> tuple[dict[str, tuple[GPT, bool]], dict[str, float], str]:
    """path -> (model, static_decode), with the seconds each compile took: eager
    float32, the compiled step, and a deep copy with int8 weights, compiled. Compiling
    happens here, ahead, for a generation reaching `positions` (the cache length it
    sets), so that no timed run pays for it; another length's cache is compiled in the
    untimed first run. A path that cannot run here (no C++ compiler, no torchao) is
    left out, with why."""
    paths, compile_s, skipped = {"eager": (model, False)}, {}, ""
    try:
        compile_s["compiled"] = compile_decode_step(model, 1, positions)
        paths["compiled"] = (model, True)
        int8 = quantize_int8(copy.deepcopy(model))
        compile_s["int8"] = compile_decode_step(int8, 1, positions)
        paths["int8"] = (int8, True)
    except MinigptError as err:
        skipped = str(err)
    return paths, compile_s, skipped


def timed_minigpt(model: GPT, prompt: list[int], n: int, static: bool):
    """A run -> (seconds, seconds to the first token, the greedy ids)."""

    def run() -> tuple[float, float, list[int]]:
        ids, first = [], 0.0
        started = time.perf_counter()
        for step in generate(model, prompt, n, temperature=0, static_decode=static):
            if not ids:
                first = time.perf_counter() - started  # prefill and one draw
            ids.append(step)
        return time.perf_counter() - started, first, torch.cat(ids).tolist()

    return run


def timed_hf(hf, prompt: list[int], n: int):
    """hf_run's generate, with the first token timed by a streamer: generate hands it
    the prompt, then each new token as soon as it is drawn."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.puts, self.at = 0, 0.0

        def put(self, value):
            self.puts += 1
            if self.puts == 2:  # the first new token
                self.at = time.perf_counter()

        def end(self):
            pass

    input_ids = torch.tensor([prompt])

    @torch.inference_mode()
    def run() -> tuple[float, float, list[int]]:
        clock = FirstToken()
        started = time.perf_counter()
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                          streamer=clock)  # fmt: skip
        return time.perf_counter() - started, clock.at - started, out[0, len(prompt) :].tolist()

    return run


def interleaved(runs: dict, repeats: int) -> dict[str, tuple[float, float, list[int]]]:
    """Each run once untimed, then repeats rounds of one of each in turn (every path sees
    the same machine load): path -> (best seconds, best first-token seconds, ids)."""
    best = {name: (float("inf"), float("inf"), run()[2]) for name, run in runs.items()}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds, first, ids = run()
            best[name] = (min(best[name][0], seconds), min(best[name][1], first), ids)
    return best


def read_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer's weight and bias (the
    LM head among them, whose matrix is also the tied token embedding: counted once;
    int8 counts its int8 data and its scales) and every norm's. Not the token and
    position tables, of which a step reads one row each."""
    tables = (torch.nn.Embedding, Int8Embedding)  # LearnedPositions is an nn.Embedding
    read = [m for m in model.modules() if not list(m.children()) and not isinstance(m, tables)]
    return weight_bytes(torch.nn.ModuleList(read))


def kv_bytes_per_token(model: GPT, n: int, static: bool) -> float:
    """Bytes of keys and values one decode step reads, on average over n new tokens: the
    static step reads all its cache's slots (the unwritten ones masked; the cache is as
    long as the generation needs, `static_cache_length`), an eager step the positions
    in its window (cropped every block_size / 4 tokens past block_size)."""
    one = model.new_kv_cache(1, max_len=1)
    per_position = sum(t.nbytes for t in [*one.keys, *one.values])
    block = model.config.block_size
    if static:
        return per_position * static_cache_length(block, PROMPT_TOKENS + n)
    seen, start, tokens = 0, 0, PROMPT_TOKENS
    for _ in range(n - 1):  # the first token is the prompt's, the last one is never run
        tokens += 1
        start = window_start(tokens, start, block, block // 4)
        seen += tokens - start
    return per_position * seen / max(1, n - 1)


def read_bandwidth(nbytes: int) -> float:
    """GB/s of torch.sum over nbytes of float32 (best of several, after a first touch)."""
    x = torch.ones(max(1, nbytes // 4))
    repeats = 5 if nbytes > 2**28 else 50
    return x.nbytes / harness.best_of(x.sum, repeats, warmup=1) / 1e9


def copy_bandwidth(nbytes: int) -> float:
    """GB/s of a copy of nbytes // 2 into as many (both the bytes read and written)."""
    src, dst = torch.ones(max(1, nbytes // 8)), torch.empty(max(1, nbytes // 8))
    return 2 * src.nbytes / harness.best_of(lambda: dst.copy_(src), 5, warmup=1) / 1e9


def resident_bytes(config: GPTConfig) -> dict | None:
    """The process's resident memory taken by a fresh model's weights in float32, and
    after quantize_int8, in a child process (Linux: /proc), over the same process
    before the model. None where it cannot be measured."""
    if not Path("/proc/self/status").exists():
        return None
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(config.to_dict())],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if done.returncode != 0:
        print("resident size not measured:", done.stderr.strip().splitlines()[-1:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_decode(quick: bool, repeats: int, tokens: int | None, only: list[str] | None,
               with_hf: bool) -> dict:  # fmt: skip
    """The CPU section: the machine's memory bandwidth; per shape and length every
    path's speed, interleaved; per shape its distance to the bandwidth bound (at its
    first length) and its resident size."""
    dram = 2**28 if quick else DRAM_BYTES  # a smoke run: a small tensor, a false figure
    memory = {"dram_bytes": dram, "read_gb_s": read_bandwidth(dram),
              "copy_gb_s": copy_bandwidth(dram)}  # fmt: skip
    print(f"memory: read {memory['read_gb_s']:.1f} GB/s, copy {memory['copy_gb_s']:.1f} GB/s",
          f"over {dram / 2**30:.2f} GiB", flush=True)  # fmt: skip
    speed, bound, resident = [], [], []
    for name, config, lengths in cpu_decode_shapes(quick, tokens):
        if only and not any(s in name for s in only):
            continue
        torch.manual_seed(0)
        model = GPT(config).eval()
        prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
        paths, compile_s, skipped = decode_models(model, PROMPT_TOKENS + lengths[0])
        if skipped:
            print(f"{name}: {', '.join(paths)} only: {skipped}")
        hf = to_hf(model) if with_hf else None
        for n in lengths:
            runs = {
                path: timed_minigpt(m, prompt, n, static) for path, (m, static) in paths.items()
            }
            if hf is not None and PROMPT_TOKENS + n <= config.block_size:  # learned positions
                runs["hf"] = timed_hf(hf, prompt, n)
            best = interleaved(runs, repeats)
            speed += speed_rows(name, config, n, best, compile_s)
            print(name, n, *(f"{p} {fmt_rate(n / b[0])}" for p, b in best.items()), flush=True)
            if n == lengths[0]:
                bound += bound_rows(name, n, paths, best, memory["read_gb_s"])
        resident.append(resident_row(name, config, paths))
    return {"memory": memory, "speed": speed, "bandwidth_bound": bound, "resident": resident}


def speed_rows(shape: str, config: GPTConfig, n: int, best: dict, compile_s: dict) -> list[dict]:
    """One row per path: tok/s (n / seconds, prefill included), the ratios, the first
    token, the compile, and how many greedy ids equal eager float32's."""
    eager_s, _, eager_ids = best["eager"]
    hf_s = best["hf"][0] if "hf" in best else None
    rows = []
    for path, (seconds, first, ids) in best.items():
        pairs = list(zip(ids, eager_ids, strict=True))
        rows.append({
            "shape": shape, "new_tokens": n, "crops": PROMPT_TOKENS + n > config.block_size,
            "path": path, "tokens_per_s": n / seconds, "first_token_ms": 1000 * first,
            "compile_s": compile_s.get(path), "x_eager": eager_s / seconds,
            "x_hf": hf_s / seconds if hf_s else None,
            "same_greedy_tokens": sum(a == b for a, b in pairs) / n,
            "same_greedy_prefix": next((i for i, (a, b) in enumerate(pairs) if a != b), n),
        })  # fmt: skip
    return rows


def bound_rows(shape: str, n: int, paths: dict, best: dict, dram_gb_s: float) -> list[dict]:
    """One row per path: the bytes a token reads (weights and KV cache), the bandwidth
    its tok/s makes of them, and the ceilings: tok/s if every byte came at the DRAM
    bandwidth, and at the bandwidth of reading that many bytes over and over (higher
    where they fit in the cache)."""
    rows, at_size = [], {}
    for path, (seconds, _, _) in best.items():
        # HF reads the same float32 weights, and a cache of the positions seen
        model, static = paths.get(path, (paths["eager"][0], False))
        weights, kv = read_bytes_per_token(model), kv_bytes_per_token(model, n, static)
        total, tokens_per_s = weights + kv, n / seconds
        size = round(total / 2**20)  # paths reading about as much share one measurement
        at_size[size] = at_size.get(size) or read_bandwidth(int(total))
        rows.append({
            "shape": shape, "new_tokens": n, "path": path,
            "weight_bytes_per_token": weights, "kv_bytes_per_token": round(kv),
            "tokens_per_s": tokens_per_s, "read_gb_s": total * tokens_per_s / 1e9,
            "ceiling_tokens_per_s": dram_gb_s * 1e9 / total,
            "of_ceiling": total * tokens_per_s / 1e9 / dram_gb_s,
            "read_gb_s_at_size": at_size[size],
            "ceiling_at_size_tokens_per_s": at_size[size] * 1e9 / total,
        })  # fmt: skip
    return rows


def resident_row(shape: str, config: GPTConfig, paths: dict) -> dict:
    """The weights' bytes in float32 and int8 (weight_bytes), and what a fresh process
    holds for each (resident_bytes)."""
    fp32 = weight_bytes(paths["eager"][0])
    int8 = weight_bytes(paths["int8"][0]) if "int8" in paths else None
    rss = resident_bytes(config) if int8 else None
    return {
        "shape": shape, "fp32_weight_bytes": fp32, "int8_weight_bytes": int8,
        "int8_over_fp32": int8 / fp32 if int8 else None,
        "rss_fp32_bytes": rss and rss["fp32"], "rss_int8_bytes": rss and rss["int8"],
    }  # fmt: skip


PATH_NAMES = {"eager": "eager float32", "compiled": "compiled float32",
              "int8": "int8, compiled", "hf": "HF generate float32"}  # fmt: skip


def print_cpu_decode(result: dict, hf_version: str | None) -> None:
    memory = result["memory"]
    print(f"\nbatch 1, greedy, {PROMPT_TOKENS}-token prompt; HF: transformers {hf_version}")
    headers = ["shape", "new tokens", "path", "tok/s", "x eager", "x HF", "first token ms",
               "compile s", "same greedy ids as eager"]  # fmt: skip
    cells = [
        [r["shape"], f"{r['new_tokens']}{' (crops)' if r['crops'] else ''}",
         PATH_NAMES[r["path"]], fmt_rate(r["tokens_per_s"]), f"{r['x_eager']:.2f}x",
         f"{r['x_hf']:.2f}x" if r["x_hf"] else "-", f"{r['first_token_ms']:,.1f}",
         f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-",
         f"{r['same_greedy_tokens']:.0%} (first {r['same_greedy_prefix']})"]
        for r in result["speed"]
    ]  # fmt: skip
    harness.print_table(headers, cells, right={1, 3, 4, 5, 6, 7, 8})
    print(f"\nread bandwidth {memory['read_gb_s']:.1f} GB/s (torch.sum over"
          f" {memory['dram_bytes'] / 2**30:.2f} GiB); copy {memory['copy_gb_s']:.1f} GB/s")  # fmt: skip
    headers = ["shape", "path", "weights MB/token", "KV MB/token", "tok/s", "GB/s read",
               "of DRAM bandwidth", "ceiling tok/s (DRAM)", "ceiling tok/s (at its size)"]  # fmt: skip
    cells = [
        [r["shape"], PATH_NAMES[r["path"]], f"{r['weight_bytes_per_token'] / 1e6:,.1f}",
         f"{r['kv_bytes_per_token'] / 1e6:,.1f}", fmt_rate(r["tokens_per_s"]),
         f"{r['read_gb_s']:.1f}", f"{r['of_ceiling']:.0%}", fmt_rate(r["ceiling_tokens_per_s"]),
         fmt_rate(r["ceiling_at_size_tokens_per_s"])]
        for r in result["bandwidth_bound"]
    ]  # fmt: skip
    harness.print_table(headers, cells, right=set(range(2, 9)))
    print()
    headers = ["shape", "float32 weights MB", "int8 weights MB", "int8 / float32",
               "resident float32 MB", "resident int8 MB"]  # fmt: skip
    mb = lambda b: f"{b / 1e6:,.1f}" if b else "-"  # noqa: E731
    cells = [
        [r["shape"], mb(r["fp32_weight_bytes"]), mb(r["int8_weight_bytes"]),
         f"{r['int8_over_fp32']:.0%}" if r["int8_over_fp32"] else "-",
         mb(r["rss_fp32_bytes"]), mb(r["rss_int8_bytes"])]
        for r in result["resident"]
    ]  # fmt: skip
    harness.print_table(headers, cells, right=set(range(1, 6)))


def fmt_rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def fmt(value: float | None) -> str:
    return "skipped" if value is None else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="32 new tokens, one repeat")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--max-seconds", type=float, default=180.0,
                        help="skip a cell (one run) estimated to take longer")  # fmt: skip
    parser.add_argument("--hf-tokens", type=int, default=512,
                        help="most new tokens in the Hugging Face comparison")  # fmt: skip
    parser.add_argument("--shapes", nargs="*", default=None, help="subset of the shape names")
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/generate.json)"
    )
    parser.add_argument("--rolling-only", action="store_true", help="only the rolling-cache table")
    parser.add_argument("--cpu-decode-only", action="store_true",
                        help="only the CPU decode tables (eager, compiled, int8, HF)")  # fmt: skip
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="new tokens of every CPU decode run (default: per shape)")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = (32,) if args.quick else (128, 512, 2048)
    repeats = 1 if args.quick else args.repeats
    max_seconds = 5.0 if args.quick else args.max_seconds
    hf_tokens = 32 if args.quick else args.hf_tokens
    name = "generate-quick.json" if args.quick else "generate.json"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / name
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
        print("transformers is not installed: the Hugging Face column is skipped "
              "(pip install 'minigpt[bench]')")  # fmt: skip

    if args.cpu_decode_only:
        decode = cpu_decode(args.quick, repeats, args.decode_tokens, args.shapes, bool(hf_version))
        print_cpu_decode(decode, hf_version)
        if not args.out:
            out = out.with_name(out.name.replace("generate", "generate-cpu-decode"))
        harness.write_json(
            out, {"meta": harness.machine(transformers=hf_version), "cpu_decode": decode}
        )
        print(f"\nwrote {out}")
        return
    rolling = rolling_rows(args.quick, repeats)
    if args.rolling_only:
        print_rolling(rolling)
        harness.write_json(out, {"rolling": rolling})
        print(f"\nwrote {out}")
        return
    shapes = model_shapes()
    if args.quick and not args.shapes:
        shapes.pop("gpt2-small")  # a smoke run: the two small shapes
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if any(s in k for s in args.shapes)}
    cache_rows, hf_rows = [], []
    for shape_name, config in shapes.items():
        torch.manual_seed(0)
        model = GPT(config).eval()
        prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
        hf = to_hf(model) if hf_version else None
        for batch in (1, 8):
            minigpt_run(model, prompt, 8, batch, True)()  # warm-up
            seconds_per_step = 0.0
            for n in lengths:
                if seconds_per_step * n > max_seconds:
                    print(shape_name, batch, n, "skipped: est.", round(seconds_per_step * n), "s")
                    continue
                run = minigpt_run(model, prompt, n, batch, True)
                cached = harness.best_of(run, repeats if seconds_per_step * n < 10 else 1)
                seconds_per_step = cached / n
                estimate = recompute_estimate(model, batch, n)
                recomputed = None
                if estimate <= max_seconds:
                    recomputed = harness.best_of(minigpt_run(model, prompt, n, batch, False), 1)
                row = {
                    "shape": shape_name, "batch": batch, "new_tokens": n,
                    "cache_tokens_per_s": batch * n / cached,
                    "recompute_tokens_per_s": batch * n / recomputed if recomputed else None,
                    "speedup": recomputed / cached if recomputed else None,
                    "recompute_estimate_s": round(estimate, 2),
                }  # fmt: skip
                cache_rows.append(row)
                print(shape_name, batch, n, fmt(row["cache_tokens_per_s"]),
                      fmt(row["recompute_tokens_per_s"]), flush=True)  # fmt: skip
            if hf is not None:
                n = min(config.block_size - PROMPT_TOKENS, hf_tokens)
                ours_run, theirs_run = (
                    minigpt_run(model, prompt, n, batch, True),
                    hf_run(hf, prompt, n, batch),
                )
                theirs_run()  # warm-up
                ours_s = theirs_s = float("inf")
                for _ in range(repeats):  # interleaved, so both see the same machine load
                    ours_s = min(ours_s, harness.best_of(ours_run, 1))
                    theirs_s = min(theirs_s, harness.best_of(theirs_run, 1))
                ours_ids, theirs_ids = ours_run(), theirs_run()
                same = sum(a == b for a, b in zip(ours_ids, theirs_ids, strict=True)) / n
                hf_rows.append({
                    "shape": shape_name, "batch": batch, "new_tokens": n,
                    "minigpt_tokens_per_s": batch * n / ours_s,
                    "hf_tokens_per_s": batch * n / theirs_s,
                    "ratio": theirs_s / ours_s,
                    "same_greedy_tokens": round(same, 3),
                })  # fmt: skip
                print(shape_name, batch, n, "hf", fmt(batch * n / theirs_s), flush=True)

    print()
    headers = ["shape", "batch", "new tokens", "KV cache tok/s", "recompute tok/s", "speedup"]
    cells = [
        [r["shape"], r["batch"], r["new_tokens"], fmt(r["cache_tokens_per_s"]),
         fmt(r["recompute_tokens_per_s"]), f"{r['speedup']:.1f}x" if r["speedup"] else "-"]
        for r in cache_rows
    ]  # fmt: skip
    harness.print_table(headers, cells, right={1, 2, 3, 4, 5})
    if hf_rows:
        print()
        headers = ["shape", "batch", "new tokens", "minigpt tok/s",
                   f"HF transformers {hf_version} tok/s", "minigpt / HF", "same greedy tokens"]  # fmt: skip
        cells = [
            [r["shape"], r["batch"], r["new_tokens"], fmt(r["minigpt_tokens_per_s"]),
             fmt(r["hf_tokens_per_s"]), f"{r['ratio']:.2f}x", f"{r['same_greedy_tokens']:.0%}"]
            for r in hf_rows
        ]  # fmt: skip
        harness.print_table(headers, cells, right={1, 2, 3, 4, 5, 6})
    print_rolling(rolling)
    decode = cpu_decode(args.quick, repeats, args.decode_tokens, args.shapes, bool(hf_version))
    print_cpu_decode(decode, hf_version)
    meta = {
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "transformers": hf_version, "machine": platform.machine(), "processor": harness.cpu_name(),
        "python": platform.python_version(), "quick": args.quick, "repeats": repeats,
        "prompt_tokens": PROMPT_TOKENS, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    results = {"meta": meta, "kv_cache": cache_rows, "vs_hf": hf_rows, "rolling": rolling,
               "cpu_decode": decode}  # fmt: skip
    harness.write_json(out, results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
