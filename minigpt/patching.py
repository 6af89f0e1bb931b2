"""Activation patching: which components a behaviour causally flows through.

Take a clean prompt, where the model gives the answer, and a corrupted one of the
same length in tokens, where it gives another token (`versus`). Run the corrupted
prompt, but with one component's activation taken from the clean run. The share of
the clean logit difference that comes back says how much of the behaviour flows
through that component:

    LD = logit(answer) - logit(versus) at the last position
    restored = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)

0: patching it changes nothing; 1: it alone brings back the clean behaviour.
Patching nothing gives 0 and patching everything gives 1, by construction.

Two ways of cutting the model into components (`--by`):

- `head`: each head's context z_h at every position (the input of W^O, which is
  what the head writes), and each layer's MLP output;
- `layer-position`: the residual stream entering each layer, one position at a time.

A layer's patches run together as one batch of copies of the corrupted run, starting
from the stream entering that layer (everything before it is the corrupted run's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from minigpt.errors import MinigptError
from minigpt.heads import evaluating, token_labels
from minigpt.lens import Trace, lens_logits, removed_after, stream_names, trace
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer

PATCH_MODES = ("head", "layer-position")
TOKENS_PER_BATCH = 8192
"""Copies of the corrupted run go through the model this many tokens at a time, so
memory stays bounded however long the prompt (T copies of T tokens grow as T²)."""


@dataclass
class Patching:
    """The fraction of the clean logit difference each patch restores."""

    by: str
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    answer: str
    versus: str
    clean_diff: float
    corrupt_diff: float
    restored: Tensor
    """(n_layer, H + 1) by head, the last column each layer's MLP; (n_layer, T) by
    layer-position."""
    rows: list[str]
    columns: list[str]
    together: list[str] = field(default_factory=list)
    """Heads patched all at once (`--heads`), e.g. ['L1H0', 'L1H2']."""
    together_restored: float | None = None
    """The share those heads restore when patched together."""
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "by": self.by,
            "clean_tokens": self.clean_tokens,
            "corrupt_tokens": self.corrupt_tokens,
            "answer": self.answer,
            "versus": self.versus,
            "clean_diff": self.clean_diff,
            "corrupt_diff": self.corrupt_diff,
            "rows": self.rows,
            "columns": self.columns,
            "restored": self.restored.tolist(),
            "together": self.together,
            "together_restored": self.together_restored,
        }


@dataclass
class Patches:
    """What each of n copies of the corrupted run takes from the clean run."""

    heads: Tensor
    """(n, n_layer, H) bool: head h of layer l's context, at every position."""
    mlps: Tensor
    """(n, n_layer) bool: layer l's MLP output, at every position."""

    @classmethod
    def none(cls, n: int, n_layer: int, n_head: int) -> Patches:
        heads = torch.zeros(n, n_layer, n_head, dtype=torch.bool)
        return cls(heads, torch.zeros(n, n_layer, dtype=torch.bool))


@contextmanager
def patched(model: GPT, clean: Trace, patches: Patches) -> Iterator[None]:
    """While the block runs, copy i of a batch takes from `clean` what patches[i] says."""
    hooks = []
    d_head = model.config.d_head
    for layer, block in enumerate(model.blocks):
        heads = patches.heads[:, layer, :, None].to(model.device)  # (n, H, 1)
        mlp = patches.mlps[:, layer, None, None].to(model.device)  # (n, 1, 1)
        clean_z = clean.contexts[layer].unflatten(-1, (-1, d_head))  # (T, H, d_head)
        clean_mlp = clean.mlps[layer]  # (T, n_embd)

        def swap_heads(_module, args, heads=heads, clean_z=clean_z):
            z = args[0].unflatten(-1, (-1, d_head))  # (n, T, H, d_head)
            z = torch.where(heads[:, None], clean_z.to(z.dtype), z)
            return (z.flatten(-2),)

        def swap_mlp(_module, _args, out, mlp=mlp, clean_mlp=clean_mlp):
            return torch.where(mlp, clean_mlp.to(out.dtype), out)

        if heads.any():
            hooks.append(block.attn.out_proj.register_forward_pre_hook(swap_heads))
        if mlp.any():
            hooks.append(block.mlp.register_forward_hook(swap_mlp))
    with removed_after(hooks):
        yield


@torch.no_grad()
def patched_diffs(
    model: GPT,
    start: Tensor,
    start_layer: int,
    clean: Trace,
    patches: Patches,
    answer: int,
    versus: int,
) -> Tensor:
    """Run copies of a stream `start` (n, T, n_embd) entering `start_layer` to the end,
    each patched as `patches` says (at layers from start_layer on): LD of each (n,)."""
    with evaluating(model), patched(model, clean, patches):
        x, _ = model.run_blocks(start.to(model.tok_emb.weight.dtype), start_layer)
        logits, _ = model.logits_and_loss(x, last_only=True)  # (n, 1, vocab)
    logits = logits[:, -1].float()
    return (logits[:, answer] - logits[:, versus]).cpu()


def patch_heads(model: GPT, clean: Trace, corrupt: Trace, answer: int, versus: int) -> Tensor:
    """LD with each head's context, and each MLP's output, patched alone: (n_layer, H + 1)."""
    L, H = model.config.n_layer, model.config.n_head
    diffs = torch.zeros(L, H + 1)
    for layer in range(L):
        patches = Patches.none(H + 1, L, H)
        patches.heads[:H, layer] = torch.eye(H, dtype=torch.bool)  # copy h: head h
        patches.mlps[H, layer] = True  # the last copy: the MLP
        start = corrupt.resid[layer].expand(H + 1, -1, -1)
        diffs[layer] = _in_chunks(model, start, layer, clean, patches, answer, versus)
    return diffs


