"""The run directory: every file of it is named, written and read here.

    checkpoints/<run>/
      config.json              format version, model config, training config, tokenizer summary
      tokenizer.json           everything needed to encode and decode without the corpus
      model.safetensors        the best weights (lowest validation loss): what sampling uses
      model-last.safetensors   the weights of the last saved step
      trainer.pt               the last step's whole state, what resume continues from: weights,
                               optimizer, step, RNG and batcher state (plain tensors and numbers,
                               one file, so a kill can never pair new weights with an old optimizer)
      metrics.jsonl, loss.png  the training curves

Weights are safetensors (no pickle); trainer.pt is read with weights_only=True.
Every file is written atomically, so a crash at any moment leaves the previous
checkpoint loadable.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from minigpt.atomic import atomic_path, write_json_atomic, write_text_atomic
from minigpt.errors import MinigptError
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, save_tokenizer

RUN_FORMAT = 1
"""Version of the run directory's layout (config.json's "format_version")."""
TRAINER_FORMAT = 1
"""Version of trainer.pt's schema (`TrainerCheckpoint`)."""
CONFIG_FILE = "config.json"
BEST_WEIGHTS = "model.safetensors"
LAST_WEIGHTS = "model-last.safetensors"
TRAINER_STATE = "trainer.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, BEST_WEIGHTS, LAST_WEIGHTS, TRAINER_STATE, METRICS_FILE)
"""The files whose presence means a directory already holds a run."""
DEFAULT_RUN_DIR = Path("checkpoints/default")

# The LM head shares its weight with the token embedding; safetensors stores each
# tensor once, so the tied copy is left out on save and re-tied on load.
_TIED_KEYS = ("lm_head.weight",)


# --------------------------------------------------------------------------- weights


def save_weights(state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Write a model's state dict as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k not in _TIED_KEYS}
    metadata = {"format": "pt", "minigpt_format": str(RUN_FORMAT)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_weights(model: GPT, path: str | Path) -> None:
    """Load safetensors weights into `model`, with a clear error if they do not fit."""
    path = Path(path)
    try:
        state = load_file(str(path), device=str(model.device))
    except FileNotFoundError as err:
        raise MinigptError(f"no weights at {path}", hint="the run directory is incomplete") from err
    except (SafetensorError, OSError, ValueError) as err:
        raise MinigptError(
            f"{path} is not a readable safetensors file ({err})",
            hint="the file is damaged or truncated; resume from another run or retrain",
        ) from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _TIED_KEYS]
    if missing or unexpected:
        raise MinigptError(
            f"{path} does not match the model in config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            hint="the weights and config.json come from different runs",
        )


# --------------------------------------------------------------------------- config.json


@dataclass
class Run:
    """A loaded run directory."""

    dir: Path
    model: GPT
    tokenizer: Tokenizer
    config: dict
    """The whole config.json: 'model', 'train', 'tokenizer', 'format_version', ..."""


def write_run_files(
    run_dir: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    extra_config: dict | None = None,
    weights_file: str = BEST_WEIGHTS,
) -> Path:
    """Write config.json, tokenizer.json and the weights: a run directory `load_run` reads.

    extra_config: more top-level sections for config.json (e.g. 'train', 'data').
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": RUN_FORMAT,
        "model": model.config.to_dict(),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        **(extra_config or {}),
    }
    save_tokenizer(tokenizer, run_dir / TOKENIZER_FILE)
    save_weights(model.state_dict(), run_dir / weights_file)
    write_json_atomic(run_dir / CONFIG_FILE, config)
    return run_dir


def update_config(run_dir: str | Path, sections: dict) -> None:
    """Replace top-level sections of a run's config.json (a resumed run's new train.*)."""
    path = Path(run_dir) / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    write_json_atomic(path, {**config, **sections})


def read_config(run_dir: str | Path) -> dict:
    """config.json of a run directory, checked for presence and format version."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MinigptError(
            f"run directory {run_dir} does not exist",
            hint="train one first with `minigpt train`, or pass the path of an existing run",
        )
    path = run_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise MinigptError(
            f"{run_dir} has no {CONFIG_FILE}, so it is not a complete minigpt run",
            hint="pass a directory written by `minigpt train`",
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MinigptError(
            f"{path} is not valid JSON", hint="the file is damaged; retrain"
        ) from err
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != RUN_FORMAT:
        raise MinigptError(
            f"{run_dir} has run format version {version!r}; this minigpt reads version {RUN_FORMAT}",
            hint="use the minigpt version that wrote the run, or retrain",
        )
    return config


def load_run(
    run_dir: str | Path = DEFAULT_RUN_DIR,
    device: str | torch.device = "cpu",
    weights_file: str = BEST_WEIGHTS,
) -> Run:
    """Load a run directory's model (in eval mode, on `device`), tokenizer and config."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    model_config = GPTConfig.from_dict(config.get("model", {}))
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise MinigptError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model_config.vocab_size}",
            hint="tokenizer.json and config.json come from different runs",
        )
    model = GPT(model_config).to(device)
    load_weights(model, run_dir / weights_file)
    model.eval()
    return Run(dir=run_dir, model=model, tokenizer=tokenizer, config=config)


# --------------------------------------------------------------------------- trainer.pt


@dataclass
class TrainerCheckpoint:
    """trainer.pt: the whole state of a run after `step` optimizer steps, for exact resume.

    Plain tensors, numbers, lists and dicts only, so it loads with weights_only=True.
    """

    step: int
    tokens_seen: int
    elapsed: float
    """Seconds of training so far, over every session of the run."""
    best_val_loss: float
    world_size: int
    """Processes the run was saved from (the RNG states are per process)."""
    model: dict[str, Tensor]
    optimizer: dict
    rng: list[dict[str, Tensor]]
    """torch's (and CUDA's) RNG state of each process, in rank order."""
    batchers: list[dict]
    """Each batch stream's `Batcher.state_dict()`, in stream order over all processes."""


