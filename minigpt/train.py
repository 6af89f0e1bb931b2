"""The trainer: AdamW, warmup + cosine schedule, gradient accumulation, evaluation,
checkpoints, exact resume, signals and DistributedDataParallel.

One optimizer step sees `accum_total` micro-batches. Micro-batch j of every step
comes from its own batch stream (a `Batcher` seeded with seed + j), and process r
of W runs streams r*accum .. (r+1)*accum - 1. So a run on W processes sees the
same batches as one process with W times the accumulation, and its losses match
up to float rounding; the streams' states are saved, so a resume continues them.

The last state (weights, optimizer, step, RNG and batch streams) lives in ONE
file, trainer.pt, written atomically, so a kill at any moment leaves either the
old state or the new one, never a mix. model-last.safetensors is a copy of its
weights for sampling; model.safetensors holds the weights of the best val loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minigpt.atomic import atomic_path, write_json_atomic, write_text_atomic
from minigpt.checkpoint import (
    BEST_WEIGHTS,
    CONFIG_FILE,
    LAST_WEIGHTS,
    TOKENIZER_FILE,
    TRAINER_STATE,
    save_weights,
    write_run_files,
)
from minigpt.config import RunConfig, micro_steps, resolve_device
from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer, load_tokenizer

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
TRAINER_FORMAT = 1
EVAL_SEED_OFFSET = 1_000_003  # eval batch streams: far from the training streams' seeds
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, BEST_WEIGHTS, LAST_WEIGHTS, TRAINER_STATE, METRICS_FILE)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Tokenised splits and the tokenizer that made them."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    summary: dict = field(default_factory=dict)
    """What config.json records about the data (source, token counts, ...)."""


def load_data(config: RunConfig, is_master: bool = True) -> TrainData:
    """Prepare (or reuse the cached) token files of config.data and check block_size fits."""
    from minigpt import data as data_module

    d = config.data
    prepared = data_module.prepare(
        d.source,
        tokenizer=d.tokenizer,
        vocab_size=d.vocab_size or None,
        data_dir=Path(d.data_dir),
        glob=d.glob,
        progress=is_master,
    )
    data_module.check_block_size(prepared, config.model.block_size)
    summary = {"dir": str(prepared.dir)}
    if isinstance(getattr(prepared, "meta", None), dict):
        summary.update(
            {k: v for k, v in prepared.meta.items() if isinstance(v, str | int | float | bool)}
        )
    return TrainData(
        tokenizer=prepared.tokenizer,
        train_tokens=prepared.train_tokens(),
        val_tokens=prepared.val_tokens(),
        summary=summary,
    )


def _check_splits(data: TrainData, block_size: int) -> None:
    for name, tokens in (("train", data.train_tokens), ("val", data.val_tokens)):
        if len(tokens) < block_size + 1:
            raise MinigptError(
                f"the {name} split has {len(tokens)} tokens, too few for block_size={block_size}",
                hint="use a larger corpus or a smaller model.block_size",
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


# --------------------------------------------------------------------------- run directory


def check_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to start a fresh run over another one unless --force."""
    if resume or force or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MinigptError(f"output path {out_dir} is a file, not a directory")
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found:
        raise MinigptError(
            f"{out_dir} already holds a run ({', '.join(found[:3])})",
            hint=f"continue it with `minigpt train --resume {out_dir}`, overwrite it with "
            "--force, or pick another --out",
        )


def clear_run(out_dir: Path) -> None:
    """--force: remove the previous run's files so no old curve or state mixes in."""
    for name in (*RUN_FILES, LOSS_PLOT):
        (out_dir / name).unlink(missing_ok=True)


