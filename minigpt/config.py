"""Run configuration: what a training run is, as three dataclasses.

    [model]  the GPT's shape (`minigpt.model.GPTConfig`)
    [data]   where the text comes from and how it is tokenised
    [train]  optimizer, schedule, batches, stopping, evaluation, device, output

A run is built in layers (`build_config`): the dataclass defaults (which
`configs/default.toml` spells out: char-level on the built-in Python standard
library corpus), then a TOML file, then `--set section.key=value` overrides, then
the command line's named flags; a resumed run starts from its config.json instead.
Every field carries a one-line doc (the string under it), which `field_docs`
reads for error messages and help.
Unknown keys are errors that name the nearest valid key: a typo must never
silently train the wrong model.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path

from minigpt.checkpoint import CONFIG_FILE, read_config
from minigpt.device import DEVICES, DTYPES
from minigpt.errors import MinigptError
from minigpt.model import GPTConfig
from minigpt.prepare import DEFAULT_BPE_SAMPLE_CHARS


@dataclass
class DataConfig:
    """[data]: the corpus and its tokenizer."""

    source: str = "pystdlib"
    """A built-in dataset name (pystdlib, shakespeare, induction) or a path to a text file or folder."""
    tokenizer: str = "char"
    """'char', 'bpe' (trained on the corpus) or a tiktoken encoding such as 'gpt2'."""
    vocab_size: int = 0
    """Vocabulary size for the 'bpe' tokenizer; 0 means its default."""
    glob: str = "auto"
    """Which files of a source folder to read; 'auto': its .txt, .jsonl or .parquet files."""
    text_field: str = "text"
    """The JSONL field or Parquet column that holds each document's text."""
    data_dir: str = "data"
    """Where prepared token files are cached."""
    workers: int = 0
    """Threads that tokenise the corpus; 0 means every core."""
    bpe_sample_chars: int = DEFAULT_BPE_SAMPLE_CHARS
    """The 'bpe' tokenizer learns its merges from at most this many characters of train."""


@dataclass
class TrainConfig:
    """[train]: optimisation, schedule, evaluation, device and output."""

    batch_size: int = 16
    """Sequences per micro-batch on each process."""
    grad_accum: int = 0
    """Micro-batches per optimizer step over all processes; 0: one on each process."""
    tokens_per_step: int = 0
    """Tokens per optimizer step over all processes (0: set by batch_size, block_size, grad_accum)."""
    max_iters: int = 1000
    """Optimizer steps to train for."""
    max_time: float = 0.0
    """Stop after this many seconds of training (0: no time limit)."""
    decay_by_time: bool = False
    """With max_time set, run warmup and cosine decay on elapsed time, not steps (not bit-reproducible)."""
    lr: float = 2e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 2e-4
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 50
    """Steps of linear warmup from 0 to lr."""
    lr_decay_iters: int = 0
    """Step at which the cosine decay reaches min_lr; 0 means max_iters."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not biases, norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    optimizer: str = "adamw"
    """'adamw', or 'muon': Muon for every matrix inside the blocks, AdamW (the settings above) for the rest."""
    muon_lr: float = 0.02
    """Muon's peak learning rate; the schedule scales it as it scales lr."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov)."""
    muon_weight_decay: float = 0.0
    """Muon's decoupled weight decay."""
    muon_adjust_lr: str = "original"
    """How Muon scales its lr by a matrix's shape: 'original' (sqrt(max(1, rows / cols)), Keller Jordan's) or 'match_rms_adamw' (0.2 sqrt(max(rows, cols)), Moonshot's: AdamW's lr and weight decay carry over)."""
    eval_interval: int = 200
    """Evaluate train/val loss and save a checkpoint every this many steps."""
    eval_iters: int = 20
    """Batches per evaluation (the same fixed batches every time)."""
    log_interval: int = 10
    """Write a line to metrics.jsonl every this many steps."""
    seed: int = 1337
    """Seed for initialisation, dropout and batch sampling."""
    device: str = "auto"
    """'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    dtype: str = "auto"
    """'auto' (bfloat16 autocast where supported), 'float32' or 'bfloat16'."""
    compile: bool = False
    """Run the model through torch.compile (slow start, faster steps)."""
    loss_chunk: int = 0
    """Make the LM head's logits this many positions at a time in the loss, never all at once (less memory with a large vocabulary; 0: all at once)."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    out_dir: str = "checkpoints/default"
    """The run directory to write."""
    init_from: str = ""
    """Fine-tune: a run directory, Hugging Face GPT-2 folder or hub name whose weights, shape and tokenizer the run starts from."""