def save_trainer_state(run_dir: str | Path, checkpoint: TrainerCheckpoint) -> None:
    """trainer.pt (everything resume needs), then model-last.safetensors (its weights)."""
    run_dir = Path(run_dir)
    # Not dataclasses.asdict: it would deep-copy every weight and optimizer tensor.
    state = {f.name: getattr(checkpoint, f.name) for f in fields(TrainerCheckpoint)}
    with atomic_path(run_dir / TRAINER_STATE) as tmp:
        torch.save({"format_version": TRAINER_FORMAT, **state}, tmp)
    save_weights(checkpoint.model, run_dir / LAST_WEIGHTS)


def load_trainer_state(path: str | Path) -> TrainerCheckpoint:
    """trainer.pt as plain tensors and numbers (weights_only=True: no arbitrary unpickling)."""
    path = Path(path)
    not_ours = MinigptError(
        f"{path} is not a minigpt trainer state",
        hint="only resume from trainer.pt files written by minigpt",
    )
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
    names = {f.name for f in fields(TrainerCheckpoint)}
    if not isinstance(state, dict) or not {"format_version", *names} <= set(state):
        raise not_ours
    if state["format_version"] != TRAINER_FORMAT:
        raise MinigptError(
            f"{path} has trainer format {state['format_version']!r}, this minigpt reads {TRAINER_FORMAT}"
        )
    return TrainerCheckpoint(**{name: state[name] for name in names})


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """metrics.jsonl, opened for appending: one JSON object per logged step or evaluation."""

    def __init__(self, run_dir: str | Path):
        self._file: IO[str] = open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a kill loses at most the line being written

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl records; a line cut short by a kill is skipped."""
    path = Path(path)
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def iter_losses(run_dir: str | Path) -> Iterator[tuple[int, float]]:
    """(step, train loss) pairs from a run's metrics.jsonl."""
    for record in read_metrics(Path(run_dir) / METRICS_FILE):
        if "loss" in record:
            yield record["step"], record["loss"]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records after `step`: a resumed run logs them again, from trainer.pt's step."""
    path = Path(run_dir) / METRICS_FILE
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_losses(run_dir: str | Path) -> None:
    """loss.png: train loss per logged step and train/val loss at each evaluation."""
    # matplotlib is imported here, not at the top: it costs a second at start-up,
    # and only a trainer that reaches an evaluation needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(Path(run_dir) / METRICS_FILE)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        x, y = [r["step"] for r in steps], [r["loss"] for r in steps]
        ax.plot(x, y, lw=0.8, alpha=0.5, label="train (batch)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(Path(run_dir) / LOSS_PLOT) as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------- the out dir


def check_out_dir(out_dir: str | Path, resume: bool, force: bool) -> None:
    """Refuse to start a fresh run over another one unless --force."""
    out_dir = Path(out_dir)
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


def clear_run(out_dir: str | Path) -> None:
    """--force: remove the previous run's files so no old curve or state mixes in."""
    for name in (*RUN_FILES, LOSS_PLOT):
        (Path(out_dir) / name).unlink(missing_ok=True)
