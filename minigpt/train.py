"""The trainer: AdamW, warmup + cosine schedule, gradient accumulation, evaluation,
checkpoints, exact resume, signals and DistributedDataParallel.

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
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from minigpt import checkpoint
from minigpt.batches import Batcher
from minigpt.checkpoint import BEST_WEIGHTS, TRAINER_STATE, MetricsLog, TrainerCheckpoint
from minigpt.config import (
    RunConfig,
    TrainConfig,
    config_from_dict,
    micro_steps,
    resolve_device,
)
from minigpt.data import check_block_size
from minigpt.device import check_memory
from minigpt.errors import MinigptError, Terminated
from minigpt.hf import Pretrained, load_pretrained
from minigpt.model import GPT
from minigpt.prepare import prepare, prepare_for_resume
from minigpt.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

EVAL_SEED_OFFSET = 1_000_003  # eval batch streams: far from the training streams' seeds
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
PLOT_EVERY_SECONDS = 60  # loss.png is redrawn at an evaluation at most this often


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Tokenised splits and the tokenizer that made them."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    summary: dict = field(default_factory=dict)
    """What config.json records about the data (source, token counts, ...)."""


def load_data(
    config: RunConfig,
    progress: bool = False,
    run_data: dict | None = None,
    tokenizer: Tokenizer | None = None,
) -> TrainData:
    """Prepare (or reuse the cached) token files of config.data.

    run_data: a resumed run's config.json "prepared_data": the data must then be
    exactly what the run was trained on (see `prepare.prepare_for_resume`).
    tokenizer: tokenise with this one (a fine-tuned model's) instead of building
    config.data.tokenizer for the corpus.
    """
    d = config.data
    settings = dict(
        tokenizer=tokenizer or d.tokenizer,
        vocab_size=None if tokenizer else d.vocab_size or None,
        glob=d.glob,
        text_field=d.text_field,
        workers=d.workers,
        bpe_sample_chars=d.bpe_sample_chars,
    )
    if run_data is None:
        prepared = prepare(d.source, data_dir=Path(d.data_dir), progress=progress, **settings)
    else:
        run_dir = Path(config.train.out_dir)
        prepared = prepare_for_resume(
            d.source, Path(d.data_dir), run_data, run_dir, progress=progress, **settings
        )
    scalars = {k: v for k, v in prepared.meta.items() if isinstance(v, str | int | float | bool)}
    return TrainData(
        tokenizer=prepared.tokenizer,
        train_tokens=prepared.train_tokens(),
        val_tokens=prepared.val_tokens(),
        summary={**scalars, "dir": str(prepared.dir.resolve())},
    )


# --------------------------------------------------------------------------- devices


@dataclass
class Distributed:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    started_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def gather(self, obj: object) -> list:
        """`obj` from every process, in rank order (all ranks must call it)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    started_here = False
    if not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (
            device_name == "auto" and torch.cuda.is_available()
        )
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started_here = True
    return Distributed(rank, local_rank, world_size, started_here)


def process_device(name: str, ddp: Distributed) -> torch.device:
    """The device `name` resolves to; under DDP each process takes cuda:LOCAL_RANK."""
    device = resolve_device(name)
    if ddp.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ddp.local_rank)
    return device


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 where it is supported and asked for (auto: CUDA with bf16 only), else None."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    # auto: only probe CUDA when the device is CUDA, so a driverless machine is never touched
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- optimisation


def make_optimizer(model: nn.Module, config: RunConfig, device: torch.device):
    """AdamW with weight decay on matrices (dim >= 2) only: not on biases or LayerNorm gains."""
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = {"lr": t.lr, "betas": (t.beta1, t.beta2)}
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=device.type != "cpu" or None, **kwargs)