@dataclass
class RunConfig:
    """A whole training run."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explicit: frozenset[str] = field(default=frozenset(), compare=False)
    """The 'section.key' settings given by a file, --set or a flag rather than defaulted:
    with train.init_from, a [model] setting given here must agree with the source."""

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "data": asdict(self.data),
            "train": asdict(self.train),
        }


SECTIONS: dict[str, type] = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line doc under each field of a dataclass, read from its source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, after in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = after.value.value.strip()
    return docs


def _field_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _suggest(name: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return close[0] if close else None


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(section: str, key: str, value: object, kind: type) -> object:
    """Check a TOML value against a field's type; ints are accepted for floats."""
    where = f"{section}.{key}"
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise MinigptError(
            f"{where} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}",
            hint=f"{where}: {field_docs(SECTIONS[section]).get(key, '')}".rstrip(": "),
        )
    return value


def _parse_override_value(text: str, kind: type) -> object:
    """A `--set` value as the field's type: 'true', '3', '3e-4', 'gpt2' or '"quoted"'."""
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        return text
    if kind is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            try:
                number = float(text)  # accept 5e3 for 5000
            except ValueError:
                return text
            return int(number) if number.is_integer() else number
    if kind is float:
        try:
            return float(text)
        except ValueError:
            return text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _nearest_key(section: str, key: str) -> str | None:
    """The valid 'section.key' a mistyped one most likely meant."""
    everywhere = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in fields(c)]
    same_key = [n for n in everywhere if n.endswith("." + key)]
    if same_key:  # right key, wrong section
        return same_key[0]
    near = _suggest(key, [f.name for f in fields(SECTIONS[section])])
    if near:
        return f"{section}.{near}"
    return _suggest(f"{section}.{key}", everywhere)


def _check_key(section: str, key: str) -> None:
    if section not in SECTIONS:
        near = _suggest(section, list(SECTIONS))
        raise MinigptError(
            f"unknown config section [{section}]",
            hint=f"did you mean [{near}]?" if near else f"sections are {', '.join(SECTIONS)}",
        )
    names = [f.name for f in fields(SECTIONS[section])]
    if key not in names:
        near = _nearest_key(section, key)
        raise MinigptError(
            f"unknown config key {section}.{key}",
            hint=f"did you mean {near}?" if near else f"valid keys are {', '.join(names)}",
        )


