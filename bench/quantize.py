"""Int8 fidelity: how close a trained run's int8 weights stay to its float32 ones.

    python bench/quantize.py RUN [RUN ...]
    python bench/quantize.py RUN --data FILE          # eval loss on other text
    python bench/quantize.py RUN --val-of PREPARED    # on a prepared folder's validation split

Each run is loaded on the CPU as `minigpt generate` loads it: in float32, with
`--quantize int8` (torchao weight-only int8, bfloat16 inputs to the int8 linears,
float32 around them; minigpt/quantize.py), and with `--dtype bfloat16` as a
reference. It measures:

- eval loss: what `minigpt eval RUN` computes (minigpt.evaluate: strided windows over
  the run's own validation split, or over --data), in float32 and in int8, and the
  relative difference (int8 - float32) / float32. The target: within 1%.
- greedy text: for every prompt of --prompts (one a line), --tokens greedy tokens in
  float32 (the eager decode loop) and in int8 (the compiled static step, which is how
  `generate --quantize int8` samples). Reported: the share of prompts whose first 20
  tokens are the same in both, and the mean number of equal leading tokens. Once two
  texts differ they go separate ways, so the leading run is what is comparable.
- what bounds the greedy figure: the same share for the weights in bfloat16 (eager,
  no int8), the rounding an int8 model's bfloat16 arithmetic brings without int8's;
  and the median of float32's lead of its best next token over its second where the
  int8 text first differs (in logits: a small lead is a near tie, which any rounding
  may tip).
- the weights' bytes in memory, float32 and int8.

GPT-2 small: import it (from the hub, or a local Hugging Face folder), prepare tiny
shakespeare in GPT-2's tokens, and give the prepared folder (the path `prepare` prints):

    minigpt import gpt2 --out checkpoints/gpt2
    minigpt prepare shakespeare --tokenizer gpt2
    python bench/quantize.py checkpoints/gpt2 --val-of data/<the folder prepare made>

Prints a markdown table and writes bench/results/quantize.json (with every prompt's
two texts).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import torch

from minigpt.checkpoint import Run
from minigpt.data import load_prepared
from minigpt.errors import MinigptError
from minigpt.evaluate import Evaluation, evaluate_run, evaluate_tokens
from minigpt.generate import encode_prompt, generate
from minigpt.inference import load_for_inference
from minigpt.prompts import read_prompts_file

ROOT = Path(__file__).resolve().parents[1]
COMPARED = 20
"""The leading greedy tokens that must be equal for a prompt to count as the same text."""


def evaluation(run: Run, args: argparse.Namespace) -> Evaluation:
    """The run's loss as `minigpt eval` computes it, or on --val-of's validation split."""
    if args.val_of is None:
        return evaluate_run(run, args.data, args.stride)
    prepared = load_prepared(args.val_of)
    sample = "To be, or not to be: that is the question.\n"
    if prepared.tokenizer.encode(sample) != run.tokenizer.encode(sample):
        raise MinigptError(
            f"{args.val_of} was tokenised by another tokenizer than {run.dir}'s",
            hint="prepare the text with the run's tokenizer (for GPT-2: --tokenizer gpt2)",
        )
    source = f"validation split of {prepared.dir}"
    return evaluate_tokens(run.model, run.tokenizer, prepared.val_tokens(), args.stride, source)


def greedy(run: Run, prompt_ids: list[int], n: int, static_decode: bool) -> list[int]:
    """n greedy token ids after the prompt, drawn only from the tokenizer's ids."""
    steps = generate(
        run.model,
        prompt_ids,
        n,
        temperature=0,
        static_decode=static_decode,
        vocab_limit=run.tokenizer.vocab_size,
    )
    return torch.cat(list(steps)).tolist()


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many tokens a and b share before they first differ."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.inference_mode()
def margin(run: Run, context: list[int]) -> float | None:
    """float32's lead of its best next token over its second after `context`: how near
    a tie the token was where the int8 text first went another way (None past
    block_size, where generation's windows are not one forward pass)."""
    if len(context) > run.model.config.block_size:
        return None
    logits, _ = run.model(torch.tensor([context]), last_only=True)  # (1, 1, V)
    best, second = logits[0, -1, : run.tokenizer.vocab_size].float().topk(2).values
    return float(best - second)


def compare_texts(runs: dict[str, Run], prompts: list[str], n: int) -> list[dict]:
    """Each prompt's greedy texts: float32 (eager), int8 (compiled static step) and
    bfloat16 (eager, no int8): how many leading tokens int8's and bfloat16's share
    with float32's, and float32's margin where int8's first differs."""
    tokenizer, block_size = runs["float32"].tokenizer, runs["float32"].model.config.block_size
    texts = []
    for prompt in prompts:
        ids, _ = encode_prompt(tokenizer, prompt, block_size)
        fp32 = greedy(runs["float32"], ids, n, static_decode=False)
        int8 = greedy(runs["int8"], ids, n, static_decode=True)
        bf16 = greedy(runs["bfloat16"], ids, n, static_decode=False)
        equal = leading_equal(fp32, int8)
        texts.append(
            {
                "prompt": prompt,
                "equal_leading": equal,
                "bf16_equal_leading": leading_equal(fp32, bf16),
                "margin_at_first_difference": (
                    margin(runs["float32"], ids + fp32[:equal]) if equal < n else None
                ),
                "float32": tokenizer.decode(fp32),
                "int8": tokenizer.decode(int8),
            }
        )
    return texts