def load_trainer_state(path: str | Path) -> dict:
    """trainer.pt as plain tensors and numbers (weights_only=True: no arbitrary unpickling)."""
    path = Path(path)
    if not path.exists():
        raise MinigptError(
            f"{path} does not exist, so there is no state to resume",
            hint="start the run again (use --force to overwrite the directory)",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MinigptError(
            f"{path} holds objects other than plain tensors and numbers; refusing to unpickle it",
            hint="only resume from trainer.pt files written by minigpt",
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise MinigptError(
            f"{path} is damaged or truncated ({str(err).splitlines()[0][:80]})",
            hint="the run cannot be resumed; start it again with --force",
        ) from err
    required = {"format_version", "step", "model", "optimizer", "rng", "batchers"}
    if not isinstance(state, dict) or not required <= set(state):
        raise MinigptError(
            f"{path} is not a minigpt trainer state",
            hint="only resume from trainer.pt files written by minigpt",
        )
    if state["format_version"] != TRAINER_FORMAT:
        raise MinigptError(
            f"{path} has trainer format {state['format_version']!r}, this minigpt reads {TRAINER_FORMAT}"
        )
    return state


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a line cut short by a kill is skipped."""
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_losses(records: list[dict], path: Path) -> None:
    """loss.png: train loss per logged step and train/val loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.5,
                label="train (batch)")  # fmt: skip
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- the loop


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

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1) if self.signal else 0


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


