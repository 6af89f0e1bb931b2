"""The trainer: gradient accumulation, evaluation, checkpoints and exact resume, on
one process or many (the optimizer and schedule are in optim.py, the process group
in distributed.py, how a signal stops a run in signals.py).

Read it in the order it runs: `train` calls `setup` (device, data, model,
optimizer, the run directory; `restore` for a resumed run), then `fit`, the loop:
get a batch, forward and backward over the micro-batches, clip, step, schedule,
log, `evaluate`, `save`, check for signals.

One optimizer step sees `accum_total` micro-batches. Micro-batch j of every step
comes from its own batch stream (a `Batcher` seeded with seed + j), and process r
of W runs streams r*accum .. (r+1)*accum - 1. So a run on W processes sees the
same batches as one process with W times the accumulation, and its losses match
up to float rounding; the streams' states are saved, so a resume continues them.

The last state (weights, optimizer, step, RNG and batch streams) lives in ONE
file, trainer.pt, written atomically, so a kill at any moment leaves either the
old state or the new one, never a mix (see `checkpoint.TrainerCheckpoint`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from minigpt import checkpoint, optim, signals
from minigpt.batches import Batcher
from minigpt.checkpoint import BEST_WEIGHTS, TRAINER_STATE, MetricsLog, TrainerCheckpoint
from minigpt.config import RunConfig, TrainConfig, config_from_dict, split_accumulation
from minigpt.console import clock_text, start_line
from minigpt.device import allow_tf32, autocast_dtype, check_training_memory, process_device
from minigpt.distributed import Distributed, setup_distributed
from minigpt.errors import MinigptError
from minigpt.finetune import fine_tune_config, fixed_tokenizer, load_source_weights
from minigpt.hf import load_pretrained
from minigpt.meters import Clock, LossLog, Meters
from minigpt.model import GPT
from minigpt.outputs import check_out_dir
from minigpt.signals import EXIT_CODES
from minigpt.train_data import TrainData, check_data, load_data_once

EVAL_SEED_OFFSET = 1_000_003  # eval batch streams: far from the training streams' seeds
PLOT_EVERY_SECONDS = 60  # loss.png is redrawn at an evaluation at most this often


# --------------------------------------------------------------------------- what the loop works with


@dataclass
class TrainState:
    """What changes from step to step, and what trainer.pt saves of it."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    """Seconds of training over every session of the run (the clock max_time reads)."""
    best_val_loss: float = math.inf
    saved_step: int | None = None
    """The step trainer.pt holds (None before the first save)."""
    eval_pending: bool = False
    """The evaluation due at `step` has not run: a signal stopped the run first. The
    run evaluates before its next step, so a resumed run evaluates where a straight
    one does."""
    streams: list[Batcher] = field(default_factory=list)
    """This process's batch streams, one per micro-batch; each carries its RNG state."""


@dataclass
class Trainer:
    """Everything the loop works with, built once by `setup`."""

    config: RunConfig
    """The run's config, model.vocab_size resolved to the tokenizer's."""
    ddp: Distributed
    device: torch.device
    data: TrainData
    model: GPT
    optimizer: torch.optim.Optimizer | optim.MuonAndAdamW
    accum: int
    """Micro-batches this process runs per optimizer step."""
    log: Callable[[str], None]
    metrics: MetricsLog | None = None
    """Open on the master process only."""
    train_model: nn.Module = field(init=False)
    """What the loop calls: the model, compiled and wrapped in DDP as configured."""
    amp: torch.dtype | None = field(init=False)
    """The autocast dtype, or None for plain float32."""

    def __post_init__(self) -> None:
        self.train_model = _wrap(self.model, self.config, self.ddp, self.device)
        self.amp = autocast_dtype(self.config.train.dtype, self.device)

    @property
    def out_dir(self) -> Path:
        return Path(self.config.train.out_dir)

    @property
    def tokens_per_step(self) -> int:
        batch_size, block_size = self.config.train.batch_size, self.config.model.block_size
        return batch_size * block_size * self.accum * self.ddp.world_size

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def record(self, entry: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(entry)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    tokens_seen: int
    elapsed: float
    stop_reason: str
    """'max_iters', 'max_time' or 'signal'."""
    signal: int | None = None
    rank: int = 0
    """This process's rank in a torchrun job: only rank 0 reports."""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1) if self.signal else 0