def bench_run(run_dir: str, prompts: list[str], args: argparse.Namespace) -> dict:
    """Eval loss and greedy texts of one run, float32 against int8."""
    fp32 = load_for_inference(run_dir, "cpu")  # eager float32
    # compiled on first use, for each prompt length's cache (nothing here is timed)
    int8 = load_for_inference(run_dir, "cpu", quantize="int8", compile_step=True)
    bf16 = load_for_inference(run_dir, "cpu", dtype="bfloat16")
    started = time.perf_counter()
    loss_fp32, loss_int8 = evaluation(fp32.run, args), evaluation(int8.run, args)
    eval_seconds = time.perf_counter() - started
    runs = {"float32": fp32.run, "int8": int8.run, "bfloat16": bf16.run}
    texts = compare_texts(runs, prompts, args.tokens)
    equal = [t["equal_leading"] for t in texts]
    bf16_equal = [t["bf16_equal_leading"] for t in texts]
    margins = sorted(
        t["margin_at_first_difference"]
        for t in texts
        if t["margin_at_first_difference"] is not None
    )
    return {
        "run": run_dir,
        "model": fp32.run.model.config.describe(),
        "eval_source": loss_fp32.source,
        "eval_tokens": loss_fp32.tokens,
        "loss_float32": loss_fp32.loss,
        "loss_int8": loss_int8.loss,
        "loss_relative_diff": (loss_int8.loss - loss_fp32.loss) / loss_fp32.loss,
        "eval_seconds": eval_seconds,
        "prompts": len(prompts),
        "greedy_tokens": args.tokens,
        "same_first_20_share": sum(e >= COMPARED for e in equal) / len(equal),
        "mean_equal_leading": sum(equal) / len(equal),
        "bf16_same_first_20_share": sum(e >= COMPARED for e in bf16_equal) / len(bf16_equal),
        "median_margin_at_first_difference": margins[len(margins) // 2] if margins else None,
        "weight_bytes_float32": fp32.weight_bytes,
        "weight_bytes_int8": int8.weight_bytes,
        "texts": texts,
    }


def table(results: list[dict]) -> None:
    rows = [
        [
            r["run"],
            f"{r['loss_float32']:.4f}",
            f"{r['loss_int8']:.4f}",
            f"{r['loss_relative_diff']:+.3%}",
            f"{r['same_first_20_share']:.0%}",
            f"{r['mean_equal_leading']:.1f} / {r['greedy_tokens']}",
            f"{r['bf16_same_first_20_share']:.0%}",
            "-"
            if r["median_margin_at_first_difference"] is None
            else f"{r['median_margin_at_first_difference']:.3f}",
            f"{r['weight_bytes_float32'] / 1e6:,.1f}",
            f"{r['weight_bytes_int8'] / 1e6:,.1f} ({r['weight_bytes_int8'] / r['weight_bytes_float32']:.0%})",
        ]
        for r in results
    ]
    headers = [
        "run",
        "eval loss fp32",
        "int8",
        "rel. diff",
        f"first {COMPARED} equal",
        "equal leading",
        f"bf16: first {COMPARED} equal",
        "fp32 margin at 1st diff.",
        "MB fp32",
        "MB int8",
    ]
    harness.print_table(headers, rows, right=range(1, len(headers)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Int8 fidelity of trained runs: eval loss and greedy text, float32 vs int8."
    )
    parser.add_argument("runs", nargs="+", help="run directories (trained, or imported GPT-2)")
    parser.add_argument(
        "--prompts",
        default=str(ROOT / "bench" / "prompts" / "int8.txt"),
        help="prompts file, one a line (default: bench/prompts/int8.txt)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=32,
        help=f"greedy tokens per prompt (at least {COMPARED}; default 32)",
    )
    parser.add_argument(
        "--data", help="evaluate on this text instead of each run's validation split"
    )
    parser.add_argument("--val-of", help="evaluate on this prepared folder's validation split")
    parser.add_argument("--stride", type=int, help="eval window stride (default block_size / 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = parser.parse_args()
    if args.tokens < COMPARED:
        parser.error(f"--tokens must be at least {COMPARED}")
    if args.data and args.val_of:
        parser.error("give --data or --val-of, not both")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prompts = read_prompts_file(args.prompts)
        results = []
        for run_dir in args.runs:
            results.append(bench_run(run_dir, prompts, args))
            print(f"{run_dir}: done", flush=True)
    except MinigptError as err:  # bad input: one sentence and its hint, as minigpt says it
        sys.exit(f"error: {err}\n  {err.hint or ''}")
    table(results)
    path = harness.write_json(args.out, {"machine": harness.machine(), "runs": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
