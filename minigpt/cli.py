"""The `minigpt` command line: thin typer commands over the modules.

Each command parses its options, calls the module that owns the work, and prints
(through `console`). Bad input raises `MinigptError` anywhere below, worded as the
library names things; `main` renames the argument at fault to its option
(`OPTION_NAMES`) and prints one line and a hint on stderr with exit code 2, never
a traceback.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from minigpt import console, signals
from minigpt.atomic import out_path
from minigpt.device import choose_wait_policy
from minigpt.errors import MinigptError, os_error
from minigpt.signals import Stopped, exit_quietly

if TYPE_CHECKING:
    from minigpt.checkpoint import Run
    from minigpt.sampling import Sampling

# The modules that load torch are imported inside the commands that need them, so
# `minigpt --help` and usage errors answer at once instead of after torch loads.

OPTION_NAMES = {
    "max_new_tokens": "--max-new-tokens",
    "num_samples": "--num-samples",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "stride": "--overflow-stride",
    "threads": "--threads",
    "stop": "--stop",
    "prompt": "--prompt",
    "prompts": "--prompt",
    "layer": "--layer",
    "head": "--head",
    "repeated": "--repeated",
    "prompt_file": "--prompt-file",
    "prompts_file": "--prompts-file",
    "device": "--device",
    "dtype": "--dtype",
    "static_decode": "--compile",
    "use_kv_cache": "--kv-cache",
    "vocab_size": "--vocab-size",
    "glob": "--glob",
    "text_field": "--field",
    "workers": "--workers",
    "bpe_sample_chars": "--bpe-sample-chars",
    "seed": "--seed",
    "html_file": "--html",
    "png_file": "--png",
    "json_file": "--json",
    "window_stride": "--stride",
    "max_batch": "--max-batch",
    "port": "--port",
    "host": "--host",
    "api_key": "--api-key",
    "top": "--top",
    "position": "--position",
    "answer": "--answer",
    "versus": "--versus",
    "clean": "--clean",
    "corrupt": "--corrupt",
    "by": "--by",
    "quantize": "--quantize",
}
"""The library's name of an argument -> the option that sets it (see MinigptError.param)."""