def merge(base: RunConfig, values: dict[str, dict[str, object]]) -> RunConfig:
    """A new RunConfig: `base` with the {section: {key: value}} entries applied, checked."""
    sections = {s: asdict(getattr(base, s)) for s in SECTIONS}
    explicit = set(base.explicit)
    for section, table in values.items():
        if section not in SECTIONS:
            _check_key(section, "")
        if not isinstance(table, dict):
            raise MinigptError(
                f"config entry {section!r} must be a [section] table",
                hint="put keys under [model], [data] or [train]",
            )
        kinds = _field_types(SECTIONS[section])
        for key, value in table.items():
            _check_key(section, key)
            sections[section][key] = _coerce(section, key, value, kinds[key])
            explicit.add(f"{section}.{key}")
    config = RunConfig(
        model=GPTConfig(**sections["model"]),
        data=DataConfig(**sections["data"]),
        train=TrainConfig(**sections["train"]),
        explicit=frozenset(explicit),
    )
    validate(config)
    return config


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, object]]:
    """['train.lr=3e-4', 'model.n_layer=2'] -> {'train': {'lr': 3e-4}, 'model': {'n_layer': 2}}."""
    values: dict[str, dict[str, object]] = {}
    for item in overrides:
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\.([A-Za-z_]\w*)\s*=(.*)", item, re.S)
        if not match:
            raise MinigptError(
                f"--set expects section.key=value, got {item!r}",
                hint="for example --set train.lr=3e-4 --set model.n_layer=2",
            )
        section, key, text = match.group(1), match.group(2), match.group(3).strip()
        _check_key(section, key)
        kind = _field_types(SECTIONS[section])[key]
        values.setdefault(section, {})[key] = _parse_override_value(text, kind)
    return values


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict, with the file and line in the error if it is not valid TOML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise MinigptError(
            f"config file {path} does not exist",
            hint="pass a path such as configs/default.toml",
        ) from err
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise MinigptError(f"{path} is not a readable TOML text file") from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise MinigptError(
            f"{path} is not valid TOML: {err}",
            hint="fix the line named above; strings need quotes, keys need '='",
        ) from err


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, dict[str, object]] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Defaults (or `base`), then the TOML file at `path`, then the overrides."""
    config = base if base is not None else RunConfig()
    if path is not None:
        config = merge(config, read_toml(path))
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        config = merge(config, overrides)
    validate(config)
    return config


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from a run's config.json sections (what resume uses); each
    section must be there, as a table: a damaged one must not fall back to defaults."""
    bad = [s for s in SECTIONS if not isinstance(values.get(s), dict)]
    if bad:
        raise MinigptError(
            f"config.json's {bad[0]!r} entry is {values.get(bad[0])!r}, not a table of settings",
            hint="the file is damaged or was not written by `minigpt train`",
        )
    return merge(RunConfig(), {s: values[s] for s in SECTIONS})


def _positive(where: str, value: float, hint: str | None = None) -> None:
    if not value > 0:
        raise MinigptError(f"{where} must be positive, got {value!r}", hint=hint)


OPTIMIZERS = ("adamw", "muon")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")

MAX_SEED = 2**63 - 1
"""Seeds are 0..MAX_SEED: torch's generators take 64 bits, and the trainer adds small offsets."""
MAX_MICRO_STEPS = 1 << 16
MAX_THREADS = 1024


def validate(config: RunConfig) -> None:
    """Check the values that the dataclasses' types cannot: ranges and choices."""
    _validate_numbers(config.train)
    _validate_choices(config.train)
    _validate_data(config.data)


