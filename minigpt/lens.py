"""Reading the residual stream: the logit lens and direct logit attribution.

Every block adds what it computes to the residual stream, so the stream after the
last block is a sum of what each component wrote (for one position):

    x_L = embed + sum over layers l of ( sum over heads h of W^O_h z_h  +  b^O_l  +  MLP_l )

where z_h is head h's context (`Context_h` in attention.py) and W^O_h the columns of
W^O that read it. The logits are lm_head(ln_f(x_L)). Two ways of reading the sum:

- **the logit lens** (nostalgebraist, 2020): put the stream after each layer through
  ln_f and the LM head, as if the model ended there. The layer where the true next
  token's probability rises is the layer that first knows it.
- **direct logit attribution**: with ln_f's scale frozen at its value on the whole
  stream x_L (as the interpretability literature does), ln_f is linear, so the
  answer's logit, or its difference from another token's, splits exactly into one
  term per component: which heads and MLPs push the answer up, and by how much.

`trace` runs the model once and keeps only what these need: the stream entering each
layer, each layer's head contexts (the input of W^O) and each MLP's output.
Activation patching, which reruns the model with some of them swapped, is
`minigpt.patching`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from minigpt.errors import MinigptError
from minigpt.heads import evaluating, token_labels
from minigpt.layers import RMSNorm
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer

# ---------------------------------------------------------------------------
# One forward pass, traced


@dataclass
class Trace:
    """What one forward pass over one sequence of T tokens wrote into the residual stream."""

    resid: Tensor
    """(n_layer + 1, T, n_embd): the stream entering each layer, then after the last block."""
    contexts: Tensor
    """(n_layer, T, H * d_head): every head's Context_h, concatenated: the input of W^O."""
    mlps: Tensor
    """(n_layer, T, n_embd): each block's MLP output."""


@contextmanager
def recording(model: GPT, contexts: list, mlps: list) -> Iterator[None]:
    """Append each layer's W^O input and MLP output to the lists while the block runs."""
    hooks = []
    for block in model.blocks:
        hooks.append(block.attn.out_proj.register_forward_pre_hook(
            lambda _module, args: contexts.append(args[0])
        ))  # fmt: skip
        hooks.append(block.mlp.register_forward_hook(
            lambda _module, _args, out: mlps.append(out)
        ))  # fmt: skip
    with removed_after(hooks):
        yield


@contextmanager
def removed_after(hooks: list) -> Iterator[None]:
    """Hooks registered on a model, taken off when the block ends, however it ends."""
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def trace(model: GPT, idx: Tensor) -> Trace:
    """Run token ids idx (T,) through the model a layer at a time: its `Trace`."""
    contexts: list[Tensor] = []
    mlps: list[Tensor] = []
    with evaluating(model), recording(model, contexts, mlps):
        x = model.embed(idx[None])  # (1, T, n_embd) entering layer 0
        streams = [x]
        for layer in range(model.config.n_layer):
            x, _ = model.run_blocks(x, layer, layer + 1)
            streams.append(x)
    return Trace(
        resid=torch.cat(streams).float(),
        contexts=torch.cat(contexts).float(),
        mlps=torch.cat(mlps).float(),
    )


def head_outputs(model: GPT, contexts: Tensor, layer: int) -> Tensor:
    """What each head of `layer` writes into the stream, W^O_h z_h, from that layer's
    concatenated contexts (..., H * d_head): (..., H, n_embd), W^O's bias left out."""
    attn = model.blocks[layer].attn
    H, d_head = attn.n_head, attn.d_head
    W_O = attn.out_proj.weight.float().view(-1, H, d_head)  # (n_embd, H, d_head)
    z = contexts.unflatten(-1, (H, d_head))  # (..., H, d_head)
    return torch.einsum("...hd,chd->...hc", z, W_O)


# ---------------------------------------------------------------------------
# The logit lens


