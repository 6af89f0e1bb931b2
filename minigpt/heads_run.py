"""`minigpt inspect-heads` on a run directory: what to inspect, and what to measure on.

heads.py measures heads on any model and any sequences; this module turns a run and
the user's options into those sequences and batches, kept apart so that heads.py
reads as the measurements alone:

- the sequences: the prompts (cropped to the context), or else the repeated probe;
- the batches importance is measured on: random windows of the run's own validation
  data where it can be found (`data.find_run_data`), else the inspected sequences
  themselves, with a note saying so.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from minigpt.batches import Batcher
from minigpt.checkpoint import Run
from minigpt.data import find_run_data
from minigpt.errors import MinigptError
from minigpt.heads import (
    REPEATED_PROBES,
    Inspection,
    by_length,
    inspect_heads,
    repeated_probe,
)
from minigpt.tokenizer import Tokenizer

IMPORTANCE_BATCHES = 8
"""Validation batches the ablation importance is averaged over."""
IMPORTANCE_BATCH_SIZE = 4
"""Sequences (of block_size tokens) per importance batch."""


def prompt_sequences(
    tokenizer: Tokenizer, prompts: list[str], block_size: int
) -> tuple[list[Tensor], list[str]]:
    """Encode prompts, cropping each to its first block_size tokens: (sequences, warnings)."""
    sequences, notes = [], []
    for number, prompt in enumerate(prompts, 1):
        ids = tokenizer.encode_prompt(prompt) if prompt else []
        if not ids:
            raise MinigptError(
                "the prompt is empty" if not prompt else "the prompt encodes to no tokens",
                hint="give every prompt some text",
                param="prompts",
            )
        if len(ids) > block_size:
            notes.append(
                f"prompt {number} has {len(ids)} tokens, more than block_size={block_size}: "
                f"cropped to its first {block_size}"
            )
            ids = ids[:block_size]
        sequences.append(torch.tensor(ids, dtype=torch.long))
    return sequences, notes


MIN_CONTEXT = 2
"""The shortest context worth inspecting: in a context of one token every head attends
to that token alone, with weight 1, and has nothing to show."""
MIN_PROBE = 2
"""The shortest half of the repeated probe: an induction head needs a token before the
repeated one to look back from."""


def check_context(block_size: int) -> None:
    """A model whose heads can attend to more than one token."""
    if block_size < MIN_CONTEXT:
        raise MinigptError(
            f"inspect-heads needs a model with a context of at least {MIN_CONTEXT} tokens; "
            f"this one has {block_size}, so each head can attend only to the token itself",
            hint=f"inspect a model trained with model.block_size of {MIN_CONTEXT} or more",
        )


def check_repeated(n: int, block_size: int) -> None:
    """The repeated probe [r1..rn, r1..rn] is 2n tokens: they must fit the context."""
    if block_size // 2 < MIN_PROBE:
        raise MinigptError(
            f"repeated {n} does not fit: the shortest probe is 2 x {MIN_PROBE} tokens, "
            f"and this model's context is {block_size}",
            hint="inspect it on a prompt instead",
            param="repeated",
        )
    if not MIN_PROBE <= n <= block_size // 2:
        raise MinigptError(
            f"repeated {n} is out of range: the probe is 2 x {n} tokens, so with "
            f"block_size={block_size} it must be from 2 to {block_size // 2}",
            hint=f"pass repeated from 2 to {block_size // 2}",
            param="repeated",
        )


def validation_batches(
    tokens: np.ndarray,
    block_size: int,
    n_batches: int = IMPORTANCE_BATCHES,
    batch_size: int = IMPORTANCE_BATCH_SIZE,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """`n_batches` seeded random windows of the validation tokens, as (x, y) pairs."""
    window = min(block_size, len(tokens) - 1)
    batcher = Batcher(tokens, window, batch_size, seed)
    return [batcher.next() for _ in range(n_batches)]


def prompt_batches(sequences: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The prompts themselves as (x, y) next-token batches, equal lengths grouped."""
    groups = by_length(seq for seq in sequences if seq.numel() >= 2)
    return [(torch.stack(g)[:, :-1], torch.stack(g)[:, 1:]) for g in groups]