def _validate_numbers(train: TrainConfig) -> None:
    """[train]'s numbers: finite, and in their ranges."""
    for f in fields(TrainConfig):
        value = getattr(train, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise MinigptError(
                f"train.{f.name} must be a finite number, got {value!r}",
                hint=f"train.{f.name}: {field_docs(TrainConfig).get(f.name, '')}".rstrip(": "),
            )
    if not 0 <= train.seed <= MAX_SEED:
        raise MinigptError(
            f"train.seed must be from 0 to 2**63 - 1, got {train.seed}", hint="e.g. 1337"
        )
    if train.threads > MAX_THREADS:
        raise MinigptError(f"train.threads must be at most {MAX_THREADS}, got {train.threads}")
    for name in ("batch_size", "max_iters", "eval_interval", "eval_iters"):
        _positive(f"train.{name}", getattr(train, name))
    _positive("train.log_interval", train.log_interval)
    _positive("train.lr", train.lr, hint="typical values are 1e-4 to 3e-3")
    for name in ("grad_accum", "tokens_per_step", "max_time", "warmup_iters", "lr_decay_iters",
                 "threads", "loss_chunk"):  # fmt: skip
        if getattr(train, name) < 0:
            raise MinigptError(f"train.{name} must not be negative, got {getattr(train, name)!r}")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        if getattr(train, name) < 0:
            raise MinigptError(f"train.{name} must not be negative, got {getattr(train, name)!r}")
    if train.min_lr > train.lr:
        raise MinigptError(
            f"train.min_lr={train.min_lr} is larger than train.lr={train.lr}",
            hint="min_lr is where the cosine decay ends; make it lr/10 or so",
        )
    for name in ("beta1", "beta2", "muon_momentum"):
        if not 0.0 <= getattr(train, name) < 1.0:
            raise MinigptError(f"train.{name} must be in [0, 1), got {getattr(train, name)!r}")
    _positive("train.muon_lr", train.muon_lr, hint="Muon's usual values are 0.01 to 0.05")
    if train.muon_weight_decay < 0:
        raise MinigptError(
            f"train.muon_weight_decay must not be negative, got {train.muon_weight_decay!r}"
        )


def _validate_choices(train: TrainConfig) -> None:
    """[train]'s named choices (device, dtype), and the settings that need another."""
    if train.device not in DEVICES and not re.fullmatch(r"cuda:\d+", train.device):
        raise MinigptError(
            f"train.device must be one of {', '.join(DEVICES)} or cuda:N, got {train.device!r}",
            hint="use 'auto' to pick cuda, then mps, then cpu",
        )
    if train.dtype not in DTYPES:
        raise MinigptError(
            f"train.dtype must be one of {', '.join(DTYPES)}, got {train.dtype!r}",
            hint="'auto' uses bfloat16 autocast where the device supports it",
        )
    if train.optimizer not in OPTIMIZERS:
        raise MinigptError(
            f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}",
            hint="'muon' trains the blocks' matrices with Muon and the rest with AdamW",
        )
    if train.muon_adjust_lr not in MUON_LR_ADJUSTMENTS:
        raise MinigptError(
            f"train.muon_adjust_lr must be one of {', '.join(MUON_LR_ADJUSTMENTS)}, "
            f"got {train.muon_adjust_lr!r}",
            hint="'original' is Keller Jordan's; 'match_rms_adamw' lets AdamW's lr carry over",
        )
    if train.decay_by_time and train.max_time <= 0:
        raise MinigptError(
            "train.decay_by_time needs train.max_time", hint="set train.max_time to the seconds"
        )
    if not train.out_dir.strip():
        raise MinigptError("train.out_dir must not be empty", hint="e.g. checkpoints/my-run")


def _validate_data(data: DataConfig) -> None:
    """[data]'s settings: named, and in their ranges."""
    if not data.source.strip():
        raise MinigptError("data.source must not be empty", hint="e.g. pystdlib or a path")
    if data.vocab_size < 0:
        raise MinigptError(f"data.vocab_size must not be negative, got {data.vocab_size}")
    if data.workers < 0:
        raise MinigptError(
            f"data.workers must not be negative, got {data.workers}", hint="0 uses every core"
        )
    if data.bpe_sample_chars < 1:
        raise MinigptError(
            f"data.bpe_sample_chars must be at least 1, got {data.bpe_sample_chars}",
            hint=f"the default is {DEFAULT_BPE_SAMPLE_CHARS}",
        )
    if not data.text_field.strip():
        raise MinigptError("data.text_field must not be empty", hint="e.g. text")


def split_accumulation(config: RunConfig, world_size: int) -> tuple[RunConfig, int]:
    """config with train.grad_accum's 0 (one micro-batch on each process) replaced by the
    total it means on world_size processes, and the micro-batches each process runs.
    The run's config.json then records the total, so a resume on another number of
    processes sees the same batches per step."""
    train = config.train
    if not (train.grad_accum or train.tokens_per_step):
        config = replace(config, train=replace(train, grad_accum=world_size))
    return config, micro_steps(config, world_size)


