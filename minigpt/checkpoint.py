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
      .lock                    held (flock) by the one trainer writing the run (`RunLock`)

Weights are safetensors (no pickle); trainer.pt is read with weights_only=True.
Every file is written atomically, so a crash at any moment leaves the previous
checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import zipfile
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

from minigpt.atomic import atomic_path, remove_leftovers, write_json_atomic, write_text_atomic
from minigpt.errors import MinigptError, file_in_path, first_line, os_error
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
LOCK_FILE = ".lock"
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, BEST_WEIGHTS, LAST_WEIGHTS, TRAINER_STATE, METRICS_FILE)
"""The files whose presence means a directory already holds a run."""
REPLACED_FILES = (*RUN_FILES, LOSS_PLOT)
"""What --force removes of an earlier run: every file a run is made of."""
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
    """Load safetensors weights into `model`, with a clear error if they do not fit it
    (names, shapes) or are not finite: such a file never reaches the model."""
    path = Path(path)
    try:
        with open(path, "rb"):  # safetensors reports an unreadable file as a missing one
            pass
        state = load_file(str(path), device=str(model.device))
    except FileNotFoundError as err:
        raise MinigptError(f"no weights at {path}", hint="the run directory is incomplete") from err
    except (PermissionError, IsADirectoryError) as err:
        raise os_error(err, "read", path) from err
    except (SafetensorError, OSError, ValueError) as err:
        raise MinigptError(
            f"{path} is not a readable safetensors file ({first_line(err)})",
            hint="the file is damaged or truncated; resume from another run or retrain",
        ) from err
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in _TIED_KEYS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        detail = (
            f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the model's is {tuple(expected[wrong[0]])}"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise MinigptError(
            f"{path} does not match the model in config.json ({detail})",
            hint="the weights and config.json come from different runs",
        )
    bad = next((k for k, v in state.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise MinigptError(
            f"{path} holds NaN or infinite weights ({bad})",
            hint="the run diverged or the file was altered; use another checkpoint or retrain",
        )
    model.load_state_dict(state, strict=False)


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
    return write_run(
        run_dir, model.config, model.state_dict(), tokenizer, extra_config, weights_file
    )


def write_run(
    run_dir: str | Path,
    model_config: GPTConfig,
    state_dict: dict[str, Tensor],
    tokenizer: Tokenizer,
    extra_config: dict | None = None,
    weights_file: str = BEST_WEIGHTS,
) -> Path:
    """`write_run_files` for weights that need not be a module (an imported checkpoint's).
    config.json is written last: a run directory without it is not a run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": RUN_FORMAT,
        "model": model_config.to_dict(),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        **(extra_config or {}),
    }
    save_tokenizer(tokenizer, run_dir / TOKENIZER_FILE)
    save_weights(state_dict, run_dir / weights_file)
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
    if run_dir.exists() and not run_dir.is_dir():
        raise MinigptError(
            f"{run_dir} is a file, not a run directory",
            hint="pass the directory `minigpt train` wrote (e.g. checkpoints/default)",
        )
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
    except OSError as err:  # unreadable: permissions, a folder named config.json
        raise os_error(err, "read", path) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MinigptError(
            f"{path} is not valid JSON", hint="the file is damaged; retrain"
        ) from err
    if not isinstance(config, dict) or "format_version" not in config:
        raise _not_a_run(run_dir, config)
    if config["format_version"] != RUN_FORMAT:
        raise MinigptError(
            f"{run_dir} has run format version {config['format_version']!r}; this minigpt "
            f"reads version {RUN_FORMAT}",
            hint="use the minigpt version that wrote the run, or retrain",
        )
    return config


def _not_a_run(run_dir: Path, config: object) -> MinigptError:
    """The refusal of a config.json without a run format version: a Hugging Face
    checkpoint's (it names a model_type), or one of no kind minigpt knows."""
    if isinstance(config, dict) and "model_type" in config:
        return MinigptError(
            f"{run_dir} is a Hugging Face checkpoint, not a minigpt run",
            hint=f"import it first: minigpt import {run_dir} --out runs/NAME",
        )
    return MinigptError(
        f"{run_dir / CONFIG_FILE} has no format_version, so {run_dir} is not a minigpt run",
        hint="pass a directory written by `minigpt train` or `minigpt import`",
    )


def load_run(
    run_dir: str | Path = DEFAULT_RUN_DIR,
    device: str | torch.device = "cpu",
    weights_file: str = BEST_WEIGHTS,
) -> Run:
    """Load a run directory's model (in eval mode, on `device`), tokenizer and config."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    model_config = GPTConfig.from_dict(config.get("model"), where=f"{run_dir / CONFIG_FILE}")
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise MinigptError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model_config.vocab_size}",
            hint="tokenizer.json and config.json come from different runs",
        )
    model = GPT.for_weights(model_config, device)
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
    eval_pending: bool = False
    """The evaluation due at `step` has not run yet (a signal stopped the run first)."""


def rng_state(device: torch.device) -> dict:
    """torch's RNG state (and the GPU's, on CUDA): what trainer.pt keeps of each process."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_trainer_state(run_dir: str | Path, checkpoint: TrainerCheckpoint) -> None:
    """trainer.pt (everything resume needs), then model-last.safetensors (its weights)."""
    run_dir = Path(run_dir)
    # Not dataclasses.asdict: it would deep-copy every weight and optimizer tensor.
    state = {f.name: getattr(checkpoint, f.name) for f in fields(TrainerCheckpoint)}
    with atomic_path(run_dir / TRAINER_STATE) as tmp:
        torch.save({"format_version": TRAINER_FORMAT, **state}, tmp)
    save_weights(checkpoint.model, run_dir / LAST_WEIGHTS)


def is_torch_archive(path: Path) -> bool:
    """Whether `path` is a zip archive, as torch.save writes. Anything else (cut short,
    overwritten) is no pickle to judge, and unpickling its bytes fails in arbitrary
    ways. An unreadable file is an OSError named as such, where zipfile.is_zipfile(path)
    alone would call it no archive, hence damaged."""
    try:
        with open(path, "rb") as file:
            return zipfile.is_zipfile(file)
    except OSError as err:
        raise os_error(err, "read", path) from err


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
    damaged_hint = (
        f"the run cannot be resumed from it; its weights are still in {BEST_WEIGHTS} and "
        f"{LAST_WEIGHTS} (start a new run with another --out)"
    )
    if not is_torch_archive(path):
        raise MinigptError(
            f"{path} is not a trainer state file (damaged or truncated?)", hint=damaged_hint
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError) as err:
        raise os_error(err, "read", path) from err
    except pickle.UnpicklingError as err:
        raise MinigptError(
            f"{path} holds objects other than plain tensors and numbers; refusing to unpickle it",
            hint="only resume from trainer.pt files written by minigpt",
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise MinigptError(
            f"{path} is damaged or truncated ({first_line(err, 80)})", hint=damaged_hint
        ) from err
    names = {f.name for f in fields(TrainerCheckpoint) if f.default is MISSING}
    if not isinstance(state, dict) or not {"format_version", *names} <= set(state):
        raise not_ours
    if state["format_version"] != TRAINER_FORMAT:
        raise MinigptError(
            f"{path} has trainer format {state['format_version']!r}, this minigpt reads {TRAINER_FORMAT}"
        )
    known = {f.name for f in fields(TrainerCheckpoint)}
    return TrainerCheckpoint(**{name: state[name] for name in known if name in state})


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """metrics.jsonl, opened for appending: one JSON object per logged step or evaluation."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        try:
            self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            raise os_error(err, "write", self.path) from err

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # a kill loses at most the line being written
        except OSError as err:
            raise os_error(err, "write", self.path) from err

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # a full disk: the error was reported by write
            pass


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl records, each a dict with an integer step; anything else (a line
    cut short by a kill, or an edited one) is skipped."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise os_error(err, "read", path) from err
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            records.append(record)
    return records


def iter_losses(run_dir: str | Path) -> Iterator[tuple[int, float]]:
    """(step, train loss) pairs from a run's metrics.jsonl."""
    for record in read_metrics(Path(run_dir) / METRICS_FILE):
        if isinstance(record.get("loss"), int | float):
            yield record["step"], record["loss"]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records after `step`: a resumed run logs them again, from trainer.pt's step."""
    path = Path(run_dir) / METRICS_FILE
    records = [r for r in read_metrics(path) if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_losses(run_dir: str | Path) -> None:
    """loss.png: train loss per logged step and train/val loss at each evaluation."""
    # matplotlib is imported here, not at the top: it costs a second at start-up,
    # and only a trainer that reaches an evaluation needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(Path(run_dir) / METRICS_FILE)
    steps = [r for r in records if _is_number(r.get("loss"))]
    evals = [
        r for r in records if _is_number(r.get("val_loss")) and _is_number(r.get("train_loss"))
    ]
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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------- the out dir


def clear_run(out_dir: str | Path) -> None:
    """--force: remove the previous run's files so no old curve or state mixes in."""
    for name in REPLACED_FILES:
        try:
            (Path(out_dir) / name).unlink(missing_ok=True)
        except OSError as err:
            raise os_error(err, "remove", Path(out_dir) / name) from err


@contextlib.contextmanager
def cleared_on_failure(out_dir: Path, fresh: bool) -> Iterator[None]:
    """A fresh run whose first files cannot all be written (a full disk) leaves none:
    a run directory without weights would pass for a run and load as nothing."""
    try:
        yield
    except BaseException:
        if fresh:
            clear_run(out_dir)
        raise


def start_run(
    out_dir: Path,
    model: GPT,
    tokenizer: Tokenizer,
    sections: dict,
    *,
    resume: bool,
    force: bool,
    step: int,
) -> None:
    """A fresh run writes config.json (with `sections`), tokenizer.json and its initial
    weights; a resumed one records its new `sections` and drops the metrics logged
    after `step`."""
    if resume:
        truncate_metrics(out_dir, step)
        update_config(out_dir, sections)
        return
    if force:
        clear_run(out_dir)
    write_run_files(out_dir, model, tokenizer, sections)


# --------------------------------------------------------------------------- the run lock


class RunLock:
    """An exclusive lock on a run directory, held for a whole training run.

    Two trainers writing one run directory would interleave their metrics and mix
    their weights, so the second one is refused at once, naming the first. The lock
    is an OS file lock (flock) on RUN_DIR/.lock: the kernel drops it when its process
    dies, so a `kill -9` never leaves a lock that blocks the next run. While it is
    held, nobody else writes here, so leftover temporary files of a killed writer
    are removed.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = self._created_lock = False

    def __enter__(self) -> RunLock:
        self._created_dir = not self.run_dir.exists()
        a_file = file_in_path(self.run_dir)
        if a_file is not None:
            raise MinigptError(f"{a_file} is a file, not a folder", hint="choose another --out")
        self._created_lock = not os.path.lexists(self.path)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise os_error(err, "write to", self.run_dir) from err
        if not _try_lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 200).decode("utf-8", errors="replace").strip()
            os.close(fd)
            raise MinigptError(
                f"{self.run_dir} is in use by another training run ({holder or 'unknown process'})",
                hint="wait for it to finish or stop it; use another --out for a second run",
            )
        self._fd = fd
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        remove_leftovers(self.run_dir)  # a killed writer's half-written files
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        run_files = [name for name in RUN_FILES if (self.run_dir / name).exists()]
        if self._created_dir and not run_files:  # refused before writing: leave nothing
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
        elif self._created_lock and not _holds_run(self.run_dir):  # nor in a folder not a run
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing the descriptor releases the lock
        self._fd = None


def _holds_run(folder: Path) -> bool:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and "format_version" in config


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file `fd` without waiting; False if it is held."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True