# --------------------------------------------------------------------------- setup


def setup(
    config: RunConfig,
    ddp: Distributed,
    *,
    resume: dict | None,
    force: bool,
    data: TrainData | None,
    log: Callable[[str], None],
    progress: bool,
) -> tuple[Trainer, TrainState]:
    """Check the run directory, load the data, build the model and optimizer, restore a
    resumed run's state, and write the run files. Nothing is written before every
    input has been checked.

    resume: the resumed run's config.json as it was before this resume, or None.
    """
    train_config = config.train
    device = process_device(train_config.device, ddp.local_rank if ddp.enabled else None)
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    out_dir = Path(train_config.out_dir)
    if ddp.is_master:  # the others would see the files rank 0 is about to write
        check_out_dir(out_dir, resume is not None, force, source=train_config.init_from or None)
    source = None
    if train_config.init_from and resume is None:
        source = load_pretrained(train_config.init_from)
        config = fine_tune_config(config, source)
    config, accum = split_accumulation(config, ddp.world_size)
    check_training_memory(config.model, train_config.batch_size, device)  # before preparing data
    saved = checkpoint.load_trainer_state(out_dir / TRAINER_STATE) if resume else None
    if data is None:
        run_data = (resume.get("prepared_data") or {}) if resume is not None else None
        tokenizer = fixed_tokenizer(source, config, out_dir)
        data = load_data_once(config, ddp, progress, run_data, tokenizer)
    check_data(data, config.model.block_size, out_dir if resume else None)

    config = replace(config, model=config.model.with_vocab(data.tokenizer.vocab_size))
    check_training_memory(config.model, train_config.batch_size, device)
    torch.manual_seed(train_config.seed)
    model = GPT(config.model).to(device)
    if source is not None:
        load_source_weights(model, source)
    optimizer = optim.make_optimizer(model, config, device)
    torch.manual_seed(train_config.seed + 7919 * (ddp.rank + 1))  # dropout: differs per rank
    batch_size, block_size = train_config.batch_size, config.model.block_size
    streams = [
        Batcher(data.train_tokens, block_size, batch_size, train_config.seed + j, device)
        for j in range(ddp.rank * accum, (ddp.rank + 1) * accum)
    ]
    log = log if ddp.is_master else _silent
    trainer = Trainer(config, ddp, device, data, model, optimizer, accum, log)
    state = TrainState(streams=streams)
    if saved is not None:
        restore(trainer, state, saved)
    signals.check()  # the last point where a signal stops the run with nothing written
    if ddp.is_master:
        with checkpoint.cleared_on_failure(out_dir, fresh=resume is None):
            _start_run(trainer, resume=resume is not None, force=force, step=state.step)
            trainer.metrics = MetricsLog(out_dir)
    return trainer, state


def _wrap(model: GPT, config: RunConfig, ddp: Distributed, device: torch.device) -> nn.Module:
    """The module the loop calls: compiled if asked, inside DDP when there are several processes."""
    allow_tf32(config.train.dtype, device)
    # dynamic=False: the shapes of a run never change, so keep every kernel specialised
    # to them. torch.compile's default marks a size dynamic when a second model of
    # another shape is compiled in the same process (a sweep in a notebook), and the
    # second model's kernels would then be compiled for symbolic sizes.
    compiled = torch.compile(model, dynamic=False) if config.train.compile else model
    return ddp.wrap(compiled, device)


def restore(trainer: Trainer, state: TrainState, saved: TrainerCheckpoint) -> None:
    """Continue from trainer.pt: weights, optimizer, batch streams, RNG, counters."""
    first_stream = trainer.ddp.rank * trainer.accum
    where = trainer.out_dir / TRAINER_STATE
    optim.check_same_optimizer(saved.optimizer, trainer.config.train, str(where))
    try:
        trainer.model.load_state_dict(saved.model)
        trainer.optimizer.load_state_dict(saved.optimizer)
        for j, stream in enumerate(state.streams):
            stream.load_state_dict(saved.batchers[first_stream + j])
        if len(saved.rng) == trainer.ddp.world_size:
            checkpoint.set_rng_state(saved.rng[trainer.ddp.rank], trainer.device)
    except (RuntimeError, KeyError, IndexError, ValueError, TypeError) as err:
        raise MinigptError(
            f"{trainer.out_dir / TRAINER_STATE} does not fit this run "
            f"({str(err).splitlines()[0][:100]})",
            hint="resume with the same config, gradient accumulation and data",
        ) from err
    state.step, state.tokens_seen = int(saved.step), int(saved.tokens_seen)
    state.elapsed, state.best_val_loss = float(saved.elapsed), float(saved.best_val_loss)
    state.saved_step, state.eval_pending = state.step, bool(saved.eval_pending)