def patch_residual(
    model: GPT, clean: Trace, corrupt: Trace, answer: int, versus: int, corrupt_diff: float
) -> Tensor:
    """LD with the stream entering each layer patched at one position: (n_layer, T).

    Where the clean and corrupted streams are equal (every position before the first
    token that differs), the patch changes nothing: LD stays corrupt_diff, not rerun."""
    L, T = model.config.n_layer, corrupt.resid.size(1)
    diffs = torch.full((L, T), corrupt_diff)
    for layer in range(L):
        differs = (clean.resid[layer] != corrupt.resid[layer]).any(-1).nonzero()[:, 0].tolist()
        if not differs:
            continue
        start = corrupt.resid[layer].repeat(len(differs), 1, 1)  # (n, T, n_embd)
        start[range(len(differs)), differs] = clean.resid[layer, differs]
        patches = Patches.none(len(differs), L, model.config.n_head)
        diffs[layer, differs] = _in_chunks(model, start, layer, clean, patches, answer, versus)
    return diffs


def patch_together(
    model: GPT, clean: Trace, corrupt: Trace, heads: list[tuple[int, int]], answer: int, versus: int
) -> float:
    """LD with every (layer, head) of `heads` patched at once."""
    patches = Patches.none(1, model.config.n_layer, model.config.n_head)
    for layer, head in heads:
        patches.heads[0, layer, head] = True
    return float(patched_diffs(model, corrupt.resid[0][None], 0, clean, patches, answer, versus)[0])


def _in_chunks(
    model: GPT, start: Tensor, layer: int, clean: Trace, patches: Patches, answer: int, versus: int
) -> Tensor:
    """`patched_diffs` over the copies a few at a time (TOKENS_PER_BATCH)."""
    step = max(1, TOKENS_PER_BATCH // start.size(1))
    return torch.cat([
        patched_diffs(
            model, start[i : i + step], layer, clean,
            Patches(patches.heads[i : i + step], patches.mlps[i : i + step]), answer, versus,
        )
        for i in range(0, start.size(0), step)
    ])  # fmt: skip


def activation_patching(
    model: GPT,
    tokenizer: Tokenizer,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    answer: int,
    versus: int,
    by: str = "head",
    together: list[tuple[int, int]] = (),
) -> Patching:
    """Patch every component of the corrupted run (T,) from the clean run (T,), one at
    a time: the fraction of the clean logit difference each restores. together: (layer,
    head) pairs also patched all at once, for the share a circuit restores as a whole."""
    check_mode(by)
    check_same_length(clean_ids, corrupt_ids)
    clean, corrupt = trace(model, clean_ids), trace(model, corrupt_ids)
    # each trace already ends in the model's last stream: its logits, without another pass
    clean_diff, corrupt_diff = (
        float(logits[answer] - logits[versus])
        for logits in (lens_logits(model, run.resid[-1, -1]) for run in (clean, corrupt))
    )
    if clean_diff == corrupt_diff:
        raise MinigptError(
            f"the clean and corrupted prompts give the same logit difference ({clean_diff:.4g}), "
            "so there is nothing for a patch to restore",
            hint="choose prompts where the answer and --versus swap places",
        )
    L, H = model.config.n_layer, model.config.n_head
    if by == "head":
        diffs = patch_heads(model, clean, corrupt, answer, versus)
        columns = [f"H{h}" for h in range(H)] + ["MLP"]
    else:
        diffs = patch_residual(model, clean, corrupt, answer, versus, corrupt_diff)
        columns = [f"{t}" for t in range(clean_ids.numel())]
    share = (diffs - corrupt_diff) / (clean_diff - corrupt_diff) + 0.0  # + 0.0: no -0.0
    together_restored = None
    if together:
        diff = patch_together(model, clean, corrupt, together, answer, versus)
        together_restored = (diff - corrupt_diff) / (clean_diff - corrupt_diff)
    labels = token_labels(tokenizer, [answer, versus])
    return Patching(
        by=by,
        clean_tokens=token_labels(tokenizer, clean_ids.tolist()),
        corrupt_tokens=token_labels(tokenizer, corrupt_ids.tolist()),
        answer=labels[0],
        versus=labels[1],
        clean_diff=clean_diff,
        corrupt_diff=corrupt_diff,
        restored=share,
        # by head, row n is block n; by layer-position, the stream entering block n,
        # named as the lens names it: after the embeddings, then after block n - 1
        rows=[f"L{layer}" for layer in range(L)] if by == "head" else stream_names(L)[:L],
        columns=columns,
        together=[f"L{layer}H{head}" for layer, head in together],
        together_restored=together_restored,
    )


def check_mode(by: str) -> None:
    if by not in PATCH_MODES:
        raise MinigptError(
            f"by must be one of {', '.join(PATCH_MODES)}, got {by!r}",
            hint="'head' patches each head's output; 'layer-position' the residual stream",
            param="by",
        )


def check_same_length(clean_ids: Tensor, corrupt_ids: Tensor) -> None:
    """Patching swaps activations position by position, so the prompts must line up."""
    if clean_ids.numel() != corrupt_ids.numel():
        raise MinigptError(
            f"the clean prompt is {clean_ids.numel()} tokens and the corrupted one "
            f"{corrupt_ids.numel()}: activation patching needs prompts of the same length in tokens",
            hint="change the corrupted prompt token for token, e.g. swap one word for "
            "another that is also one token",
            param="corrupt",
        )