def _gather(obj: object, ddp: Distributed) -> list:
    if not ddp.enabled:
        return [obj]
    out: list = [None] * ddp.world_size
    dist.all_gather_object(out, obj)
    return out


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    force: bool = False,
    data: TrainData | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `config`'s model and write its run directory (train.out_dir).

    resume: continue from out_dir/trainer.pt (use `resume_config` to get the config).
    data: tokenised splits to use instead of preparing config.data (tests, benchmarks).
    """
    from minigpt.data import Batcher

    t = config.train
    ddp = setup_distributed(t.device)
    cleanup = contextlib.ExitStack()
    try:
        device = process_device(t.device, ddp)
        if t.threads:
            torch.set_num_threads(t.threads)
        out_dir = Path(t.out_dir)
        say = (log or _print) if ddp.is_master else (lambda _msg: None)
        if ddp.is_master:  # the others would see the files rank 0 is about to write
            check_out_dir(out_dir, resume, force)
        accum = micro_steps(config, ddp.world_size)
        state = load_trainer_state(out_dir / TRAINER_STATE) if resume else None

        if data is None:
            if ddp.enabled and not ddp.is_master:
                dist.barrier()  # rank 0 prepares (and caches) the data first
            data = load_data(config, ddp.is_master)
            if ddp.enabled and ddp.is_master:
                dist.barrier()
        _check_splits(data, config.model.block_size)
        tokenizer = data.tokenizer
        if resume:
            saved = load_tokenizer(out_dir / TOKENIZER_FILE)
            if saved.to_json() != tokenizer.to_json():
                raise MinigptError(
                    f"the data's tokenizer differs from the one {out_dir} was trained with",
                    hint="the corpus changed since the run started; resume needs the same data",
                )

        model_config = config.model.with_vocab(tokenizer.vocab_size)
        config = replace(config, model=model_config)
        torch.manual_seed(t.seed)
        model = GPT(model_config).to(device)
        optimizer = make_optimizer(model, config, device)
        torch.manual_seed(t.seed + 7919 * (ddp.rank + 1))  # dropout: differs per rank

        first_stream = ddp.rank * accum
        streams = [
            Batcher(data.train_tokens, model_config.block_size, t.batch_size, t.seed + j, device)
            for j in range(first_stream, first_stream + accum)
        ]
        step, tokens_seen, elapsed_before, best_val = 0, 0, 0.0, math.inf
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                all_streams = state["batchers"]
                for j, stream in enumerate(streams):
                    stream.load_state_dict(all_streams[first_stream + j])
                rngs = state["rng"]
                if len(rngs) == ddp.world_size:
                    _set_rng_state(rngs[ddp.rank], device)
            except (RuntimeError, KeyError, IndexError, ValueError, TypeError) as err:
                raise MinigptError(
                    f"{out_dir / TRAINER_STATE} does not fit this run ({str(err).splitlines()[0][:100]})",
                    hint="resume with the same config, gradient accumulation and data",
                ) from err
            step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
            elapsed_before, best_val = float(state["elapsed"]), float(state["best_val_loss"])

        run_config = {
            "train": {**config.to_dict()["train"], "out_dir": str(out_dir)},
            "data": config.to_dict()["data"],
            "prepared_data": data.summary,
        }
        metrics_path = out_dir / METRICS_FILE
        if ddp.is_master:
            if force and not resume:
                clear_run(out_dir)
            if resume:
                records = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step]
                write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
                config_json = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8"))
                config_json.update(run_config)
                write_json_atomic(out_dir / CONFIG_FILE, config_json)
            else:
                write_run_files(out_dir, model, tokenizer, extra_config=run_config)

        compiled = torch.compile(model) if t.compile else model
        train_model = (
            nn.parallel.DistributedDataParallel(
                compiled, device_ids=[device.index] if device.type == "cuda" else None
            )
            if ddp.enabled
            else compiled
        )
        amp = autocast_dtype(t.dtype, device)

        def autocast():
            if amp is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=device.type, dtype=amp)

        def save_last() -> None:
            """trainer.pt (everything resume needs) then model-last.safetensors."""
            batchers = [
                s for group in _gather([s.state_dict() for s in streams], ddp) for s in group
            ]
            rngs = _gather(_rng_state(device), ddp)
            if not ddp.is_master:
                return
            trainer_state = {
                "format_version": TRAINER_FORMAT,
                "step": step,
                "tokens_seen": tokens_seen,
                "elapsed": elapsed,
                "best_val_loss": best_val,
                "world_size": ddp.world_size,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "rng": [{k: v.cpu() for k, v in r.items()} for r in rngs],
                "batchers": batchers,
            }
            with atomic_path(out_dir / TRAINER_STATE) as tmp:
                torch.save(trainer_state, tmp)
            save_weights(model, out_dir / LAST_WEIGHTS)

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            """Mean loss on the same eval_iters batches of each split every time.

            Runs the uncompiled module: eval mode would make torch.compile build a
            second graph, which costs more than the few forward passes it speeds up.
            """
            model.eval()
            result = {}
            for split, tokens in (("train", data.train_tokens), ("val", data.val_tokens)):
                batcher = Batcher(
                    tokens, model_config.block_size, t.batch_size,
                    t.seed + EVAL_SEED_OFFSET + ddp.rank, device,
                )  # fmt: skip
                total = torch.zeros((), device=device)
                for _ in range(t.eval_iters):
                    x, y = batcher.next()
                    with autocast():
                        _, loss = model(x, y)
                    total += loss.float()
                if ddp.enabled:
                    dist.all_reduce(total, op=dist.ReduceOp.SUM)
                result[split] = total.item() / (t.eval_iters * ddp.world_size)
            model.train()
            return result

        metrics = open(metrics_path, "a", encoding="utf-8") if ddp.is_master else None  # noqa: SIM115
        if metrics is not None:
            cleanup.callback(metrics.close)

        def record(entry: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(entry) + "\n")
                metrics.flush()

        tokens_per_step = t.batch_size * model_config.block_size * accum * ddp.world_size
        say(
            f"training {model.num_params() / 1e6:.2f}M parameters on {device}"
            f"{f' x {ddp.world_size} processes' if ddp.enabled else ''}"
            f"{' (bf16 autocast)' if amp else ''}: {tokens_per_step:,} tokens per step"
            f"{f' ({accum} micro-batches)' if accum > 1 else ''}, "
            f"{len(data.train_tokens):,} train / {len(data.val_tokens):,} val tokens"
        )
        if resume:
            say(f"resuming {out_dir} at step {step}")

        elapsed = elapsed_before
        if state is None:
            save_last()  # a fresh run is resumable from step 0
        bar = _progress_bar(t.max_iters, step, enabled=progress and ddp.is_master)
        cleanup.callback(bar.close)

        def report(message: str) -> None:
            bar.write(message) if not bar.disable else say(message)

        stop_reason, stop_signal = "max_iters", None
        loss_value = math.nan
        session_start = time.perf_counter()
        first_step, tokens_per_s = step, 0.0
        last_plot = time.perf_counter()
        with _SignalFlag() as signals:
            model.train()
            while step < t.max_iters:
                step_start = time.perf_counter()
                lr = lr_at(step, config, elapsed)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro, stream in enumerate(streams):
                    x, y = stream.next()
                    sync = ddp.enabled and micro < accum - 1
                    with train_model.no_sync() if sync else contextlib.nullcontext():
                        with autocast():
                            _, loss = train_model(x, y)
                        loss_sum += loss.detach().float()
                        (loss / accum).backward()
                # One small all-reduce: the mean loss over all ranks, whether any rank got a
                # signal, and a shared clock (so every rank stops and schedules in step).
                clock = elapsed_before + (time.perf_counter() - session_start)
                flags = torch.stack([
                    (loss_sum / accum).double(),
                    torch.tensor(float(signals.signum), dtype=torch.float64, device=device),
                    torch.tensor(clock, dtype=torch.float64, device=device),
                ])  # fmt: skip
                if ddp.enabled:
                    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
                    flags /= ddp.world_size
                loss_value, got_signal, elapsed = flags.tolist()
                if not math.isfinite(loss_value):
                    optimizer.zero_grad(set_to_none=True)
                    raise MinigptError(
                        f"the loss became {loss_value} at step {step + 1}; training stopped and "
                        f"the last good checkpoint in {out_dir} is kept",
                        hint="lower train.lr, raise train.warmup_iters, or set train.grad_clip",
                    )
                if t.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                step_tokens_per_s = tokens_per_step / max(time.perf_counter() - step_start, 1e-9)
                tokens_per_s = step_tokens_per_s if step == first_step + 1 else (
                    0.9 * tokens_per_s + 0.1 * step_tokens_per_s
                )  # fmt: skip
                if step % t.log_interval == 0 or step == 1:
                    record({"step": step, "loss": loss_value, "lr": lr, "tokens": tokens_seen,
                            "time": round(elapsed, 3), "tokens_per_s": round(tokens_per_s, 1)})  # fmt: skip
                bar.update(1)
                time_left = f", {_clock(max(0.0, t.max_time - elapsed))} left" if t.max_time else ""
                bar.set_postfix_str(
                    f"loss {loss_value:.4f} lr {lr:.2e} {tokens_per_s / 1000:.1f}k tok/s{time_left}",
                    refresh=False,
                )

                out_of_time = t.max_time > 0 and elapsed >= t.max_time
                if got_signal:  # this rank's signal, or SIGTERM sent to another rank
                    stop_reason, stop_signal = "signal", signals.signum or signal.SIGTERM
                    break
                if step % t.eval_interval == 0 or step == t.max_iters or out_of_time:
                    losses = evaluate()
                    improved = losses["val"] < best_val
                    best_val = min(best_val, losses["val"])
                    record({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                            "time": round(elapsed, 3)})  # fmt: skip
                    report(
                        f"step {step:>6}: train loss {losses['train']:.4f}, val loss "
                        f"{losses['val']:.4f}{' (best)' if improved else ''}  [{_clock(elapsed)}]"
                    )
                    if improved and ddp.is_master:
                        save_weights(model, out_dir / BEST_WEIGHTS)
                    save_last()
                    if ddp.is_master and time.perf_counter() - last_plot > 60:
                        plot_losses(read_metrics(metrics_path), out_dir / LOSS_PLOT)
                        last_plot = time.perf_counter()
                if out_of_time:
                    stop_reason = "max_time"
                    break
            if stop_reason == "signal":
                save_last()
        cleanup.close()
        if ddp.is_master:
            plot_losses(read_metrics(metrics_path), out_dir / LOSS_PLOT)
        result = TrainResult(
            out_dir, step, best_val, tokens_seen, elapsed, stop_reason, stop_signal
        )
        if stop_reason != "signal":
            say(_summary(result))
        return result
    finally:
        cleanup.close()
        if ddp.started_here and dist.is_initialized():
            dist.destroy_process_group()


def _print(message: str) -> None:
    print(message, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )  # fmt: skip


def _summary(result: TrainResult) -> str:
    best = f"{result.best_val_loss:.4f}" if math.isfinite(result.best_val_loss) else "n/a"
    why = {"max_iters": "reached max_iters", "max_time": "reached max_time"}[result.stop_reason]
    return "\n".join(
        [
            f"done ({why}) at step {result.step}: best val loss {best}, "
            f"{_clock(result.elapsed)} of training, {result.tokens_seen:,} tokens seen",
            f"run: {result.run_dir}",
            f"sample from it: minigpt generate {result.run_dir}",
        ]
    )


def resume_hint(result: TrainResult) -> str:
    """The one line printed when a signal stopped the run."""
    name = signal.Signals(result.signal).name if result.signal else "signal"
    return (
        f"{name}: stopped at step {result.step}, last state saved; "
        f"resume with: minigpt train --resume {result.run_dir}"
    )


def iter_losses(run_dir: str | Path) -> Iterator[tuple[int, float]]:
    """(step, train loss) pairs from a run's metrics.jsonl."""
    for r in read_metrics(Path(run_dir) / METRICS_FILE):
        if "loss" in r:
            yield r["step"], r["loss"]
