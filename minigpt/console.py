"""What the command line prints: errors, warnings and notes, the trainer's step bar
and summary, samples as they stream, the stats line after generating, a batch of
prompts' samples, the interactive prompt loop, the head inspector's tables, and the
word a signal exits with.

stdout carries only what the user asked for (the text, or one JSON object), so it
can be piped; errors, warnings and numbers go to stderr. This module loads neither
torch nor the model, so the command line can use it before deciding to.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from minigpt.errors import MinigptError
from minigpt.signals import Interrupted, interruptible

if TYPE_CHECKING:
    from minigpt.config import TrainConfig
    from minigpt.hf import Export, Pretrained
    from minigpt.signals import Stopped
    from minigpt.text import GenerationResult
    from minigpt.train import Trainer, TrainResult

SAMPLE_SEPARATOR = "\n---------------\n"
INTERACTIVE_BANNER = "interactive: type a prompt and press enter; an empty line or Ctrl-D quits"


def note(message: str) -> None:
    """One line on stderr, for the user but not part of the output."""
    print(message, file=sys.stderr)


def warn(message: str) -> None:
    note(f"warning: {message}")


def print_error(err: MinigptError, names: dict[str, str], with_hint: bool = True) -> None:
    """`error: <message>` and `hint: <hint>` on stderr, the argument at fault written
    as `names` spells it (e.g. top_k -> --top-k)."""
    message, hint = err.renamed(names)
    note(f"error: {message}")
    if with_hint and hint:
        note(f"hint: {hint}")


def say(message: str) -> None:
    """One line on stdout, at once (the trainer's lines, a command's result)."""
    print(message, flush=True)


def stopped(stop: Stopped) -> None:
    """The one word a command says when a signal stops it."""
    note("interrupted" if isinstance(stop, Interrupted) else "terminated")


def print_json(data: dict) -> None:
    """One JSON object on one line of stdout."""
    print(json.dumps(data))


def stats_line(result: GenerationResult) -> str:
    """The one line of numbers printed on stderr after generating."""
    settings = result.settings
    return (
        f"prompt tokens: {result.prompt_tokens}, new tokens: {result.new_tokens}"
        f" ({settings['num_samples']} sample{'s' if settings['num_samples'] > 1 else ''}),"
        f" {result.tokens_per_second:.1f} tokens/s in {result.seconds:.2f} s"
        f" (first token {1000 * result.first_token_seconds:.0f} ms,"
        f" kv cache {_cache_text(settings)}, {settings['device']},"
        f" seed {settings['seed']})"
    )


def _cache_text(settings: dict) -> str:
    """'off', or the cache's size: grouped-query attention shrinks it by n_head / n_kv_head."""
    if not settings["kv_cache"]:
        return "off"
    return f"{settings['kv_cache_bytes'] / 2**20:.2f} MiB"


class GenerationPrinter:
    """Prints one generation: on stdout each sample after its prompt, sample 0 as it
    streams (when `stream`), the rest after a separator once all are done, or one
    JSON object (`as_json`, which never streams); then the stats line on stderr."""

    def __init__(self, prompt: str, stream: bool, as_json: bool, run_dir: Path | str):
        self.prompt = prompt
        self.stream = stream and not as_json
        self.as_json = as_json
        self.run_dir = run_dir
        self.streamed = False

    def on_text(self, index: int, piece: str) -> None:
        """For generate_text's on_text. The prompt goes out with the first piece, so
        a prompt refused before generation starts leaves stdout empty."""
        if self.stream and index == 0:
            sys.stdout.write(piece if self.streamed else self.prompt + piece)
            sys.stdout.flush()
            self.streamed = True

    def print_result(self, result: GenerationResult) -> None:
        """Whatever was not streamed (or the JSON object), then the stats line."""
        if self.as_json:
            print_json({"run_dir": str(self.run_dir), "prompt": self.prompt, **result.to_json()})
        else:
            for index, sample in enumerate(result.samples):
                if index > 0:
                    sys.stdout.write(SAMPLE_SEPARATOR)
                if index > 0 or not self.streamed:
                    sys.stdout.write(self.prompt + sample.text)
            sys.stdout.write("\n")
            sys.stdout.flush()
        note(stats_line(result))


def print_batch(
    prompts: Sequence[str], results: Sequence[GenerationResult], as_json: bool, run_dir: Path | str
) -> None:
    """What `generate --prompts-file` prints: each prompt and its sample in the file's
    order, separated as samples are (or one JSON object), then one stats line on stderr.
    Nothing streams: the batch's samples are written side by side."""
    pairs = list(zip(prompts, results, strict=True))
    if as_json:
        batch = [{"prompt": prompt, **result.to_json()} for prompt, result in pairs]
        print_json({"run_dir": str(run_dir), "results": batch})
    else:
        texts = [prompt + result.samples[0].text for prompt, result in pairs]
        sys.stdout.write(SAMPLE_SEPARATOR.join(texts) + "\n")
        sys.stdout.flush()
    note(batch_stats_line(results))


