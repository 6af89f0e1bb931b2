"""What a run trains on: the corpus's train and validation splits, tokenised, and the
tokenizer that made them.

A fresh run prepares its data (or reuses the cached token files); a resumed run
must find exactly the data it was trained on (`prepare.prepare_for_resume`); a
fine-tune tokenises with its source's tokenizer. Under torchrun, rank 0 prepares
first and the other processes then reuse its folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt.config import RunConfig
from minigpt.data import check_block_size
from minigpt.distributed import Distributed
from minigpt.errors import MinigptError
from minigpt.prepare import prepare, prepare_for_resume
from minigpt.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer


@dataclass
class TrainData:
    """Tokenised splits and the tokenizer that made them."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    summary: dict = field(default_factory=dict)
    """What config.json records about the data (source, token counts, ...)."""
    warnings: list[str] = field(default_factory=list)
    """What the user should hear about the data (a BPE that learned fewer tokens than asked)."""


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
    data_config = config.data
    settings = dict(
        tokenizer=tokenizer or data_config.tokenizer,
        vocab_size=None if tokenizer else data_config.vocab_size or None,
        glob=data_config.glob,
        text_field=data_config.text_field,
        workers=data_config.workers,
        bpe_sample_chars=data_config.bpe_sample_chars,
    )
    source, data_dir = data_config.source, Path(data_config.data_dir)
    if run_data is None:
        prepared = prepare(source, data_dir=data_dir, progress=progress, **settings)
    else:
        run_dir = Path(config.train.out_dir)
        prepared = prepare_for_resume(
            source, data_dir, run_data, run_dir, progress=progress, **settings
        )
    scalars = {k: v for k, v in prepared.meta.items() if isinstance(v, str | int | float | bool)}
    return TrainData(
        tokenizer=prepared.tokenizer,
        train_tokens=prepared.train_tokens(),
        val_tokens=prepared.val_tokens(),
        summary={**scalars, "dir": str(prepared.dir.resolve())},
        warnings=prepared.warnings,
    )


def load_data_once(
    config: RunConfig,
    ddp: Distributed,
    progress: bool,
    run_data: dict | None,
    tokenizer: Tokenizer | None,
) -> TrainData:
    """`load_data` on every process: rank 0 prepares (and caches) the data first; the
    others then reuse its folder."""
    if not ddp.is_master:
        ddp.barrier()
    data = load_data(config, progress and ddp.is_master, run_data, tokenizer)
    if ddp.is_master:
        ddp.barrier()
    return data


def check_data(data: TrainData, block_size: int, resumed_run: Path | None) -> None:
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
