"""minigpt against Hugging Face transformers on GPT-2 small's shape, side by side.

    python bench/hf.py                        # the full table (minutes)
    python bench/hf.py --quick                # a smoke run: few tokens, one repeat
    python bench/hf.py --threads 2 --new-tokens 128 --eval-tokens 8192 --repeats 5

A GPT-2 with GPT-2 small's exact shape (transformers.GPT2Config() defaults: 12
layers, 12 heads, 768 wide, 1024 positions, vocab 50257, gelu_new) and random
weights (seeded: GPT-2's init with the blocks' matrices scaled up, see BLOCK_SCALE,
plus random biases and LayerNorm gains so a dropped bias or a misplaced transpose
would show) is saved with `save_pretrained` into a temporary folder, with a small
GPT-2-format vocab.json + merges.txt learned from tiny shakespeare
(tests/gpt2_files.py; its ids are fewer than the model's 50257, and <|endoftext|>
is the config's bos/eos). Then, in this one process, with the same threads, each
measurement warmed up on both sides first and repeated interleaved (minigpt,
transformers, minigpt, ...), the median reported, in the order 1, 3, 2, 4:

1. import: `minigpt import` of the folder (hf.import_checkpoint: read, convert,
   write a run directory) against transformers reading the same folder and writing
   it again (GPT2LMHeadModel + GPT2TokenizerFast from_pretrained, save_pretrained;
   transformers 5 maps the safetensors file rather than reading it, and checks no
   values, where minigpt reads, transposes and checks every weight for NaN/inf).
   Then the largest |logit difference| between the imported model and
   GPT2LMHeadModel on one full 1024-token context of random ids (fp32).
2. greedy decoding with the KV cache: minigpt's `generate(temperature=0)` against
   `GPT2LMHeadModel.generate(do_sample=False, use_cache=True)`, batch 1, a 32-token
   prompt, --new-tokens new tokens (eos off on both sides, so every run has them
   all), at 1 thread and at --threads; tokens/s and whether the ids are the same.
3. perplexity: minigpt's `evaluate_tokens` (stride 512, block 1024) against the
   Hugging Face perplexity guide's strided loop on GPT2LMHeadModel, over the first
   --eval-tokens tokens of ../shared/data/tinyshakespeare/input.txt (random ids if
   it is not there); predicted tokens/s and both losses. Warmed up by one window
   each, after the full-context forwards of 1. The guide's code weights
   each window's mean loss by its labels minus one, which is one too few for every
   window after the first; the loss compared weights each window by the labels it
   really scores (the guide's own weighting is in the JSON too).
4. export: `minigpt export` of the imported run (hf.export_run) against the same
   transformers read-and-write as in 1, and the largest |logit difference| of
   AutoModelForCausalLM.from_pretrained(export) against the source model.

The ratio column is minigpt's speed over transformers' (>1: minigpt is faster).
Both sides write to the same disk; minigpt fsyncs each file before renaming it
into place (minigpt/atomic.py), transformers does not.

Needs `pip install transformers` (the `bench` extra). Downloads nothing.
Prints a markdown table and writes bench/results/hf.json (--json-out).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import numpy as np
import torch

from minigpt import hf as minigpt_hf
from minigpt.checkpoint import load_run
from minigpt.evaluate import evaluate_tokens
from minigpt.generate import generate

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PROMPT_TOKENS = 32
STRIDE = 512
VOCAB_CHARS = 64_000  # the text the vocabulary's merges are learned from
WARMUP_TOKENS = 8
BLOCK_SCALE = 4.0
"""The blocks' matrices are GPT-2's init times this: at 1x the tied embedding decides
every next token (greedy decoding repeats one id), at 4x the blocks do (tens of
different ids in 128), so comparing greedy ids means something. Speed is the same."""


def _tests_conftest():
    """tests/conftest.py as a module: its offline GPT-2 vocabulary builder."""
    spec = importlib.util.spec_from_file_location(
        "minigpt_tests_conftest", ROOT / "tests" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _tests_conftest()
CORPUS, write_gpt2_vocab = _conftest.GPT2_CORPUS, _conftest.write_gpt2_vocab

# --------------------------------------------------------------------------- helpers


def interleaved(
    ours: Callable[[], object],
    theirs: Callable[[], object],
    repeats: int,
    label: str,
    warmups: tuple[Callable[[], object], Callable[[], object]] | None = None,
    cleanup: Callable[[], object] | None = None,
) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` runs of each, alternating, after a warm-up of each (by
    default one untimed run); `cleanup` runs, untimed, after every run."""
    for fn in warmups or (ours, theirs):
        fn()
        if cleanup:
            cleanup()
    ours_s, theirs_s = [], []
    for i in range(repeats):
        for fn, times in ((ours, ours_s), (theirs, theirs_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            if cleanup:
                cleanup()
        print(f"  {label} {i + 1}/{repeats}: minigpt {ours_s[-1]:.2f} s, "
              f"transformers {theirs_s[-1]:.2f} s", flush=True)  # fmt: skip
    return ours_s, theirs_s


def remover(*folders: Path) -> Callable[[], None]:
    """Removes the folders a timed run wrote, so that the next one starts from none."""

    def remove() -> None:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    return remove


# --------------------------------------------------------------------------- the checkpoint


def write_checkpoint(folder: Path, seed: int, vocab_text: str, merges: int):
    """GPT-2 small's shape, random weights, a small vocab; returns (tokenizer vocab
    size, the GPT2Config)."""
    import transformers

    vocab_size = write_gpt2_vocab(folder, vocab_text, n_merges=merges)
    eot = vocab_size - 1  # write_gpt2_vocab puts <|endoftext|> last
    config = transformers.GPT2Config(bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(".bias"):
                param.copy_(0.02 * noise)
            elif ".ln_" in name or "ln_f" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif ".h." in name:  # a block's matrix
                param.mul_(BLOCK_SCALE)
    model.save_pretrained(folder)
    return vocab_size, config


def hf_read_write(folder: Path, out: Path) -> None:
    """transformers' counterpart of import/export: read the checkpoint, write it again."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    model.save_pretrained(out)
    transformers.GPT2TokenizerFast.from_pretrained(folder).save_pretrained(out)


# --------------------------------------------------------------------------- evaluation


def guide_loss(model, ids: torch.Tensor, max_length: int, stride: int) -> dict:
    """The Hugging Face perplexity guide's strided loop
    (https://huggingface.co/docs/transformers/perplexity) on ids (1, N): the mean NLL
    over the labels each window scores, and the guide's own weighting (its valid
    labels - 1 per window)."""
    seq_len = ids.size(1)
    nll_sum = guide_sum = 0.0
    n_tokens = guide_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss.item()
        scored = int((target_ids[:, 1:] != -100).sum())  # the labels the shifted loss uses
        num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)  # the guide's
        nll_sum += neg_log_likelihood * scored
        n_tokens += scored
        guide_sum += neg_log_likelihood * num_loss_tokens
        guide_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return {
        "loss": nll_sum / n_tokens,
        "tokens": n_tokens,
        "guide_weighted_loss": guide_sum / guide_tokens,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 new tokens, 1536 eval tokens, 1 repeat")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for everything but the 1-thread decoding "
                        "(default: torch's)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="greedy tokens after the 32-token prompt (default 128)")  # fmt: skip
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="tokens of text to evaluate (default 8192)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per side, after a warm-up; the median is reported "
                        "(default 3)")  # fmt: skip
    parser.add_argument("--merges", type=int, default=200,
                        help="BPE merges of the small vocab (its size: merges + 257)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=str(ROOT / "bench" / "results" / "hf.json"),
                        help="JSON path (default bench/results/hf.json)")  # fmt: skip
    args = parser.parse_args()
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    eval_tokens = args.eval_tokens or (1536 if args.quick else 8192)
    repeats = args.repeats or (1 if args.quick else 3)
    if not 1 <= new_tokens <= 1024 - PROMPT_TOKENS:
        parser.error(f"--new-tokens must be 1 to {1024 - PROMPT_TOKENS} (GPT-2's 1024 positions)")
    if eval_tokens < 2:
        parser.error("--eval-tokens must be at least 2")
    if repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be at least 1")

    try:
        import transformers
    except ImportError:
        sys.exit("bench/hf.py compares with transformers: pip install 'minigpt[bench]'")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    began = time.perf_counter()
    rows: list[dict] = []
    details: dict = {}
    loads: dict[str, float] = {"start": os.getloadavg()[0]}  # other work on the machine

    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.exists() else None
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-hf-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "gpt2"
        start = time.perf_counter()
        vocab_size, config = write_checkpoint(
            folder, args.seed, text[:VOCAB_CHARS] if text else CORPUS, args.merges
        )
        details["checkpoint"] = {
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_positions": config.n_positions, "vocab_size": config.vocab_size,
            "tokenizer_vocab_size": vocab_size, "activation": config.activation_function,
            "weights_bytes": (folder / "model.safetensors").stat().st_size,
            "seconds_to_build": round(time.perf_counter() - start, 2),
        }  # fmt: skip
        print(f"GPT-2 small, random weights, tokenizer of {vocab_size} ids: {folder} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        details["hf_attn_implementation"] = hf_model.config._attn_implementation

        # 1. import ------------------------------------------------------------------
        loads["import"] = os.getloadavg()[0]
        print(f"import: {repeats} runs per side ({threads} threads)", flush=True)
        run_dir = tmp / "run"
        ours_out, theirs_out = tmp / "imported", tmp / "hf-copy"
        ours_s, theirs_s = interleaved(
            lambda: minigpt_hf.import_checkpoint(str(folder), ours_out),
            lambda: hf_read_write(folder, theirs_out),
            repeats,
            "import",
            cleanup=remover(ours_out, theirs_out),
        )
        minigpt_hf.import_checkpoint(str(folder), run_dir)
        rows.append(time_row("import (s): minigpt import vs from_pretrained + save_pretrained",
                             ours_s, theirs_s))  # fmt: skip
        run = load_run(run_dir)
        model, tokenizer = run.model, run.tokenizer
        assert tokenizer.vocab_size == vocab_size and tokenizer.eot_id == vocab_size - 1

        # the logits at a full context ------------------------------------------------
        rng = np.random.default_rng(args.seed)
        context = torch.tensor(rng.integers(0, config.vocab_size, config.n_positions))[None]
        with torch.inference_mode():
            ours_logits = model(context)[0][0]
            theirs_logits = hf_model(context).logits[0]
        logit_diff = (ours_logits - theirs_logits).abs().max().item()
        details["logits"] = {
            "tokens": config.n_positions, "max_abs_diff": logit_diff,
            "max_abs_logit": theirs_logits.abs().max().item(),
        }  # fmt: skip
        rows.append({"metric": f"max |logit diff|, import vs GPT2LMHeadModel, {config.n_positions} tokens",
                     "minigpt": fmt_diff(logit_diff), "transformers": "reference", "ratio": ""})  # fmt: skip
        print(f"logits: max |diff| {logit_diff:.2e}", flush=True)

        # 3. perplexity (right after the full-context forwards, which warmed both up) --
        if text is not None:
            eval_text = text[: 8 * eval_tokens]  # 8 characters a token: plenty
            eval_ids = tokenizer.encode(eval_text)
            if len(eval_ids) < eval_tokens:
                eval_text = text
                eval_ids = tokenizer.encode(eval_text)
            hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(folder)
            same = hf_tokenizer(eval_text)["input_ids"] == eval_ids
            details["tokenizer_same_ids_on_eval_text"] = same
            eval_ids = eval_ids[:eval_tokens]
            source = f"{len(eval_ids)} tokens of tiny shakespeare"
        else:
            eval_ids = rng.integers(0, vocab_size, eval_tokens).tolist()
            source = f"{len(eval_ids)} random ids"
        eval_tensor = torch.tensor(eval_ids)[None]
        loads["eval"] = os.getloadavg()[0]
        print(f"eval: {source}, stride {STRIDE}, {repeats} runs per side", flush=True)
        results: dict = {}

        def ours_eval() -> None:
            results["ours"] = evaluate_tokens(model, tokenizer, np.array(eval_ids), stride=STRIDE)

        def theirs_eval() -> None:
            results["theirs"] = guide_loss(hf_model, eval_tensor, config.n_positions, STRIDE)

        # warm-up: one full window each (the logits check above ran one too)
        warm_ids = eval_ids[: config.n_positions]
        warmups = (
            lambda: evaluate_tokens(model, tokenizer, np.array(warm_ids), stride=STRIDE),
            lambda: guide_loss(hf_model, torch.tensor(warm_ids)[None], config.n_positions, STRIDE),
        )
        ours_s, theirs_s = interleaved(ours_eval, theirs_eval, repeats, "eval", warmups=warmups)
        ours_eval_result, theirs_eval_result = results["ours"], results["theirs"]
        details["eval_warmup_tokens"] = len(warm_ids)
        assert ours_eval_result.tokens == theirs_eval_result["tokens"]
        predicted = ours_eval_result.tokens
        rows.append(rate_row(f"eval tokens/s ({source}, stride {STRIDE}, block 1024)",
                             predicted, ours_s, theirs_s))  # fmt: skip
        loss_diff = abs(ours_eval_result.loss - theirs_eval_result["loss"])
        rows.append({"metric": "eval loss (nats/token); ratio column: |difference|",
                     "minigpt": f"{ours_eval_result.loss:.6f}",
                     "transformers": f"{theirs_eval_result['loss']:.6f}",
                     "ratio": fmt_diff(loss_diff)})  # fmt: skip
        details["eval"] = {
            "source": source, "stride": STRIDE, "block_size": config.n_positions,
            "input_tokens": len(eval_ids), "predicted_tokens": predicted,
            "windows": ours_eval_result.windows, "minigpt_loss": ours_eval_result.loss,
            "transformers_loss": theirs_eval_result["loss"],
            "transformers_guide_weighted_loss": theirs_eval_result["guide_weighted_loss"],
            "abs_loss_diff": loss_diff, "within_1e-4": loss_diff < 1e-4,
        }  # fmt: skip

        # 2. greedy decoding ----------------------------------------------------------
        prompt = (eval_ids[:PROMPT_TOKENS] if len(eval_ids) >= PROMPT_TOKENS else
                  rng.integers(0, vocab_size, PROMPT_TOKENS).tolist())  # fmt: skip
        details["generate"] = []
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            loads[f"generate, {n_threads} thread(s)"] = os.getloadavg()[0]
            print(f"generate: {new_tokens} new tokens, {n_threads} thread(s), "
                  f"{repeats} runs per side", flush=True)  # fmt: skip
            ours_run = greedy_minigpt(model, prompt)
            theirs_run = greedy_hf(hf_model, prompt, vocab_size - 1)
            ids: dict = {}
            ours_s, theirs_s = interleaved(
                lambda: ids.__setitem__("ours", ours_run(new_tokens)),  # noqa: B023
                lambda: ids.__setitem__("theirs", theirs_run(new_tokens)),  # noqa: B023
                repeats,
                "generate",
                warmups=(lambda: ours_run(WARMUP_TOKENS), lambda: theirs_run(WARMUP_TOKENS)),  # noqa: B023
            )
            ours_ids, theirs_ids = ids["ours"], ids["theirs"]
            assert len(ours_ids) == len(theirs_ids) == new_tokens
            agree = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids, strict=True))
                          if a != b), new_tokens)  # fmt: skip
            row = rate_row(f"greedy decode tokens/s, KV cache, batch 1, {n_threads} thread(s)",
                           new_tokens, ours_s, theirs_s)  # fmt: skip
            rows.append(row)
            rows.append({"metric": f"  same greedy ids ({n_threads} thread(s))",
                         "minigpt": (f"yes ({len(set(ours_ids))} distinct ids)" if agree == new_tokens
                                     else f"NO: the first {agree} agree"),
                         "transformers": f"{new_tokens} tokens", "ratio": ""})  # fmt: skip
            details["generate"].append({
                "threads": n_threads, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens,
                "same_ids": agree == new_tokens, "agreeing_prefix": agree,
                "distinct_ids": len(set(ours_ids)), "minigpt_ids": ours_ids,
                "transformers_ids": theirs_ids,
            })  # fmt: skip
        torch.set_num_threads(threads)

        # 4. export -------------------------------------------------------------------
        loads["export"] = os.getloadavg()[0]
        print(f"export: {repeats} runs per side", flush=True)
        ours_out, theirs_out = tmp / "exported-timed", tmp / "hf-copy"
        ours_s, theirs_s = interleaved(
            lambda: minigpt_hf.export_run(run_dir, ours_out),
            lambda: hf_read_write(folder, theirs_out),
            repeats,
            "export",
            cleanup=remover(ours_out, theirs_out),
        )
        rows.append(time_row("export (s): minigpt export vs from_pretrained + save_pretrained",
                             ours_s, theirs_s))  # fmt: skip
        export_dir = tmp / "exported"
        minigpt_hf.export_run(run_dir, export_dir)
        exported = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
        with torch.inference_mode():
            exported_logits = exported(context).logits[0]
        export_diff = (exported_logits - theirs_logits).abs().max().item()
        export_vs_ours = (exported_logits - ours_logits).abs().max().item()
        exported_tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
        sample = text[:20_000] if text else CORPUS
        details["export"] = {
            "files": sorted(p.name for p in export_dir.iterdir()),
            "max_abs_diff_vs_source": export_diff, "max_abs_diff_vs_minigpt": export_vs_ours,
            "tokenizer_same_ids": exported_tokenizer(sample)["input_ids"] == tokenizer.encode(sample),
        }  # fmt: skip
        rows.append({"metric": f"max |logit diff|, AutoModelForCausalLM(export) vs source, "
                               f"{config.n_positions} tokens",
                     "minigpt": fmt_diff(export_diff), "transformers": "reference", "ratio": ""})  # fmt: skip
        same_tokens = [details.get("tokenizer_same_ids_on_eval_text"),
                       details["export"]["tokenizer_same_ids"]]  # fmt: skip
        rows.append({"metric": "same token ids as transformers' tokenizer: on the eval text "
                               "(import) / from AutoTokenizer (export)",
                     "minigpt": " / ".join({True: "yes", False: "NO", None: "-"}[v]
                                           for v in same_tokens),
                     "transformers": "reference", "ratio": ""})  # fmt: skip
        print(f"export logits: max |diff| {export_diff:.2e}", flush=True)

    wall = time.perf_counter() - began
    loads["end"] = os.getloadavg()[0]
    print()
    headers = ["metric", "minigpt", f"transformers {transformers.__version__}",
               "minigpt speed / transformers"]  # fmt: skip
    cells = [[r["metric"], r["minigpt"], r["transformers"], r["ratio"]] for r in rows]
    harness.print_table(headers, cells, right={1, 2, 3})
    meta = {
        "cpu": harness.cpu_name(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": threads, "generate_threads": sorted({1, threads}),
        "python": platform.python_version(), "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1min_at_each_stage": loads,
        "repeats": repeats, "new_tokens": new_tokens, "eval_tokens": eval_tokens,
        "seed": args.seed, "quick": args.quick, "wall_seconds": round(wall, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
    }  # fmt: skip
    out = harness.write_json(args.json_out, {"meta": meta, "rows": rows, "details": details})
    print(f"\n{wall:.0f} s in all; wrote {out}")


def greedy_minigpt(model, prompt: list[int]) -> Callable[[int], list[int]]:
    def run(n: int) -> list[int]:
        return [int(step[0]) for step in generate(model, prompt, n, temperature=0.0)]

    return run


def greedy_hf(hf_model, prompt: list[int], pad_id: int) -> Callable[[int], list[int]]:
    input_ids = torch.tensor([prompt])
    attention_mask = torch.ones_like(input_ids)

    @torch.inference_mode()
    def run(n: int) -> list[int]:
        out = hf_model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n,
                                do_sample=False, use_cache=True, eos_token_id=None,
                                pad_token_id=pad_id)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    return run


def time_row(metric: str, ours_s: list[float], theirs_s: list[float]) -> dict:
    ours, theirs = statistics.median(ours_s), statistics.median(theirs_s)
    return {"metric": metric, "minigpt": f"{ours:.2f}", "transformers": f"{theirs:.2f}",
            "ratio": f"{theirs / ours:.2f}x", "minigpt_seconds": ours_s,
            "transformers_seconds": theirs_s}  # fmt: skip


def rate_row(metric: str, tokens: int, ours_s: list[float], theirs_s: list[float]) -> dict:
    ours, theirs = tokens / statistics.median(ours_s), tokens / statistics.median(theirs_s)
    return {"metric": metric, "minigpt": f"{ours:,.1f}", "transformers": f"{theirs:,.1f}",
            "ratio": f"{ours / theirs:.2f}x", "tokens": tokens, "minigpt_seconds": ours_s,
            "transformers_seconds": theirs_s}  # fmt: skip


def fmt_diff(value: float) -> str:
    return f"{value:.2e}"


if __name__ == "__main__":
    main()