app = typer.Typer(
    name="minigpt",
    help="A workbench for small GPTs: train one, sample from it, look inside its attention heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


QUANTIZE_OPTION = typer.Option(
    None, "--quantize", help="int8: weight-only int8 on a CPU, through torchao (the int8 extra)."
)


@app.command()
def train(
    config: str | None = typer.Argument(
        None, help="A TOML run config such as configs/shakespeare-char.toml (default: built in)."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Corpus: pystdlib, shakespeare, induction, or a file/folder path."
    ),
    out: str | None = typer.Option(None, "--out", help="Run directory to write."),
    sets: list[str] | None = typer.Option(  # noqa: B008 (typer reads defaults this way)
        None, "--set", help="Override a config value: section.key=value (repeatable)."
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last state."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a run already in --out."),
    max_iters: int | None = typer.Option(None, "--max-iters", help="Total optimizer steps."),
    max_time: float | None = typer.Option(None, "--max-time", help="Stop after S seconds."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for init, dropout and batches."),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="Use torch.compile."),
    init_from: str | None = typer.Option(
        None,
        "--init-from",
        help="Fine-tune: start from this run directory, Hugging Face GPT-2 folder or hub name.",
    ),
    quantize: str | None = typer.Option(None, "--quantize", hidden=True),
) -> None:
    """Train a GPT on a text corpus (default: char-level on the Python standard library)."""
    if quantize is not None:  # hidden: only here to say why
        raise MinigptError(
            "--quantize is for sampling and evaluation: training needs float weights",
            hint="train as usual, then `minigpt generate RUN --quantize int8`",
        )
    # Before torch loads: OpenMP threads spin while they wait unless the cores are
    # busy, where a spinning thread stalls and sleeping is faster (see device.py).
    choose_wait_policy()
    from minigpt import train as trainer
    from minigpt.config import build_config

    if out is not None:
        out_path(out, "--out")  # "" would be the current folder
    flags = dict(data=data, out=out, max_iters=max_iters, max_time=max_time, device=device)
    flags.update(seed=seed, compile=compile, init_from=init_from)
    run_config = build_config(config, sets, resume=resume, **flags)
    result = trainer.train(
        run_config,
        resume=resume is not None,
        force=force,
        progress=True,
        log=console.say,
        step_bar=console.StepBar,
    )
    if result.signal:
        console.note(console.resume_hint(result))
        raise typer.Exit(result.exit_code)
    if result.rank == 0:
        console.say(console.train_summary(result))


@app.command()
def generate(
    run_dir: str | None = typer.Argument(
        None, help="Run directory to sample from (default: checkpoints/default)."
    ),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Text to continue."),
    prompt_file: str | None = typer.Option(
        None, "--prompt-file", help="Read the prompt from a file."
    ),
    prompts_file: str | None = typer.Option(
        None, "--prompts-file", help="Sample every prompt of a file, one a line, as one batch."
    ),
    max_new_tokens: int = typer.Option(
        500, "--max-new-tokens", "-n", help="Tokens to generate per sample."
    ),
    temperature: float = typer.Option(0.8, help="Softmax temperature; 0 is greedy (argmax)."),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Sample among the k most likely tokens."
    ),
    top_p: float | None = typer.Option(
        None, "--top-p", help="Nucleus: the smallest set holding this much probability."
    ),
    num_samples: int = typer.Option(
        1, "--num-samples", "-s", help="Samples, generated as one batch."
    ),
    seed: int | None = typer.Option(
        None, help="Seed of the sampler (default: a fresh one, reported)."
    ),
    stop: list[str] | None = typer.Option(  # noqa: B008 (typer reads defaults this way)
        None, "--stop", help="End a sample before this text (repeatable)."
    ),
    stream: bool = typer.Option(
        True, "--stream/--no-stream", help="Print text as it is generated."
    ),
    kv_cache: bool = typer.Option(
        True, "--kv-cache/--no-kv-cache", help="Reuse keys/values (off: recompute every step)."
    ),
    stride: int | None = typer.Option(
        None,
        "--overflow-stride",
        help="At context overflow keep block_size - this many tokens (default block_size/4; 0 = crop every step).",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Weights while sampling: auto (float32: a decode step is bound by launches, not bytes), float32, bfloat16."
    ),
    compile_step: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="Decode in a static-shape step: compiled by inductor on a CPU, a CUDA graph on a GPU (default: only with --quantize).",
    ),
    quantize: str | None = QUANTIZE_OPTION,
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads (default: torch's; 1 is fastest on a busy machine)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object with texts, token counts and timings."
    ),
    interactive: bool = typer.Option(
        False, "--interactive", "-i", help="Prompt loop that keeps the model loaded."
    ),
) -> None:
    """Sample text from a trained run with the KV cache."""
    choose_wait_policy(threads)  # before torch loads (see device.py)
    from minigpt.device import set_threads
    from minigpt.inference import compile_sampling_step, decide_static, load_for_inference
    from minigpt.prompts import batch_prompts, one_prompt
    from minigpt.sampling import Sampling

    sampling = Sampling(
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop or (),
        use_kv_cache=kv_cache,
        stride=stride,
        static_decode=decide_static(compile_step, quantize),
    )
    set_threads(threads)
    others = {"--prompt": prompt, "--prompt-file": prompt_file, "--interactive": interactive}
    batch = batch_prompts(prompts_file, others, sampling.num_samples, sampling.use_kv_cache)
    text = one_prompt(prompt, prompt_file)
    ahead = partial(compile_sampling_step, prompt=text, sampling=sampling, prompts=batch)
    run = load_for_inference(
        run_dir, device, dtype, quantize, sampling.static_decode, compile_ahead=ahead,
        note=console.note,
    ).run
    if batch is not None:
        _sample_batch(run, batch, sampling, as_json)
    elif interactive:
        answer = lambda line: _sample_one(run, line, sampling, stream, as_json)
        console.interactive_loop(answer, OPTION_NAMES, as_json=as_json)
    else:
        _sample_one(run, text, sampling, stream, as_json)


def _sample_one(run: Run, prompt: str, sampling: Sampling, stream: bool, as_json: bool) -> None:
    """generate: sampling.num_samples samples of one prompt, streamed as they come."""
    from minigpt.generate import generate_text

    printer = console.GenerationPrinter(prompt, stream, as_json, run.dir)
    result = generate_text(
        run.model, run.tokenizer, prompt, sampling, on_text=printer.on_text, on_warning=console.warn
    )
    printer.print_result(result)


def _sample_batch(run: Run, prompts: list[str], sampling: Sampling, as_json: bool) -> None:
    """generate --prompts-file: one sample of each prompt, decoded as one batch, printed
    in the file's order once all are done (their texts arrive interleaved)."""
    from minigpt.batching import generate_batch

    results = generate_batch(
        run.model, run.tokenizer, prompts, sampling, on_warning=console.warn,
        static=sampling.static_decode,
    )
    console.print_batch(prompts, results, as_json, run.dir)


