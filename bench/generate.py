"""Sampling speed: tokens/s with and without the KV cache, and against Hugging Face.

    python bench/generate.py                 # the full table (minutes on a laptop CPU)
    python bench/generate.py --quick         # a smoke run: 32 tokens, small shapes, one repeat
    python bench/generate.py --threads 1 --max-seconds 30

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

Prints markdown tables and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import platform
import time
import tomllib
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import torch

from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig

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
    meta = {
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "transformers": hf_version, "machine": platform.machine(), "processor": harness.cpu_name(),
        "python": platform.python_version(), "quick": args.quick, "repeats": repeats,
        "prompt_tokens": PROMPT_TOKENS, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    results = {"meta": meta, "kv_cache": cache_rows, "vs_hf": hf_rows, "rolling": rolling}
    harness.write_json(out, results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
