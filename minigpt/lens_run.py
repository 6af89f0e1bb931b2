"""The circuit commands on a run directory: `minigpt lens`, `attribute` and `patch`.

lens.py and patching.py measure any model on token ids; this module turns what a
person types (prompts, answer tokens, a position) into those ids, refusing what the
measures cannot take with one clear sentence each.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from minigpt.checkpoint import Run
from minigpt.errors import MinigptError
from minigpt.heads import token_labels
from minigpt.lens import Attribution, Lens, attribute, logit_lens
from minigpt.patching import Patching, activation_patching
from minigpt.tokenizer import Tokenizer


def lens_run(run: Run, prompt: str, top: int, position: int) -> tuple[Lens, int]:
    """The logit lens of a prompt, and the position to list (counted from 0)."""
    idx = prompt_ids(run, prompt)
    position = check_position(position, idx.numel())  # before the work, not after it
    result = logit_lens(run.model, run.tokenizer, idx, top)
    result.source = str(run.dir)
    return result, position


def attribute_run(run: Run, prompt: str, answer: str, versus: str | None) -> Attribution:
    """Direct logit attribution of the answer (minus versus) at the prompt's end."""
    idx = prompt_ids(run, prompt)
    answer_id = single_token(run.tokenizer, answer, "answer")
    versus_id = single_token(run.tokenizer, versus, "versus") if versus is not None else None
    result = attribute(run.model, run.tokenizer, idx, answer_id, versus_id)
    result.source = str(run.dir)
    return result


def patch_run(
    run: Run, clean: str, corrupt: str, answer: str, versus: str, by: str, heads: str | None = None
) -> Patching:
    """Activation patching from the clean prompt into the corrupted one; `heads`
    ('L1H0,L1H2') are also patched together."""
    n_layer, n_head = run.model.config.n_layer, run.model.config.n_head
    together = parse_heads(heads, n_layer, n_head) if heads else []
    clean_ids, corrupt_ids = prompt_ids(run, clean, "clean"), prompt_ids(run, corrupt, "corrupt")
    answer_id = single_token(run.tokenizer, answer, "answer")
    versus_id = single_token(run.tokenizer, versus, "versus")
    result = activation_patching(
        run.model, run.tokenizer, clean_ids, corrupt_ids, answer_id, versus_id, by, together
    )
    result.source = str(run.dir)
    return result


def prompt_ids(run: Run, prompt: str, param: str = "prompt") -> Tensor:
    """A prompt typed by a person as token ids (T,) on the model's device: refused when
    empty or longer than the context (these measures are about one forward pass over
    the prompt as typed, so nothing is cropped)."""
    ids = run.tokenizer.encode_prompt(prompt) if prompt else []
    block_size = run.model.config.block_size
    what = "the prompt" if param == "prompt" else f"the {param} prompt"  # which of two
    if not ids:
        raise MinigptError(
            f"{what} is empty" if not prompt else f"{what} encodes to no tokens",
            hint=f"give {what} some text",
            param=param,
        )
    if len(ids) > block_size:
        raise MinigptError(
            f"{what} is {len(ids)} tokens, more than the model's context of {block_size}",
            hint=f"shorten it to at most {block_size} tokens",
            param=param,
        )
    return torch.tensor(ids, dtype=torch.long, device=run.model.device)


def single_token(tokenizer: Tokenizer, text: str, param: str) -> int:
    """The id of `text`, which must be exactly one token of this tokenizer."""
    ids = tokenizer.encode_prompt(text) if text else []
    if len(ids) != 1:
        pieces = ", ".join(repr(label) for label in token_labels(tokenizer, ids))
        what = f"{len(ids)} tokens ({pieces})" if ids else "no token"
        raise MinigptError(
            f"{param} {text!r} is {what}; it must be exactly one token",
            hint="pass one token of the model's vocabulary (GPT-2's words usually "
            "start with their space, e.g. ' Paris')",
            param=param,
        )
    return ids[0]


def check_position(position: int, n_tokens: int) -> int:
    """A position of a prompt of n_tokens (negative counts from the end): from 0."""
    if not -n_tokens <= position < n_tokens:
        raise MinigptError(
            f"position {position} is out of range: the prompt has {n_tokens} tokens",
            hint=f"pass position from 0 to {n_tokens - 1}, or -1 for the last",
            param="position",
        )
    return position % n_tokens


def parse_heads(text: str, n_layer: int, n_head: int) -> list[tuple[int, int]]:
    """'L1H0,L1H2' -> [(1, 0), (1, 2)]: heads named as the tables name them."""
    heads = []
    for name in text.split(","):
        match = re.fullmatch(r"\s*L(\d+)H(\d+)\s*", name, flags=re.IGNORECASE)
        if not match:
            raise MinigptError(
                f"--heads: {name.strip()!r} is not a head name",
                hint="name heads as the tables do, comma-separated: L1H0,L1H2",
            )
        layer, head = int(match[1]), int(match[2])
        if layer >= n_layer or head >= n_head:
            raise MinigptError(
                f"--heads: {name.strip()} is not in this model, which has layers 0 to "
                f"{n_layer - 1} and heads 0 to {n_head - 1}",
                hint="pick heads from the table that --by head prints",
            )
        heads.append((layer, head))
    return heads