def _start_run(trainer: Trainer, *, resume: bool, force: bool, step: int) -> None:
    """Write a fresh run's files, or record a resumed one's new settings."""
    config = trainer.config.to_dict()
    sections = {
        "train": {**config["train"], "out_dir": str(trainer.out_dir)},
        "data": config["data"],
        "prepared_data": trainer.data.summary,
    }
    checkpoint.start_run(
        trainer.out_dir, trainer.model, trainer.data.tokenizer, sections,
        resume=resume, force=force, step=step,
    )  # fmt: skip


# --------------------------------------------------------------------------- one step


def train_step(trainer: Trainer, state: TrainState, clock: Clock, losses: LossLog) -> bool:
    """One optimizer step over `accum` micro-batches; whether any rank got a signal.

    The mean loss goes to `losses`, unread: one process reads it when due. With DDP the
    ranks agree on the loss, the signal and the clock in one small all-reduce per step,
    which reads it, and a non-finite loss then raises at once, keeping the last saved
    state, as `_record_step` does later for one process."""
    ddp, accum = trainer.ddp, trainer.accum
    loss_sum = torch.zeros((), device=trainer.device)
    for micro, stream in enumerate(state.streams):
        x, y = stream.next()
        # DDP all-reduces gradients at every backward unless told not to: once per step is enough
        skip_sync = ddp.enabled and micro < accum - 1
        with trainer.train_model.no_sync() if skip_sync else contextlib.nullcontext():
            with trainer.autocast():
                _, loss = trainer.train_model(x, y, loss_chunk=trainer.config.train.loss_chunk)
            loss_sum += loss.detach().float()
            (loss / accum).backward()
    loss = loss_sum / accum
    if ddp.enabled:
        # so that every rank stops and schedules in step (a host sync, once a step)
        loss, loss_value, got_signal, state.elapsed = ddp.share_step(
            loss, signals.pending(), clock.now()
        )
        if not math.isfinite(loss_value):
            trainer.optimizer.zero_grad(set_to_none=True)
            raise _diverged(
                trainer, state, f"the loss became {loss_value} at step {state.step + 1}"
            )
    else:
        got_signal, state.elapsed = signals.pending() != 0, clock.now()
    losses.add(loss, state.step + 1)
    if trainer.config.train.grad_clip > 0:
        nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.config.train.grad_clip)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += trainer.tokens_per_step
    return bool(got_signal)


# --------------------------------------------------------------------------- evaluate and save


@torch.no_grad()
def evaluate(trainer: Trainer, stoppable: bool = False) -> dict[str, float] | None:
    """Mean loss on the same eval_iters batches of each split every time; None when
    `stoppable` and a signal arrives meanwhile (a long evaluation must not delay a stop).

    Runs the uncompiled module: eval mode would make torch.compile build a
    second graph, which costs more than the few forward passes it speeds up.
    """
    train_config, ddp, model = trainer.config.train, trainer.ddp, trainer.model
    eval_iters, batch_size = train_config.eval_iters, train_config.batch_size
    model.eval()
    result: dict[str, float] | None = {}
    for split in ("train", "val"):
        tokens = trainer.data.train_tokens if split == "train" else trainer.data.val_tokens
        seed = train_config.seed + EVAL_SEED_OFFSET + ddp.rank
        batcher = Batcher(tokens, model.config.block_size, batch_size, seed, trainer.device)
        total = torch.zeros((), device=trainer.device)
        for _ in range(eval_iters):
            if stoppable and ddp.any_rank(signals.pending() != 0, trainer.device):
                result = None
                break
            x, y = batcher.next()
            with trainer.autocast():
                _, loss = model(x, y, loss_chunk=train_config.loss_chunk)
            total += loss.float()
        if result is None:
            break
        ddp.sum_(total)
        result[split] = total.item() / (eval_iters * ddp.world_size)
    model.train()
    return result