def lr_at(step: int, config: RunConfig, elapsed: float = 0.0) -> float:
    """Linear warmup for warmup_iters steps, then cosine decay to min_lr.

    The decay runs over steps up to lr_decay_iters (default max_iters), or over
    elapsed seconds up to max_time when decay_by_time is set.
    """
    t = config.train
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if t.decay_by_time:
        ratio = min(1.0, elapsed / t.max_time)
    else:
        decay_iters = t.lr_decay_iters or t.max_iters
        if step >= decay_iters:
            return t.min_lr
        ratio = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


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
    optimizer: torch.optim.Optimizer
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
        t = self.config.train
        return t.batch_size * self.config.model.block_size * self.accum * self.ddp.world_size

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

    resume: the resumed run's config.json as it was before this session, or None.
    """
    t = config.train
    device = process_device(t.device, ddp)
    if t.threads:
        torch.set_num_threads(t.threads)
    out_dir = Path(t.out_dir)
    if ddp.is_master:  # the others would see the files rank 0 is about to write
        checkpoint.check_out_dir(out_dir, resume is not None, force)
    source = None
    if t.init_from and resume is None:
        source = load_pretrained(t.init_from)
        config = fine_tune_config(config, source)
    accum = micro_steps(config, ddp.world_size)
    check_training_memory(config, device)  # before preparing data for a model that cannot fit
    saved = checkpoint.load_trainer_state(out_dir / TRAINER_STATE) if resume else None
    if data is None:
        run_data = (resume.get("prepared_data") or {}) if resume is not None else None
        tokenizer = _fixed_tokenizer(source, config, out_dir)
        data = _load_data_once(config, ddp, progress, resume is not None, run_data, tokenizer)
    _check_data(data, config.model.block_size, out_dir if resume else None)

    config = replace(config, model=config.model.with_vocab(data.tokenizer.vocab_size))
    check_training_memory(config, device)
    torch.manual_seed(t.seed)
    model = GPT(config.model).to(device)
    if source is not None:
        _load_source_weights(model, source)
    optimizer = make_optimizer(model, config, device)
    torch.manual_seed(t.seed + 7919 * (ddp.rank + 1))  # dropout: differs per rank
    first_stream = ddp.rank * accum
    streams = [
        Batcher(data.train_tokens, config.model.block_size, t.batch_size, t.seed + j, device)
        for j in range(first_stream, first_stream + accum)
    ]
    log = log if ddp.is_master else _silent
    trainer = Trainer(config, ddp, device, data, model, optimizer, accum, log)
    state = TrainState(streams=streams)
    if saved is not None:
        restore(trainer, state, saved)
    if ddp.is_master:
        with _cleared_on_failure(out_dir, fresh=resume is None):
            _write_run_files(trainer, resume=resume is not None, force=force, step=state.step)
            trainer.metrics = MetricsLog(out_dir)
    return trainer, state


@contextlib.contextmanager
def _cleared_on_failure(out_dir: Path, fresh: bool):
    """A fresh run whose first files cannot all be written (a full disk) leaves none:
    a run directory without weights would pass for a run and load as nothing."""
    try:
        yield
    except BaseException:
        if fresh:
            checkpoint.clear_run(out_dir)
        raise


def check_training_memory(config: RunConfig, device: torch.device) -> None:
    """Refuse a run whose weights, gradients, AdamW moments (16 bytes a parameter) and
    one micro-batch's activations cannot fit on the device: a lower bound, so a run
    that fits is never refused."""
    model = config.model if config.model.vocab_size else replace(config.model, vocab_size=1)
    B, T, C = config.train.batch_size, model.block_size, model.n_embd
    # activations kept for backward: ~14 floats a token per layer (LN, QKV, attention
    # output, LN, the MLP's 4C twice), plus the logits and their gradient
    activations = 4 * B * T * (model.n_layer * 14 * C + 2 * model.vocab_size)
    needed = 16 * model.num_params() + model.module_bytes() + activations
    check_memory(needed, device, f"training a model of {model.describe()} with batch_size {B:,}")


def _load_data_once(
    config: RunConfig,
    ddp: Distributed,
    progress: bool,
    resumed: bool,
    run_data: dict | None,
    tokenizer: Tokenizer | None,
) -> TrainData:
    """Rank 0 prepares (and caches) the data first; the others then reuse its folder."""
    if not ddp.is_master:
        ddp.barrier()
    run_data = run_data if resumed else None
    data = load_data(config, progress and ddp.is_master, run_data, tokenizer)
    if ddp.is_master:
        ddp.barrier()
    return data


# --------------------------------------------------------------------------- fine-tuning

# [model] settings a fine-tune may choose for itself: they change how the source's
# weights are trained or computed, not what the weights are
FREE_MODEL_SETTINGS = ("dropout", "attention", "init_std")


def fine_tune_config(config: RunConfig, source: Pretrained) -> RunConfig:
    """The config of a run that starts from `source`: its model shape and tokenizer.

    A [model] setting given explicitly must agree with the source, except those in
    FREE_MODEL_SETTINGS and a smaller block_size (the positions are cropped, as
    nanoGPT's crop_block_size does). A tokenizer setting is an error: the source's
    token ids are what its embeddings mean.
    """
    given = {key.split(".", 1)[1] for key in config.explicit if key.startswith("model.")}
    model = source.config
    for key in sorted(given):
        ours, theirs = getattr(config.model, key), getattr(source.config, key)
        if key == "vocab_size" and ours == 0:  # 0 means "the tokenizer's": the source's
            continue
        if key in FREE_MODEL_SETTINGS or ours == theirs:
            model = replace(model, **{key: ours})
        elif key == "block_size" and ours < theirs:
            model = replace(model, block_size=ours)
        else:
            theirs_text = (
                f"larger than the {theirs} positions {source.source} has"
                if key == "block_size"
                else f"but {source.source} has {key}={theirs!r}"
            )
            raise MinigptError(
                f"model.{key}={ours!r} is set, {theirs_text}",
                hint=f"drop model.{key} from the config: --init-from takes the model's "
                "shape from the source (block_size may only be lowered)",
            )
    for key in ("data.tokenizer", "data.vocab_size"):
        if key in config.explicit:
            raise MinigptError(
                f"{key} is set, but a run started from {source.source} uses its tokenizer",
                hint=f"drop {key} from the config",
            )
    data = replace(config.data, tokenizer=source.tokenizer.kind, vocab_size=0)
    return replace(config, model=model, data=data)


def _fixed_tokenizer(
    source: Pretrained | None, config: RunConfig, out_dir: Path
) -> Tokenizer | None:
    """The tokenizer the data must be tokenised with, when the corpus does not choose
    it: a fine-tune's source's; on resume, the one the fine-tune saved."""
    if source is not None:
        return source.tokenizer
    if config.train.init_from:  # a resumed fine-tune
        return load_tokenizer(out_dir / TOKENIZER_FILE)
    return None


def _load_source_weights(model: GPT, source: Pretrained) -> None:
    """The source's weights, positions cropped to the model's block_size."""
    state = dict(source.state)
    if "pos_emb.weight" in state:  # rotary models have no position rows to crop
        state["pos_emb.weight"] = state["pos_emb.weight"][: model.config.block_size]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:  # the head is tied
        raise MinigptError(
            f"the weights of {source.source} do not fit the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            hint="the source is damaged",
        )


def _check_data(data: TrainData, block_size: int, resumed_run: Path | None) -> None:
    """Both splits hold a window of block_size + 1 tokens; a resumed run's data is
    tokenised as it was when the run started."""
    source = f" of {data.summary['source']}" if "source" in data.summary else ""
    for split, tokens in (("train", data.train_tokens), ("val", data.val_tokens)):
        check_block_size(len(tokens), block_size, f"the {split} split{source}")
    if resumed_run is None:
        return
    if load_tokenizer(resumed_run / TOKENIZER_FILE).to_json() != data.tokenizer.to_json():
        raise MinigptError(
            f"the data's tokenizer differs from the one {resumed_run} was trained with",
            hint="the corpus changed since the run started; resume needs the same data",
        )


def _wrap(model: GPT, config: RunConfig, ddp: Distributed, device: torch.device) -> nn.Module:
    """The module the loop calls: compiled if asked, inside DDP when there are several processes."""
    if device.type == "cuda" and config.train.dtype != "float32":
        # What autocast leaves in float32 (and every matmul of a float32 GPU) runs on
        # TF32 tensor cores, as in nanoGPT; train.dtype=float32 keeps full precision.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # dynamic=False: the shapes of a run never change, so keep every kernel specialised
    # to them. torch.compile's default marks a size dynamic when a second model of
    # another shape is compiled in the same process (a sweep in a notebook), and the
    # second model's kernels would then be compiled for symbolic sizes.
    compiled = torch.compile(model, dynamic=False) if config.train.compile else model
    if not ddp.enabled:
        return compiled
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(compiled, device_ids=device_ids)


def restore(trainer: Trainer, state: TrainState, saved: TrainerCheckpoint) -> None:
    """Continue from trainer.pt: weights, optimizer, batch streams, RNG, counters."""
    first_stream = trainer.ddp.rank * trainer.accum
    try:
        trainer.model.load_state_dict(saved.model)
        trainer.optimizer.load_state_dict(saved.optimizer)
        for j, stream in enumerate(state.streams):
            stream.load_state_dict(saved.batchers[first_stream + j])
        if len(saved.rng) == trainer.ddp.world_size:
            _set_rng_state(saved.rng[trainer.ddp.rank], trainer.device)
    except (RuntimeError, KeyError, IndexError, ValueError, TypeError) as err:
        raise MinigptError(
            f"{trainer.out_dir / TRAINER_STATE} does not fit this run "
            f"({str(err).splitlines()[0][:100]})",
            hint="resume with the same config, gradient accumulation and data",
        ) from err
    state.step, state.tokens_seen = int(saved.step), int(saved.tokens_seen)
    state.elapsed, state.best_val_loss = float(saved.elapsed), float(saved.best_val_loss)
    state.saved_step = state.step


def _write_run_files(trainer: Trainer, *, resume: bool, force: bool, step: int) -> None:
    """A fresh run writes config.json, tokenizer.json and its initial weights; a resumed
    one records its new train settings and drops the metrics logged after `step`."""
    out_dir, config = trainer.out_dir, trainer.config.to_dict()
    sections = {
        "train": {**config["train"], "out_dir": str(out_dir)},
        "data": config["data"],
        "prepared_data": trainer.data.summary,
    }
    if resume:
        checkpoint.truncate_metrics(out_dir, step)
        checkpoint.update_config(out_dir, sections)
        return
    if force:
        checkpoint.clear_run(out_dir)
    checkpoint.write_run_files(out_dir, trainer.model, trainer.data.tokenizer, sections)


# --------------------------------------------------------------------------- one step


class _LossLog:
    """The training loss of each step, kept on the device until it is read.

    Reading a CUDA tensor on the host waits for the GPU to finish, and while the CPU
    waits it cannot queue the next step's kernels: one read per step leaves the GPU
    idle between steps. So losses are read every `read_every` steps (nanoGPT reads at
    its log_interval too), and the first non-finite one is remembered on the device,
    with its step, for `read` to report. The CPU runs in step with itself: it reads
    every step, for a live progress bar.
    """

    def __init__(self, device: torch.device, read_every: int):
        self.read_every = read_every
        self.last: Tensor | None = None  # the latest step's mean loss, a 0-d tensor
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)

    def add(self, loss: Tensor, step: int) -> None:
        """The mean loss of `step` (a 0-d float tensor on the device); no host sync."""
        first_bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_loss = torch.where(first_bad, loss, self.bad_loss)
        self.last = loss

    def due(self, step: int) -> bool:
        return step % self.read_every == 0 or step == 1

    def read(self, trainer: Trainer, state: TrainState) -> float:
        """The latest loss as a float (a host sync); raises, keeping the last saved
        state, if any loss since the last read was not finite."""
        bad_step, bad_loss, last = torch.stack(
            [self.bad_step.double(), self.bad_loss.double(), self.last.double()]
        ).tolist()
        if bad_step >= 0:
            trainer.optimizer.zero_grad(set_to_none=True)
            raise _diverged(trainer, state, f"the loss became {bad_loss} at step {int(bad_step)}")
        return last


def train_step(
    trainer: Trainer, state: TrainState, signals: _SignalFlag, clock: _Clock, losses: _LossLog
) -> bool:
    """One optimizer step over `accum` micro-batches; whether any rank got a signal.

    The mean loss goes to `losses`, unread: one process reads it when due. With DDP the
    ranks agree on the loss, the signal and the clock in one small all-reduce per step,
    which reads it, and a non-finite loss then raises at once, keeping the last saved
    state, as `_LossLog.read` does later for one process."""
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
        # One small all-reduce: the mean loss over all ranks, whether any rank got a
        # signal, and a shared clock, so that every rank stops and schedules in step.
        shared = torch.tensor(
            [0.0, float(signals.signum), clock.now()], dtype=torch.float64, device=trainer.device
        )
        shared[0] = loss
        dist.all_reduce(shared, op=dist.ReduceOp.SUM)
        shared /= ddp.world_size
        loss_value, got_signal, state.elapsed = shared.tolist()
        loss = shared[0].float()
        if not math.isfinite(loss_value):
            trainer.optimizer.zero_grad(set_to_none=True)
            raise _diverged(
                trainer, state, f"the loss became {loss_value} at step {state.step + 1}"
            )
    else:
        got_signal, state.elapsed = signals.signum != 0, clock.now()
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
def evaluate(trainer: Trainer, signals: _SignalFlag | None = None) -> dict[str, float] | None:
    """Mean loss on the same eval_iters batches of each split every time; None when a
    signal arrives meanwhile (a long evaluation must not delay a stop).

    Runs the uncompiled module: eval mode would make torch.compile build a
    second graph, which costs more than the few forward passes it speeds up.
    """
    t, ddp, model = trainer.config.train, trainer.ddp, trainer.model
    model.eval()
    result: dict[str, float] | None = {}
    for split in ("train", "val"):
        tokens = trainer.data.train_tokens if split == "train" else trainer.data.val_tokens
        seed = t.seed + EVAL_SEED_OFFSET + ddp.rank
        batcher = Batcher(tokens, model.config.block_size, t.batch_size, seed, trainer.device)
        total = torch.zeros((), device=trainer.device)
        for _ in range(t.eval_iters):
            if signals is not None and _any_rank(ddp, signals.signum != 0, trainer.device):
                result = None
                break
            x, y = batcher.next()
            with trainer.autocast():
                _, loss = model(x, y, loss_chunk=t.loss_chunk)
            total += loss.float()
        if result is None:
            break
        if ddp.enabled:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        result[split] = total.item() / (t.eval_iters * ddp.world_size)
    model.train()
    return result


def _any_rank(ddp: Distributed, flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any process (every process must ask together)."""
    if not ddp.enabled:
        return flag
    shared = torch.tensor(float(flag), device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return bool(shared.item())


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
    rngs = ddp.gather(_rng_state(trainer.device))
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
    t, model = trainer.config.train, trainer.model
    batcher = Batcher(
        trainer.data.train_tokens,
        model.config.block_size,
        t.batch_size,
        t.seed + EVAL_SEED_OFFSET,
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


def evaluate_and_save(
    trainer: Trainer, state: TrainState, signals: _SignalFlag | None = None
) -> str | None:
    """Evaluate, keep the best weights, save the last state; the line to report (None
    when a signal cut the evaluation short: nothing is saved then)."""
    losses = evaluate(trainer, signals)
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
    save(trainer, state, loss_checked=True)  # the losses above are finite
    return (
        f"step {state.step:>6}: train loss {losses['train']:.4f}, val loss "
        f"{losses['val']:.4f}{' (best)' if improved else ''}  [{clock_text(state.elapsed)}]"
    )


# --------------------------------------------------------------------------- the loop


def fit(trainer: Trainer, state: TrainState, progress: bool) -> TrainResult:
    """Step until max_iters, max_time or a signal; evaluate and save along the way."""
    t = trainer.config.train
    bar = _ProgressBar(t, state.step, progress and trainer.ddp.is_master, trainer.log)
    clock, speed = _Clock(state.elapsed), _Throughput(state.step)
    losses = _LossLog(trainer.device, 1 if trainer.device.type == "cpu" else t.log_interval)
    loss = math.nan  # the latest loss read (see _LossLog)
    stop_reason, stop_signal, last_plot = "max_iters", None, time.perf_counter()
    with _SignalFlag() as signals, contextlib.closing(bar):
        trainer.model.train()
        while state.step < t.max_iters:
            lr = lr_at(state.step, trainer.config, state.elapsed)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            got_signal = train_step(trainer, state, signals, clock, losses)
            out_of_time = t.max_time > 0 and state.elapsed >= t.max_time
            must_save = state.step % t.eval_interval == 0 or state.step == t.max_iters
            if losses.due(state.step) or got_signal or out_of_time or must_save:
                loss = losses.read(trainer, state)  # the GPU catches up here
                if not trainer.ddp.enabled:
                    state.elapsed = clock.now()  # so the step is timed as done, not queued
                speed.update(state.step, trainer.tokens_per_step)
            if state.step % t.log_interval == 0 or state.step == 1:
                trainer.record(
                    {
                        "step": state.step,
                        "loss": loss,
                        "lr": lr,
                        "tokens": state.tokens_seen,
                        "time": round(state.elapsed, 3),
                        "tokens_per_s": round(speed.tokens_per_s, 1),
                    }
                )
            bar.advance(loss, lr, speed.tokens_per_s, state.elapsed)
            if got_signal:  # this rank's signal, or SIGTERM sent to another rank
                stop_reason, stop_signal = "signal", signals.signum or signal.SIGTERM
                save(trainer, state)
                break
            if must_save or out_of_time:
                line = evaluate_and_save(trainer, state, signals)
                if line is None:  # a signal arrived during the evaluation
                    stop_reason, stop_signal = "signal", signals.signum or signal.SIGTERM
                    save(trainer, state)
                    break
                bar.write(line)
                if trainer.ddp.is_master and time.perf_counter() - last_plot > PLOT_EVERY_SECONDS:
                    checkpoint.plot_losses(trainer.out_dir)
                    last_plot = time.perf_counter()
                speed.skip(state.step)  # tokens/s is of training steps only
            if out_of_time:
                stop_reason = "max_time"
                break
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


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    force: bool = False,
    data: TrainData | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `config`'s model and write its run directory (train.out_dir).

    resume: continue from out_dir/trainer.pt (use `config.resume_config` for the config).
    data: tokenised splits to use instead of preparing config.data (tests, benchmarks).
    progress: show progress bars (data preparation, steps) on stderr.
    log: receives the trainer's lines (what it trains, each evaluation); silent if None.
    """
    ddp = setup_distributed(config.train.device)
    out_dir = Path(config.train.out_dir)
    # One trainer per run directory, for the whole run: rank 0 holds the lock.
    lock = checkpoint.RunLock(out_dir) if ddp.is_master else contextlib.nullcontext()
    try:
        with lock, _sigterm_raises():
            before = checkpoint.read_config(out_dir) if resume else None
            trainer, state = setup(
                config,
                ddp,
                resume=before,
                force=force,
                data=data,
                log=log or _silent,
                progress=progress,
            )
            return _run(trainer, state, before, progress)
    finally:
        if ddp.started_here and dist.is_initialized():
            dist.destroy_process_group()


def _run(trainer: Trainer, state: TrainState, before: dict | None, progress: bool) -> TrainResult:
    """Report what is trained, save step 0 of a fresh run, fit, and draw the curves."""
    try:
        trainer.log(_start_line(trainer))
        if before is not None:
            trainer.log(f"resuming {trainer.out_dir} at step {state.step}")
            change = schedule_change(
                config_from_dict(before).train, trainer.config.train, state.step
            )
            if change:
                trainer.log(change)
        elif trainer.config.train.init_from:
            trainer.log(f"starting from {trainer.config.train.init_from}")
            # where a fine-tune starts: the source's loss on this data, kept as the best
            with _cleared_on_failure(trainer.out_dir, fresh=trainer.ddp.is_master):
                trainer.log(evaluate_and_save(trainer, state) or "")
        else:
            with _cleared_on_failure(trainer.out_dir, fresh=trainer.ddp.is_master):
                save(trainer, state)  # a fresh run is resumable from step 0
        result = fit(trainer, state, progress)
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()
    if trainer.ddp.is_master:
        checkpoint.plot_losses(trainer.out_dir)
    return result


def schedule_change(before: TrainConfig, now: TrainConfig, step: int) -> str | None:
    """One line when a resumed run's lr schedule differs from the one it was started
    with (a new max_iters moves the end of the cosine decay), else None. Resume
    reproduces a run exactly only when the schedule is unchanged."""
    old, new = _schedule(before), _schedule(now)
    changed = [f"{key} {old[key]} -> {new[key]}" for key in old if old[key] != new[key]]
    if not changed:
        return None
    return (
        f"the lr schedule changed on resume ({', '.join(changed)}): from step {step + 1} "
        "the lr follows the new one, so this run differs from one trained with these "
        "settings from the start"
    )


def _schedule(t: TrainConfig) -> dict[str, object]:
    """What `lr_at` depends on."""
    decay_end = f"{t.max_time} s" if t.decay_by_time else f"step {t.lr_decay_iters or t.max_iters}"
    return {
        "lr": t.lr,
        "min_lr": t.min_lr,
        "warmup_iters": t.warmup_iters,
        "decay ends at": decay_end,
    }


# --------------------------------------------------------------------------- reporting


@contextlib.contextmanager
def _sigterm_raises():
    """Until the loop's own handler takes over (`_SignalFlag`), SIGTERM raises
    Terminated: preparing data or building a model stops within seconds and cleans up
    after itself, where the default action would kill the process mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _SignalFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step, so it can save first."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _Clock:
    """Seconds of training: what earlier sessions ran plus this session's wall time."""

    def __init__(self, elapsed_before: float):
        self.elapsed_before, self.session_start = elapsed_before, time.perf_counter()

    def now(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.session_start)


class _Throughput:
    """Tokens per second between the steps whose loss was read (only then has the GPU
    caught up with the clock), smoothed; the first reading of a session is taken as is."""

    def __init__(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()
        self.tokens_per_s = 0.0
        self.measured = False

    def update(self, step: int, tokens_per_step: int) -> None:
        now = time.perf_counter()
        rate = (step - self.step) * tokens_per_step / max(now - self.time, 1e-9)
        self.tokens_per_s = 0.9 * self.tokens_per_s + 0.1 * rate if self.measured else rate
        self.step, self.time, self.measured = step, now, True

    def skip(self, step: int) -> None:
        """Leave out the time since the last reading (an evaluation, a save)."""
        self.step, self.time = step, time.perf_counter()


class _ProgressBar:
    """The step bar (loss, lr, tokens/s, time left); lines printed while it runs go above it."""

    def __init__(self, t: TrainConfig, initial: int, enabled: bool, log: Callable[[str], None]):
        self.max_time, self.log = t.max_time, log
        self.bar = tqdm(
            total=t.max_iters,
            initial=initial,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )

    def advance(self, loss: float, lr: float, tokens_per_s: float, elapsed: float) -> None:
        self.bar.update(1)
        left = f", {clock_text(max(0.0, self.max_time - elapsed))} left" if self.max_time else ""
        self.bar.set_postfix_str(
            f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s / 1000:.1f}k tok/s{left}", refresh=False
        )

    def write(self, message: str) -> None:
        self.bar.write(message) if not self.bar.disable else self.log(message)

    def close(self) -> None:
        self.bar.close()


def _silent(_message: str) -> None:
    pass


def clock_text(seconds: float) -> str:
    """Seconds as m:ss."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _start_line(trainer: Trainer) -> str:
    ddp, accum, data = trainer.ddp, trainer.accum, trainer.data
    return (
        f"training {trainer.model.num_params() / 1e6:.2f}M parameters on {trainer.device}"
        f"{f' x {ddp.world_size} processes' if ddp.enabled else ''}"
        f"{' (bf16 autocast)' if trainer.amp else ''}: {trainer.tokens_per_step:,} tokens per step"
        f"{f' ({accum} micro-batches)' if accum > 1 else ''}, "
        f"{len(data.train_tokens):,} train / {len(data.val_tokens):,} val tokens"
    )
