"""A run loaded for sampling or evaluation: its device, its weights (float32,
bfloat16 or int8), and whether its decode step is compiled, all checked before the
weights are read.

`generate`, `eval` and `serve` load through `load_for_inference`, so an option means
the same in each, and a combination that cannot work is refused in one sentence
before any time is spent: int8 on a GPU, int8 with --dtype, int8 without the
compiled step it needs, --compile where torch.compile cannot build for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minigpt.batching import compile_batch_step
from minigpt.checkpoint import DEFAULT_RUN_DIR, Run, load_run
from minigpt.device import resolve_device, sampling_dtype
from minigpt.errors import MinigptError
from minigpt.fast_decode import check_compile_support, compile_decode_step
from minigpt.generate import encode_prompt
from minigpt.quantize import check_quantize, quantize_int8, weight_bytes
from minigpt.sampling import Sampling


@dataclass(frozen=True)
class Loaded:
    """A run ready to sample: its decode step static (compiled on a CPU, a CUDA graph
    on a GPU) or not; its weights' bytes in memory."""

    run: Run
    static_decode: bool
    weight_bytes: int = 0


def decide_static(compile_step: bool | None, quantize: str | None) -> bool:
    """Whether sampling uses the static step: as asked, and by default only with int8,
    whose int8 kernel only the compiled step reaches."""
    if quantize is not None and compile_step is False:
        raise MinigptError(
            "--quantize int8 samples through the compiled decode step: eager int8"
            " dequantizes every weight at every step and is slower than float32",
            hint="leave out --no-compile",
        )
    return quantize is not None if compile_step is None else compile_step


def load_for_inference(
    run_dir: str | Path | None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    compile_step: bool | None = False,
    *,
    decodes: bool = True,
    compile_ahead: Callable[[Run], float] | None = None,
    note: Callable[[str], None] | None = None,
) -> Loaded:
    """Check the options, load the run and set its weights. decodes=False: nothing
    decodes (eval), so there is no step to compile. When the step is static,
    compile_ahead(run) compiles it now and returns the seconds, so that no request or
    generation pays them (`compile_sampling_step`). note(message) hears the weights'
    size and the compile."""
    target = resolve_device(device)
    check_quantize(quantize, target, dtype)
    static = decodes and decide_static(compile_step, quantize)
    if static:
        check_compile_support(target)
    weights = sampling_dtype(dtype)
    run = load_run(run_dir or DEFAULT_RUN_DIR, target)
    if quantize is None:
        run.model.to(weights)
    else:
        before = weight_bytes(run.model)
        quantize_int8(run.model)
        after = weight_bytes(run.model)
        if note:
            note(
                f"int8 weights: {after / 1e6:,.1f} MB in memory"
                f" ({after / before:.0%} of float32's {before / 1e6:,.1f} MB)"
            )
    seconds = compile_ahead(run) if static and compile_ahead else 0.0
    if note and seconds:
        note(f"compiled the decode step in {seconds:.1f} s (once per model, batch and cache length)")
    return Loaded(run, static, weight_bytes(run.model))


def compile_sampling_step(
    run: Run, prompt: str, sampling: Sampling, prompts: list[str] | None = None
) -> float:
    """Compile, ahead, the step `generate` will run: for this prompt's length and
    sampling's new tokens and samples (`fast_decode.static_cache_length`), or, given
    prompts, the rows' step of `generate_batch`. The seconds it took."""
    if prompts is not None:
        return compile_batch_step(run.model, len(prompts))
    ids, _ = encode_prompt(run.tokenizer, prompt, run.model.config.block_size)
    reach = len(ids) + sampling.max_new_tokens
    return compile_decode_step(run.model, sampling.num_samples, reach)