@dataclass
class Lens:
    """The logit lens of one prompt: S = n_layer + 1 streams (after the embeddings,
    then after each block) read as next-token predictions at each of T positions."""

    tokens: list[str]
    streams: list[str]
    """A name per stream: 'embed', then 'L0'.. for the stream after that block."""
    top_ids: Tensor
    """(S, T, K) the K likeliest next tokens at each stream and position."""
    top_probs: Tensor
    """(S, T, K) their probabilities."""
    top_tokens: list[list[list[str]]]
    """top_ids as printable labels, [stream][position][k]."""
    next_probs: Tensor
    """(S, T - 1) the probability of the token that actually follows position t."""
    next_ranks: Tensor
    """(S, T - 1) its rank among all tokens, 1 = the likeliest."""
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "tokens": self.tokens,
            "streams": self.streams,
            "top_ids": self.top_ids.tolist(),
            "top_probs": self.top_probs.tolist(),
            "top_tokens": self.top_tokens,
            "next_probs": self.next_probs.tolist(),
            "next_ranks": self.next_ranks.tolist(),
        }


@torch.no_grad()
def lens_logits(model: GPT, resid: Tensor) -> Tensor:
    """Streams resid (..., n_embd) read as the model's last layer reads its own:
    ln_f, then the LM head: logits (..., vocab_size)."""
    weight = model.lm_head.weight
    return model.lm_head(model.ln_f(resid.to(weight.dtype))).float()


@torch.no_grad()
def logit_lens(model: GPT, tokenizer: Tokenizer, idx: Tensor, top_k: int = 5) -> Lens:
    """The logit lens of token ids idx (T,); one stream's logits at a time, so memory
    holds T x vocab_size floats, never S times that. Only the tokenizer's ids are
    predictions (as in sampling: a vocabulary padded past it has rows it cannot decode)."""
    vocab = tokenizer.vocab_size
    check_top_k(top_k, vocab)
    resid = trace(model, idx).resid  # (S, T, n_embd)
    targets = idx[1:].to(resid.device)  # (T - 1,) the token after each position
    top_ids, top_probs, next_probs, next_ranks = [], [], [], []
    for stream in resid:
        probs = torch.softmax(lens_logits(model, stream)[:, :vocab], dim=-1)  # (T, vocab)
        top = probs.topk(top_k, dim=-1)
        top_ids.append(top.indices)
        top_probs.append(top.values)
        true = probs[:-1].gather(-1, targets[:, None])  # (T - 1, 1)
        next_probs.append(true[:, 0])
        next_ranks.append((probs[:-1] > true).sum(-1) + 1)
    top_ids_all = torch.stack(top_ids).cpu()
    return Lens(
        tokens=token_labels(tokenizer, idx.tolist()),
        streams=stream_names(model.config.n_layer),
        top_ids=top_ids_all,
        top_probs=torch.stack(top_probs).cpu(),
        top_tokens=[[token_labels(tokenizer, ids) for ids in s.tolist()] for s in top_ids_all],
        next_probs=torch.stack(next_probs).cpu(),
        next_ranks=torch.stack(next_ranks).cpu(),
    )


def stream_names(n_layer: int) -> list[str]:
    """The residual stream's names: 'embed' after the embeddings, 'Ln' after block n."""
    return ["embed"] + [f"L{layer}" for layer in range(n_layer)]


def check_top_k(top_k: int, vocab_size: int) -> None:
    if not 1 <= top_k <= vocab_size:
        raise MinigptError(
            f"top {top_k} is out of range: the model knows {vocab_size} tokens",
            hint=f"pass top from 1 to {vocab_size}",
            param="top",
        )


# ---------------------------------------------------------------------------
# Direct logit attribution