@app.command()
def serve(
    run_dir: str | None = typer.Argument(
        None, help="Run directory to serve (default: checkpoints/default)."
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on; 127.0.0.1 is this machine only (another warns without --api-key).",
    ),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free one)."),
    max_batch: int = typer.Option(
        8, "--max-batch", help="Continuations decoded at once; more wait for a free row."
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="MINIGPT_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1 and /api (or set MINIGPT_API_KEY).",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    compile_step: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="Decode every row in a static-shape step compiled by inductor on a CPU (default: only with --quantize).",
    ),
    quantize: str | None = QUANTIZE_OPTION,
) -> None:
    """Serve a run over HTTP: OpenAI's /v1/completions (batched), and a page at / that
    shows every attention head while the model writes."""
    choose_wait_policy()  # before torch loads (see device.py)
    from minigpt.serve.server import serve as serve_run

    serve_run(
        run_dir,
        host=host,
        port=port,
        max_batch=max_batch,
        api_key=api_key,
        device=device,
        compile_step=compile_step,
        quantize=quantize,
    )


@app.command("inspect-heads")
def inspect_heads(
    run_dir: str | None = typer.Argument(
        None, help="Run directory to inspect (default: checkpoints/default)."
    ),
    prompt: list[str] | None = typer.Option(  # noqa: B008
        None, "--prompt", "-p", help="Text to look at (repeatable; metrics average over all)."
    ),
    prompt_file: list[str] | None = typer.Option(  # noqa: B008
        None, "--prompt-file", help="A file whose text is one prompt (repeatable)."
    ),
    repeated: int | None = typer.Option(
        None,
        "--repeated",
        help="Probe: 8 seeded random N-token sequences, each followed by itself "
        "(the default, with N = min(32, block_size/2)); no token repeats within a "
        "sequence when the vocabulary has N to spare.",
    ),
    layer: int | None = typer.Option(None, "--layer", help="Show this layer's heads as heatmaps."),
    head: int | None = typer.Option(None, "--head", help="With --layer: show only this head."),
    html: str | None = typer.Option(None, "--html", help="Write a self-contained HTML viewer."),
    png: str | None = typer.Option(None, "--png", help="Write a PNG grid of every head."),
    json_file: str | None = typer.Option(None, "--json", help="Write everything computed as JSON."),
    importance: bool = typer.Option(
        True,
        "--importance/--no-importance",
        help="Ablation (loss rise when zeroed) and |dL/dgate| on 8 validation batches.",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Show what every attention head of a trained run does.

    Metrics per head: previous-token, induction and duplicate-token (on the
    repeated probe), first-token (sink), normalised entropy, mean attention
    distance, confidence, ablation importance, |dL/dgate|, nearest head (JS).

    Roles, first rule that matches: induction >= 0.4; previous-token >= 0.5;
    duplicate-token >= 0.5; first-token >= 0.5; broad: normalised entropy >= 0.75;
    local: mean attention distance <= 2.0 tokens; mixed: anything else.
    """
    choose_wait_policy()  # before torch loads (see device.py)
    from minigpt import render
    from minigpt.checkpoint import DEFAULT_RUN_DIR, load_run
    from minigpt.device import resolve_device
    from minigpt.heads_run import check_head, inspect_run
    from minigpt.prompts import read_prompts

    outputs = render.outputs(html, png, json_file, (render.save_html, render.save_png, render.save_json))
    prompts = read_prompts(prompt or (), prompt_file or ())
    run = load_run(run_dir or DEFAULT_RUN_DIR, resolve_device(device))
    check_head(layer, head, run.model.config.n_layer, run.model.config.n_head)
    inspection = inspect_run(run, prompts=prompts, repeated=repeated, importance=importance)
    for note in inspection.notes:
        console.warn(note)
    render.print_inspection(inspection, layer, head)
    for save, path in outputs:
        save(path, inspection)
        console.note(f"wrote {path}")


HTML_OPTION = typer.Option(None, "--html", help="Write a self-contained HTML page.")
PNG_OPTION = typer.Option(None, "--png", help="Write the grid as a PNG image.")
JSON_OPTION = typer.Option(None, "--json", help="Write everything computed as JSON.")
RUN_ARGUMENT = typer.Argument(None, help="Run directory (default: checkpoints/default).")
DEVICE_OPTION = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps.")


@app.command()
def lens(
    run_dir: str | None = RUN_ARGUMENT,
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="The text to look through."),
    prompt_file: str | None = typer.Option(None, "--prompt-file", help="A file whose text is the prompt."),
    top: int = typer.Option(5, "--top", help="Predictions shown per stream and position."),
    position: int = typer.Option(-1, "--position", help="The position whose top predictions are listed (-1: the last)."),
    html: str | None = HTML_OPTION,
    png: str | None = PNG_OPTION,
    json_file: str | None = JSON_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """The logit lens: each layer's residual stream read as next-token predictions.

    The stream after the embeddings and after each block goes through the final norm
    and the LM head, as if the model ended there. The grid shows the probability of
    the token that actually follows each position; the list shows the top
    predictions at one position. docs/circuits.md says how to read it.
    """
    choose_wait_policy()  # before torch loads (see device.py)
    from minigpt import lens_render
    from minigpt.checkpoint import DEFAULT_RUN_DIR, load_run
    from minigpt.device import resolve_device
    from minigpt.lens_run import lens_run
    from minigpt.prompts import one_prompt

    outputs = lens_render.outputs(html, png, json_file)
    text = one_prompt(prompt, prompt_file)
    run = load_run(run_dir or DEFAULT_RUN_DIR, resolve_device(device))
    result, position = lens_run(run, text, top, position)
    lens_render.show(result, lens_render.lens_grid(result, position), outputs)


@app.command()
def attribute(
    run_dir: str | None = RUN_ARGUMENT,
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="The text whose last position is attributed."),
    prompt_file: str | None = typer.Option(None, "--prompt-file", help="A file whose text is the prompt."),
    answer: str = typer.Option(..., "--answer", help="The token whose logit is split up (one token)."),
    versus: str | None = typer.Option(None, "--versus", help="Split logit(answer) - logit(this token) instead."),
    html: str | None = HTML_OPTION,
    png: str | None = PNG_OPTION,
    json_file: str | None = JSON_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Direct logit attribution: how much each head, MLP and the embeddings push the
    answer's logit at the last position (the final norm's scale frozen from this run).
    The terms sum to the model's own logit (difference)."""
    choose_wait_policy()  # before torch loads (see device.py)
    from minigpt import lens_render
    from minigpt.checkpoint import DEFAULT_RUN_DIR, load_run
    from minigpt.device import resolve_device
    from minigpt.lens_run import attribute_run
    from minigpt.prompts import one_prompt

    outputs = lens_render.outputs(html, png, json_file)
    text = one_prompt(prompt, prompt_file)
    run = load_run(run_dir or DEFAULT_RUN_DIR, resolve_device(device))
    result = attribute_run(run, text, answer, versus)
    lens_render.show(result, lens_render.attribution_grid(result), outputs)


@app.command()
def patch(
    run_dir: str | None = RUN_ARGUMENT,
    clean: str = typer.Option(..., "--clean", help="The prompt where the model gives the answer."),
    corrupt: str = typer.Option(..., "--corrupt", help="The same length in tokens, where it gives --versus."),
    answer: str = typer.Option(..., "--answer", help="The clean prompt's next token (one token)."),
    versus: str = typer.Option(..., "--versus", help="The corrupted prompt's next token (one token)."),
    by: str = typer.Option("head", "--by", help="head (each head's output and MLP) or layer-position (the residual stream)."),
    heads: str | None = typer.Option(None, "--heads", help="Also patch these heads together, e.g. L1H0,L1H2."),
    html: str | None = HTML_OPTION,
    png: str | None = PNG_OPTION,
    json_file: str | None = JSON_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Activation patching: run the corrupted prompt with one component taken from the
    clean run, and report the share of the clean logit difference it restores
    (0: nothing, 1: all of it)."""
    choose_wait_policy()  # before torch loads (see device.py)
    from minigpt import lens_render
    from minigpt.checkpoint import DEFAULT_RUN_DIR, load_run
    from minigpt.device import resolve_device
    from minigpt.lens_run import patch_run
    from minigpt.patching import check_mode

    check_mode(by)
    outputs = lens_render.outputs(html, png, json_file)
    run = load_run(run_dir or DEFAULT_RUN_DIR, resolve_device(device))
    result = patch_run(run, clean, corrupt, answer, versus, by, heads)
    lens_render.show(result, lens_render.patching_grid(result), outputs)


@app.command()
def prepare(
    source: str = typer.Argument(
        "pystdlib",
        help="A file (.txt, .jsonl, .parquet), a folder of them, or a built-in dataset: pystdlib, shakespeare, induction.",
    ),
    tokenizer: str = typer.Option(
        "char", "--tokenizer", "-t", help="char, bpe, gpt2, r50k_base, cl100k_base or o200k_base."
    ),
    vocab_size: int | None = typer.Option(
        None, "--vocab-size", help="Vocabulary size for bpe (default 2048)."
    ),
    glob: str = typer.Option(
        "auto",
        "--glob",
        help="Which files of a folder to read (auto: its .txt, .jsonl or .parquet).",
    ),
    field: str = typer.Option(
        "text", "--field", help="The JSONL field or Parquet column that holds the text."
    ),
    workers: int = typer.Option(0, "--workers", help="Threads that tokenise (0: every core)."),
    bpe_sample_chars: int | None = typer.Option(
        None,
        "--bpe-sample-chars",
        help="bpe learns its merges from at most this many characters of train (default 100M).",
    ),
    data_dir: str = typer.Option("data", "--data-dir", help="Where prepared data is kept."),
) -> None:
    """Tokenise a corpus once into train/val token files (cached by content hash)."""
    from minigpt.data import describe_prepared
    from minigpt.prepare import prepare as prepare_corpus

    prepared = prepare_corpus(
        source,
        tokenizer,
        vocab_size,
        out_path(data_dir, "--data-dir", example="data"),
        glob,
        text_field=field,
        workers=workers,
        bpe_sample_chars=bpe_sample_chars,
    )
    for warning in prepared.warnings:
        console.warn(warning)
    console.say(describe_prepared(prepared))


@app.command("eval")
def eval_(
    run_dir: str | None = typer.Argument(
        None, help="Run directory to evaluate (default: checkpoints/default)."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="A file, folder or built-in dataset to evaluate on (default: the run's validation split).",
    ),
    stride: int | None = typer.Option(
        None,
        "--stride",
        help="Tokens between the starts of successive block_size windows (default block_size/2).",
    ),
    glob: str = typer.Option("auto", "--glob", help="Which files of a --data folder to read."),
    field: str = typer.Option("text", "--field", help="The --data JSONL field or Parquet column."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    quantize: str | None = QUANTIZE_OPTION,
) -> None:
    """Loss, perplexity and bits per byte of a run, over sliding windows."""
    choose_wait_policy()  # before torch loads (see device.py)
    from minigpt import evaluate
    from minigpt.inference import load_for_inference

    # eval's forward passes are whole windows: no decode step to compile
    run = load_for_inference(run_dir, device, quantize=quantize, decodes=False, note=console.note).run
    # the window bar only where someone watches it: not in a log or a pipe
    result = evaluate.evaluate_run(
        run, data, stride, glob=glob, text_field=field, progress=sys.stderr.isatty()
    )
    if as_json:
        console.print_json(result.to_dict())
    else:
        console.say(evaluate.describe(result))


@app.command("import")
def import_(
    source: str = typer.Argument(
        ..., help="A Hugging Face GPT-2 folder, or a hub name such as gpt2 or distilgpt2."
    ),
    out: str = typer.Option(..., "--out", help="The run directory to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite a run already in --out."),
) -> None:
    """Make a run directory from a GPT-2 checkpoint in Hugging Face format."""
    from minigpt import hf

    loaded = hf.import_checkpoint(source, out_path(out, "--out"), force=force)
    console.imported(source, out, loaded)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="The run directory to export."),
    out: str = typer.Option(..., "--out", help="The folder to write (Hugging Face format)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a model already in --out."),
) -> None:
    """Write a run as a Hugging Face GPT-2 folder (transformers, TransformerLens)."""
    from minigpt import hf

    exported = hf.export_run(Path(run_dir), out_path(out, "--out", "exports/NAME"), force=force)
    console.exported(out, exported)


def main() -> None:
    """Entry point: run the app; bad input becomes one line, a hint and exit code 2.

    typer handles its own usage errors (unknown option, bad value) with exit code 2.
    A machine that refuses a read or a write (a full disk, a permission) is reported
    the way bad input is: it is a fact about the machine, not a bug.

    SIGINT (Ctrl-C) and SIGTERM set a flag that the commands poll (signals.py); the
    command stops with one word, "interrupted" or "terminated", and the shell's exit
    code, 130 or 143. A signal that came after the last poll (while a finished run
    draws its plot, say) stops the command the same way when it returns, and so
    does one that came before whatever else went wrong. (`python -m minigpt` sets
    the flag's handlers before it imports anything, for the whole process; run
    in-process, as the tests do, `main` restores the handlers that were there.)
    """
    with signals.handled():
        _run_app()


def _run_app() -> None:
    """The app, and what each way out of it prints (see `main`)."""
    try:
        try:
            app()
        finally:
            signals.check()
    except Stopped as stop:
        console.stopped(stop)
        exit_quietly(stop.exit_code)
    except MinigptError as err:
        console.print_error(err, OPTION_NAMES)
        sys.exit(2)
    except OSError as err:
        console.print_error(os_error(err), OPTION_NAMES)
        sys.exit(2)