def _sequences_to_inspect(
    tokenizer: Tokenizer,
    prompts: list[str] | None,
    repeated: int | None,
    block_size: int,
    n_probes: int,
    seed: int,
) -> tuple[list[Tensor], int | None, str, list[str]]:
    """The prompts, or else the repeated probe: (sequences, the probe's half-length or
    None, what they are in words, warnings)."""
    if prompts and repeated is not None:
        raise MinigptError(
            "pass either prompts or repeated, not both", hint="drop one of them", param="repeated"
        )
    if prompts:
        sequences, notes = prompt_sequences(tokenizer, prompts, block_size)
        source = "the prompt" if len(prompts) == 1 else f"{len(prompts)} prompts"
        return sequences, None, source, notes
    if repeated is None:
        if block_size // 2 < MIN_PROBE:  # not the user's repeated: say what to pass instead
            raise MinigptError(
                f"the repeated probe needs a context of at least {2 * MIN_PROBE} tokens; "
                f"this model's is {block_size}",
                hint="inspect it on text of your own with prompts",
                param="prompts",
            )
        repeated = min(32, block_size // 2)
    check_repeated(repeated, block_size)
    sequences = list(repeated_probe(tokenizer, repeated, n_probes, seed))
    source = f"{n_probes} random sequences of {repeated} tokens, each followed by itself"
    return sequences, repeated, source, []


def _importance_batches(
    run: Run, sequences: list[Tensor], probed: bool, seed: int
) -> tuple[list[tuple[Tensor, Tensor]] | None, str, list[str]]:
    """Batches to measure importance on, on the model's device (None if there are none),
    where they come from in words, and warnings: the run's validation data if it can
    be found, else the inspected sequences themselves."""
    model = run.model
    prepared = find_run_data(run.config.get("prepared_data"), run.dir, tokenizer=run.tokenizer)
    tokens = prepared.val_tokens() if prepared is not None else None
    batches = None
    if tokens is not None and len(tokens) >= 2:
        batches = validation_batches(tokens, model.config.block_size, seed=seed)
        if not _within_vocab(batches, run.tokenizer.vocab_size):
            batches = None  # the token file does not match its tokenizer: not usable
    if batches is not None:
        B, T = batches[0][0].shape
        where = prepared.val_path
        source, notes = f"{len(batches)} validation batches of {B} x {T} tokens from {where}", []
    else:
        batches = prompt_batches(sequences)
        what = "the probe sequences" if probed else "the prompt"
        source = f"{what} (no validation data found for this run)"
        notes = [f"importance is measured on {what}: the run's validation data was not found"]
        if not batches:
            notes.append("importance skipped: the prompt has fewer than 2 tokens")
    batches = [(x.to(model.device), y.to(model.device)) for x, y in batches]
    return batches or None, source, notes


def _within_vocab(batches: list[tuple[Tensor, Tensor]], vocab_size: int) -> bool:
    """Whether every id of the (x, y) batches is one the tokenizer has: the embedding
    would fail on a larger one, or score a padded row the model never learned."""
    return all(int(t.min()) >= 0 and int(t.max()) < vocab_size for x, y in batches for t in (x, y))


def inspect_run(
    run: Run,
    prompts: list[str] | None = None,
    repeated: int | None = None,
    importance: bool = True,
    n_probes: int = REPEATED_PROBES,
    seed: int = 0,
) -> Inspection:
    """Inspect a loaded run (`checkpoint.load_run`) on prompts or on the repeated probe.

    With neither, the probe with N = min(32, block_size // 2) is used. Importance is
    measured on validation batches of the run's prepared data, or on the prompts
    (with a note saying so) when that data cannot be found.
    """
    model, tokenizer = run.model, run.tokenizer
    check_context(model.config.block_size)
    sequences, repeated, source, notes = _sequences_to_inspect(
        tokenizer, prompts, repeated, model.config.block_size, n_probes, seed
    )
    batches = importance_source = None
    if importance:
        batches, importance_source, importance_notes = _importance_batches(
            run, sequences, repeated is not None, seed
        )
        notes += importance_notes
    inspection = inspect_heads(
        model,
        tokenizer,
        sequences,
        repeated=repeated,
        importance_batches=batches,
        importance_source=importance_source,
        source=source,
    )
    inspection.notes = notes + inspection.notes
    return inspection


def check_head(layer: int | None, head: int | None, n_layer: int, n_head: int) -> None:
    """layer and head, where given, must name an existing layer and head."""
    if head is not None and layer is None:
        # A rule about the command line's combination of options, so in its words.
        raise MinigptError("--head needs --layer", hint="pass --layer L --head H")
    if layer is not None and not 0 <= layer < n_layer:
        raise MinigptError(
            f"layer {layer} is out of range: this model has layers 0 to {n_layer - 1}",
            hint=f"pass layer from 0 to {n_layer - 1}",
            param="layer",
        )
    if head is not None and not 0 <= head < n_head:
        raise MinigptError(
            f"head {head} is out of range: this model has heads 0 to {n_head - 1} in each layer",
            hint=f"pass head from 0 to {n_head - 1}",
            param="head",
        )
