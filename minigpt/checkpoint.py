"""The run directory: what `train` writes and `generate` / `inspect-heads` read.

    checkpoints/<run>/
      config.json              format version, model config, training config, tokenizer summary
      tokenizer.json           everything needed to encode and decode without the corpus
      model.safetensors        the best weights (lowest validation loss): what sampling uses
      model-last.safetensors   the weights of the last saved step
      trainer.pt               the last step's whole state, what resume continues from: weights,
                               optimizer, step, RNG and batcher state (plain tensors and numbers,
                               one file, so a kill can never pair new weights with an old optimizer)
      metrics.jsonl, loss.png  the training curves

Weights are safetensors (no pickle). Every file is written atomically, so a crash
at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minigpt.atomic import atomic_path, write_json_atomic
from minigpt.errors import MinigptError
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import Tokenizer, load_tokenizer, save_tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
BEST_WEIGHTS = "model.safetensors"
LAST_WEIGHTS = "model-last.safetensors"
TRAINER_STATE = "trainer.pt"
DEFAULT_RUN_DIR = Path("checkpoints/default")

# The LM head shares its weight with the token embedding; safetensors stores each
# tensor once, so the tied copy is left out on save and re-tied on load.
_TIED_KEYS = ("lm_head.weight",)


@dataclass
class Run:
    """A loaded run directory."""

    dir: Path
    model: GPT
    tokenizer: Tokenizer
    config: dict
    """The whole config.json: 'model', 'train', 'tokenizer', 'format_version', ..."""


def save_weights(model: GPT, path: str | Path) -> None:
    """Write the model's weights as safetensors, atomically."""
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k not in _TIED_KEYS
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "minigpt_format": str(FORMAT_VERSION)})


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
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        **(extra_config or {}),
    }
    save_tokenizer(tokenizer, run_dir / TOKENIZER_FILE)
    save_weights(model, run_dir / weights_file)
    write_json_atomic(run_dir / CONFIG_FILE, config)
    return run_dir


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
    if version != FORMAT_VERSION:
        raise MinigptError(
            f"{run_dir} has run format version {version!r}; this minigpt reads version {FORMAT_VERSION}",
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