def batch_stats_line(results: Sequence[GenerationResult]) -> str:
    """The one line of numbers printed on stderr after a batch of prompts: the batch
    took as long as its last prompt; the prompts were drawn with consecutive seeds."""
    seconds = max(result.seconds for result in results)
    new_tokens = sum(result.new_tokens for result in results)
    rate = new_tokens / seconds if seconds > 0 else 0.0
    first, last = results[0].settings["seed"], results[-1].settings["seed"]
    seeds = f"seed {first}" if len(results) == 1 else f"seeds {first} to {last}, in order"
    return (
        f"prompts: {len(results)}, prompt tokens: {sum(r.prompt_tokens for r in results)},"
        f" new tokens: {new_tokens}, {rate:.1f} tokens/s in {seconds:.2f} s ({seeds})"
    )


def interactive_loop(
    answer: Callable[[str], None], names: dict[str, str], as_json: bool = False
) -> None:
    """Read prompts until an empty line or end of input and `answer` each; a prompt
    that raises MinigptError (e.g. unseen characters) prints its error, and the
    loop goes on.

    as_json: stdout carries only the answers' JSON objects, one a line (JSON Lines),
    so the `> ` marker goes to stderr instead.
    """
    note(INTERACTIVE_BANNER)
    while True:
        try:
            line = _read_prompt(as_json)
        except EOFError:
            break
        if not line:
            break
        try:
            answer(line)
        except MinigptError as err:
            print_error(err, names, with_hint=False)


def _read_prompt(as_json: bool) -> str:
    """One line of input after the `> ` marker: on stdout (input's own), or on stderr
    when stdout must hold nothing but JSON. A signal while it waits stops it at once."""
    with interruptible():
        if not as_json:
            return input("> ")
        sys.stderr.write("> ")
        sys.stderr.flush()
        return input()


def train_summary(result: TrainResult) -> str:
    """What `minigpt train` prints when it finishes: the best loss, the run, what next."""
    best = f"{result.best_val_loss:.4f}" if math.isfinite(result.best_val_loss) else "n/a"
    why = {"max_iters": "reached max_iters", "max_time": "reached max_time"}[result.stop_reason]
    minutes, seconds = divmod(int(result.elapsed), 60)
    return (
        f"done ({why}) at step {result.step}: best val loss {best}, "
        f"{minutes}:{seconds:02d} of training, {result.tokens_seen:,} tokens seen\n"
        f"run: {result.run_dir}\n"
        f"sample from it: minigpt generate {result.run_dir}"
    )


def resume_hint(result: TrainResult) -> str:
    """The one line printed when a signal stopped the run."""
    name = signal.Signals(result.signal).name if result.signal else "signal"
    return (
        f"{name}: stopped at step {result.step}, last state saved; "
        f"resume with: minigpt train --resume {result.run_dir}"
    )


def start_line(trainer: Trainer) -> str:
    """The line a run starts with: its size, device, tokens per step and data."""
    ddp, accum, data = trainer.ddp, trainer.accum, trainer.data
    return (
        f"training {trainer.model.num_params() / 1e6:.2f}M parameters on {trainer.device}"
        f"{f' x {ddp.world_size} processes' if ddp.enabled else ''}"
        f"{' (bf16 autocast)' if trainer.amp else ''}: {trainer.tokens_per_step:,} tokens per step"
        f"{f' ({accum} micro-batches)' if accum > 1 else ''}, "
        f"{len(data.train_tokens):,} train / {len(data.val_tokens):,} val tokens"
    )


def clock_text(seconds: float) -> str:
    """Seconds as m:ss."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    show: bool = True,
    in_bytes: bool = False,
):
    """A progress bar on stderr (a tqdm; hidden unless `show`): over `iterable`, or
    advanced by hand with `update(n)` up to `total`; `in_bytes` counts B, kB, MB."""
    from tqdm.auto import tqdm  # here: the command line starts without it

    unit = {"unit": "B", "unit_scale": True} if in_bytes else {}
    return tqdm(iterable, total=total, desc=desc, disable=not show, **unit)


class StepBar:
    """The trainer's step bar on stderr (loss, lr, tokens/s, time left); the trainer's
    lines are printed above it while it runs. Made by `train.train` (its `step_bar`)."""

    def __init__(self, train_config: TrainConfig, first_step: int):
        from tqdm.auto import tqdm  # here: the command line starts without it

        self.max_time = train_config.max_time
        self.bar = tqdm(
            total=train_config.max_iters,
            initial=first_step,
            unit="step",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )

    def advance(self, loss: float, lr: float, tokens_per_s: float, elapsed: float) -> None:
        self.bar.update(1)
        left = max(0.0, self.max_time - elapsed)
        left_text = f", {clock_text(left)} left" if self.max_time else ""
        self.bar.set_postfix_str(
            f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s / 1000:.1f}k tok/s{left_text}",
            refresh=False,
        )

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def imported(source: str, out: str, loaded: Pretrained) -> None:
    """What `minigpt import` prints."""
    print(f"imported {source}: {loaded.config.describe()}, {loaded.tokenizer.describe()} tokenizer")
    print(f"  in {out}  (try: minigpt generate {out} --prompt 'Hello')")


def exported(out: str, export: Export) -> None:
    """What `minigpt export` prints (the tokenizer's note as a warning)."""
    print(f"wrote {', '.join(export.files)} to {out}")
    if export.tokenizer_note:
        warn(export.tokenizer_note)
    print(f"  load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