def save(trainer: Trainer, state: TrainState, loss_checked: bool = False) -> None:
    """trainer.pt and model-last.safetensors: the state resume continues from.

    A diverged state is never saved: not one with a NaN or infinite weight or
    optimizer moment, nor one whose weights, finite but blown up, give a non-finite
    loss. The last good state stays on disk, so the run can be resumed from it with
    a lower lr. loss_checked: an evaluation of these weights just gave finite losses,
    so the one-batch loss check is not run again.
    """
    ddp = trainer.ddp
    if not _finite_state(trainer):  # every rank checks the same (all-reduced) weights
        raise _diverged(trainer, state, f"the weights became NaN or infinite by step {state.step}")
    if not loss_checked and not _finite_loss(trainer):
        raise _diverged(trainer, state, f"the weights of step {state.step} give a non-finite loss")
    batchers = [s for group in ddp.gather([s.state_dict() for s in state.streams]) for s in group]
    rngs = ddp.gather(checkpoint.rng_state(trainer.device))
    state.saved_step = state.step
    if not ddp.is_master:
        return
    saved = TrainerCheckpoint(
        step=state.step,
        tokens_seen=state.tokens_seen,
        elapsed=state.elapsed,
        best_val_loss=state.best_val_loss,
        world_size=ddp.world_size,
        model={k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        optimizer=trainer.optimizer.state_dict(),
        rng=rngs,
        batchers=batchers,
        eval_pending=state.eval_pending,
    )
    checkpoint.save_trainer_state(trainer.out_dir, saved)


def _finite_state(trainer: Trainer) -> bool:
    tensors = list(trainer.model.parameters())
    for moments in trainer.optimizer.state.values():
        tensors += [v for v in moments.values() if torch.is_tensor(v) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def _finite_loss(trainer: Trainer) -> bool:
    """Whether the current weights give a finite loss on one fixed batch (a forward in
    eval mode with its own batch stream: no RNG of the run is touched)."""
    train_config, model = trainer.config.train, trainer.model
    batcher = Batcher(
        trainer.data.train_tokens,
        model.config.block_size,
        train_config.batch_size,
        train_config.seed + EVAL_SEED_OFFSET,
        trainer.device,
    )
    x, y = batcher.next()
    was_training = model.training
    model.eval()
    with trainer.autocast():
        _, loss = model(x, y)
    model.train(was_training)
    return bool(torch.isfinite(loss))


def _diverged(trainer: Trainer, state: TrainState, what: str) -> MinigptError:
    """The error that stops a diverged run, saying which state was kept."""
    kept = (
        f"{trainer.out_dir / TRAINER_STATE} still holds step {state.saved_step}, the last good state"
        if state.saved_step is not None
        else "nothing was saved"
    )
    return MinigptError(
        f"{what}; training stopped and {kept}",
        hint=f"resume with a lower lr (minigpt train --resume {trainer.out_dir} --set "
        "train.lr=...), or raise train.warmup_iters, or set train.grad_clip",
    )


def evaluate_and_save(trainer: Trainer, state: TrainState, stoppable: bool = False) -> str | None:
    """Evaluate, keep the best weights, save the last state; the line to report (None
    when a signal cut the evaluation short: nothing is saved then)."""
    losses = evaluate(trainer, stoppable)
    if losses is None:
        return None
    if not all(math.isfinite(loss) for loss in losses.values()):
        what = f"the evaluation at step {state.step} gave a non-finite loss"
        raise _diverged(trainer, state, what)
    improved = losses["val"] < state.best_val_loss
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    trainer.record(
        {
            "step": state.step,
            "train_loss": losses["train"],
            "val_loss": losses["val"],
            "time": round(state.elapsed, 3),
        }
    )
    if improved and trainer.ddp.is_master:
        checkpoint.save_weights(trainer.model.state_dict(), trainer.out_dir / BEST_WEIGHTS)
    state.eval_pending = False
    save(trainer, state, loss_checked=True)  # the losses above are finite
    return (
        f"step {state.step:>6}: train loss {losses['train']:.4f}, val loss "
        f"{losses['val']:.4f}{' (best)' if improved else ''}  [{clock_text(state.elapsed)}]"
    )


# --------------------------------------------------------------------------- the loop


class StepBar(Protocol):
    """A display of the steps as they go (the command line's is `console.StepBar`);
    the trainer's lines are written above it while it runs."""

    def advance(self, loss: float, lr: float, tokens_per_s: float, elapsed: float) -> None: ...

    def write(self, message: str) -> None: ...

    def close(self) -> None: ...


def fit(
    trainer: Trainer, state: TrainState, step_bar: Callable[..., StepBar] | None = None
) -> TrainResult:
    """Step until max_iters, max_time or a signal; evaluate and save along the way.

    step_bar: makes the display of the steps, from the [train] config and the first
    step (the master process only); without one, the lines go to the trainer's log."""
    train_config = trainer.config.train
    read_every = 1 if trainer.device.type == "cpu" else train_config.log_interval
    meters = Meters(state.elapsed, state.step, LossLog(trainer.device, read_every))
    with_bar = step_bar is not None and trainer.ddp.is_master
    bar = step_bar(train_config, state.step) if with_bar else _NoBar(trainer.log)
    stop_reason, stop_signal = "max_iters", None
    with contextlib.closing(bar):
        trainer.model.train()
        # the evaluation a signal kept the run from (see TrainState.eval_pending)
        stopped = state.eval_pending and not _evaluate_in_loop(trainer, state, meters, bar)
        while not stopped and state.step < train_config.max_iters:
            lr = optim.lr_at(state.step, trainer.config, state.elapsed)
            optim.set_lr(trainer.optimizer, lr)
            got_signal = train_step(trainer, state, meters.clock, meters.losses)
            out_of_time = train_config.max_time > 0 and state.elapsed >= train_config.max_time
            step = state.step
            must_save = step % train_config.eval_interval == 0 or step == train_config.max_iters
            _record_step(trainer, state, meters, lr, got_signal or out_of_time or must_save)
            bar.advance(meters.loss, lr, meters.speed.tokens_per_s, state.elapsed)
            stopped = got_signal  # this rank's signal, or SIGTERM sent to another rank
            if not stopped and (must_save or out_of_time):
                stopped = not _evaluate_in_loop(trainer, state, meters, bar)
            if stopped:
                # the step is done, its evaluation (if due) is not: resume runs it first
                state.eval_pending = must_save or out_of_time
                save(trainer, state)
            elif out_of_time:
                stop_reason = "max_time"
                break
        if stopped:
            stop_reason, stop_signal = "signal", signals.pending() or signal.SIGTERM
    return TrainResult(
        run_dir=trainer.out_dir,
        step=state.step,
        best_val_loss=state.best_val_loss,
        tokens_seen=state.tokens_seen,
        elapsed=state.elapsed,
        stop_reason=stop_reason,
        signal=stop_signal,
        rank=trainer.ddp.rank,
    )


def _record_step(
    trainer: Trainer, state: TrainState, meters: Meters, lr: float, read_now: bool
) -> None:
    """Read the loss when due (or `read_now`), and write the step to metrics.jsonl
    every log_interval steps."""
    if meters.losses.due(state.step) or read_now:
        meters.loss, bad = meters.losses.read()  # the GPU catches up here
        if bad is not None:
            trainer.optimizer.zero_grad(set_to_none=True)
            raise _diverged(trainer, state, f"the loss became {bad[1]} at step {bad[0]}")
        if not trainer.ddp.enabled:
            state.elapsed = meters.clock.now()  # so the step is timed as done, not queued
        meters.speed.update(state.step, trainer.tokens_per_step)
    if state.step % trainer.config.train.log_interval == 0 or state.step == 1:
        trainer.record(
            {
                "step": state.step,
                "loss": meters.loss,
                "lr": lr,
                "tokens": state.tokens_seen,
                "time": round(state.elapsed, 3),
                "tokens_per_s": round(meters.speed.tokens_per_s, 1),
            }
        )


def _evaluate_in_loop(trainer: Trainer, state: TrainState, meters: Meters, bar: StepBar) -> bool:
    """Evaluate and save, report it, and redraw loss.png now and then; False when a
    signal arrived during the evaluation (nothing was saved then)."""
    line = evaluate_and_save(trainer, state, stoppable=True)
    if line is None:
        return False
    bar.write(line)
    if trainer.ddp.is_master and time.perf_counter() - meters.last_plot > PLOT_EVERY_SECONDS:
        checkpoint.plot_losses(trainer.out_dir)
        meters.last_plot = time.perf_counter()
    meters.speed.skip(state.step)  # tokens/s is of training steps only
    return True


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    force: bool = False,
    data: TrainData | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    step_bar: Callable[[TrainConfig, int], StepBar] | None = None,
) -> TrainResult:
    """Train `config`'s model and write its run directory (train.out_dir).

    resume: continue from out_dir/trainer.pt (use `config.resume_config` for the config).
    data: tokenised splits to use instead of preparing config.data (tests, benchmarks).
    progress: show data preparation's progress bars on stderr.
    log: receives the trainer's lines (what it trains, each evaluation); silent if None.
    step_bar: makes a display of the steps (see `fit`); none if None.
    """
    # A signal sets a flag (signals.py): setup polls it between its phases (preparing
    # data polls it too) and stops, cleaning up; the loop saves, then stops.
    with signals.handled():
        ddp = setup_distributed(config.train.device)
        out_dir = Path(config.train.out_dir)
        # One trainer per run directory, for the whole run: rank 0 holds the lock.
        lock = checkpoint.RunLock(out_dir) if ddp.is_master else contextlib.nullcontext()
        finished = False
        try:
            with lock:
                before = checkpoint.read_config(out_dir) if resume else None
                setup_args = dict(force=force, data=data, log=log or _silent, progress=progress)
                result = _setup_and_run(config, ddp, before, setup_args, step_bar)
                finished = True
                return result
        finally:
            ddp.close(together=finished)


def _setup_and_run(
    config: RunConfig,
    ddp: Distributed,
    before: dict | None,
    setup_args: dict,
    step_bar: Callable[..., StepBar] | None,
) -> TrainResult:
    """Set the trainer up and run it. A function of its own so that the trainer, and
    the DDP wrapper in it that holds the process group, are gone when `train` ends the
    group: gloo's threads torn down later, as Python exits, can abort the process."""
    trainer, state = setup(config, ddp, resume=before, **setup_args)
    return _run(trainer, state, before, step_bar)


def _run(
    trainer: Trainer,
    state: TrainState,
    before: dict | None,
    step_bar: Callable[..., StepBar] | None,
) -> TrainResult:
    """Report what is trained, save step 0 of a fresh run, fit, and draw the curves."""
    try:
        trainer.log(start_line(trainer))
        for warning in trainer.data.warnings if before is None else []:
            trainer.log(f"warning: {warning}")
        if before is not None:
            trainer.log(f"resuming {trainer.out_dir} at step {state.step}")
            change = optim.schedule_change(
                config_from_dict(before).train, trainer.config.train, state.step
            )
            if change:
                trainer.log(change)
        elif trainer.config.train.init_from:
            trainer.log(f"starting from {trainer.config.train.init_from}")
            # where a fine-tune starts: the source's loss on this data, kept as the best
            with checkpoint.cleared_on_failure(trainer.out_dir, fresh=trainer.ddp.is_master):
                trainer.log(evaluate_and_save(trainer, state) or "")
        else:
            with checkpoint.cleared_on_failure(trainer.out_dir, fresh=trainer.ddp.is_master):
                save(trainer, state)  # a fresh run is resumable from step 0
        result = fit(trainer, state, step_bar)
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()
    if trainer.ddp.is_master:
        checkpoint.plot_losses(trainer.out_dir)
    return result


# --------------------------------------------------------------------------- the trainer's lines


class _NoBar:
    """Where the lines go without a step bar: to the trainer's log."""

    def __init__(self, log: Callable[[str], None]):
        self.write = log

    def advance(self, loss: float, lr: float, tokens_per_s: float, elapsed: float) -> None:
        pass

    def close(self) -> None:
        pass


def _silent(_message: str) -> None:
    pass