def micro_steps(config: RunConfig, world_size: int = 1) -> int:
    """Micro-batches each process runs per optimizer step (gradient accumulation)."""
    train = config.train
    total = train.grad_accum or world_size
    if train.tokens_per_step:
        per_micro = train.batch_size * config.model.block_size
        if train.tokens_per_step % (per_micro * world_size) != 0:
            raise MinigptError(
                f"train.tokens_per_step={train.tokens_per_step} is not a multiple of "
                f"batch_size * block_size * processes = {per_micro * world_size}",
                hint=f"use a multiple of {per_micro * world_size}",
            )
        total = train.tokens_per_step // per_micro
    if total > MAX_MICRO_STEPS:
        raise MinigptError(
            f"{total:,} micro-batches per optimizer step is more than {MAX_MICRO_STEPS:,}",
            hint="lower train.grad_accum or train.tokens_per_step, or raise train.batch_size",
        )
    if total % world_size != 0:
        raise MinigptError(
            f"{total} micro-batch{'es' if total > 1 else ''} per optimizer step cannot be "
            f"split evenly over {world_size} processes",
            hint=f"make train.grad_accum a multiple of {world_size}, or 0 for one on each process",
        )
    return total // world_size


# --------------------------------------------------------------------------- what `train` runs


def build_config(
    config_path: str | Path | None = None,
    sets: list[str] | None = None,
    *,
    resume: str | Path | None = None,
    data: str | None = None,
    out: str | None = None,
    max_iters: int | None = None,
    max_time: float | None = None,
    device: str | None = None,
    seed: int | None = None,
    compile: bool | None = None,
    init_from: str | None = None,
) -> RunConfig:
    """The config `minigpt train` runs: defaults < CONFIG.toml < --set < the named flags.

    With resume, the run directory's config.json replaces the defaults and the file,
    and only train.* settings may change (e.g. a larger max_iters).
    """
    overrides = parse_overrides(sets or [])
    flags = {
        "data": {"source": data},
        "train": {
            "out_dir": out,
            "max_iters": max_iters,
            "max_time": max_time,
            "device": device,
            "seed": seed,
            "compile": compile,
            "init_from": init_from,
        },
    }
    for section, values in flags.items():
        for key, value in values.items():
            if value is not None:
                overrides.setdefault(section, {})[key] = value
    if resume is None:
        return load_config(config_path, overrides)
    if config_path is not None:
        raise MinigptError(
            "--resume takes its config from the run directory, not from a config file",
            hint=f"drop {config_path}; change train settings with --set or --max-iters",
        )
    if out is not None and Path(out) != Path(resume):
        raise MinigptError("--resume and --out name different directories")
    if init_from is not None:
        raise MinigptError(
            "--init-from starts a new run from a model; --resume continues a run",
            hint=f"drop --init-from to continue {resume}, or give a new --out to fine-tune",
        )
    return resume_config(resume, overrides)


def resume_config(
    run_dir: str | Path, overrides: dict[str, dict[str, object]] | None = None
) -> RunConfig:
    """The config a run was started with (its config.json), with train.* overrides applied."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir)
    if "imported_from" in saved and "train" not in saved:
        raise MinigptError(
            f"{run_dir} was imported, not trained, so there is no training to resume",
            hint=f"fine-tune it in a new run: minigpt train --init-from {run_dir} --out DIR",
        )
    try:
        config = config_from_dict(saved)
    except (TypeError, KeyError) as err:
        raise MinigptError(f"{run_dir / CONFIG_FILE} does not hold a training config") from err
    overrides = dict(overrides or {})
    for section in ("model", "data"):
        # repeating the original command line with --resume is fine; changing it is not
        saved_section = getattr(merge(config, {section: overrides.pop(section, {})}), section)
        if saved_section != getattr(config, section):
            raise MinigptError(
                f"a resumed run keeps its {section} config; {section}.* cannot be changed",
                hint="start a new run (another --out) to change the model or the data",
            )
    overrides["train"] = {**overrides.get("train", {}), "out_dir": str(run_dir)}
    return merge(config, overrides)