@dataclass
class Attribution:
    """Each component's direct contribution to the answer's logit at the last position
    (or to logit(answer) - logit(versus)), through ln_f with its scale frozen."""

    tokens: list[str]
    answer: str
    versus: str | None
    embed: float
    """The token (and learned position) embeddings."""
    heads: Tensor
    """(n_layer, H) each head's W^O_h z_h."""
    mlps: Tensor
    """(n_layer,) each MLP's output."""
    biases: float
    """Every W^O bias and ln_f's own bias: constant terms no component owns."""
    logit_diff: float
    """The same quantity from the model's own logits: the sum of the terms above."""
    source: str = ""
    components: list[tuple[str, float]] = field(init=False)
    """(name, contribution) of every term, largest first."""

    def __post_init__(self) -> None:
        L, H = self.heads.shape
        named = [("embed", self.embed), ("biases", self.biases)]
        named += [(f"L{i}H{h}", float(self.heads[i, h])) for i in range(L) for h in range(H)]
        named += [(f"L{i} MLP", float(self.mlps[i])) for i in range(L)]
        self.components = sorted(named, key=lambda item: -item[1])

    @property
    def total(self) -> float:
        """The sum of every term: equals `logit_diff` up to float rounding."""
        return self.embed + float(self.heads.sum()) + float(self.mlps.sum()) + self.biases

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "tokens": self.tokens,
            "answer": self.answer,
            "versus": self.versus,
            "logit_diff": self.logit_diff,
            "total": self.total,
            "embed": self.embed,
            "biases": self.biases,
            "heads": self.heads.tolist(),
            "mlps": self.mlps.tolist(),
            "components": [{"name": n, "value": v} for n, v in self.components],
        }


def frozen_norm(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """ln_f at the stream x (n_embd,) as a linear map plus a constant: (scale, bias)
    with norm(c) = center(c) * scale + bias for c = x, the scale frozen at x's, so
    that the terms of any sum c_1 + c_2 + ... = x go through it one by one."""
    x = x.float()
    if isinstance(norm, RMSNorm):
        rms = torch.rsqrt(x.pow(2).mean() + norm.eps)
        return rms * norm.weight.float(), None
    if isinstance(norm, nn.LayerNorm):
        std = torch.rsqrt(x.var(unbiased=False) + norm.eps)
        bias = norm.bias.float() if norm.bias is not None else None
        return std * norm.weight.float(), bias
    raise MinigptError(f"cannot freeze a final norm of type {type(norm).__name__}")


@torch.no_grad()
def attribute(
    model: GPT, tokenizer: Tokenizer, idx: Tensor, answer: int, versus: int | None = None
) -> Attribution:
    """Direct logit attribution at the last position of token ids idx (T,)."""
    with evaluating(model):
        traced = trace(model, idx)
        logits, _ = model(idx[None], last_only=True)
    logits = logits[0, -1].float()
    W_U = model.lm_head.weight.float()
    direction = W_U[answer] - (W_U[versus] if versus is not None else 0.0)  # (n_embd,)
    scale, norm_bias = frozen_norm(model.ln_f, traced.resid[-1, -1])
    centered = not isinstance(model.ln_f, RMSNorm)

    def read(c: Tensor) -> Tensor:  # terms (..., n_embd) -> their logit contributions (...)
        if centered:
            c = c - c.mean(-1, keepdim=True)
        return (c * scale) @ direction

    heads = torch.stack(
        [read(head_outputs(model, traced.contexts[i, -1], i)) for i in range(len(traced.mlps))]
    )  # (n_layer, H)
    biases = float(norm_bias @ direction) if norm_bias is not None else 0.0
    for block in model.blocks:
        if block.attn.out_proj.bias is not None:
            biases += float(read(block.attn.out_proj.bias.float()))
    labels = token_labels(tokenizer, [answer] + ([versus] if versus is not None else []))
    return Attribution(
        tokens=token_labels(tokenizer, idx.tolist()),
        answer=labels[0],
        versus=labels[1] if versus is not None else None,
        embed=float(read(traced.resid[0, -1])),
        heads=heads.cpu(),
        mlps=read(traced.mlps[:, -1]).cpu(),
        biases=biases,
        logit_diff=float(logits[answer] - (logits[versus] if versus is not None else 0.0)),
    )
