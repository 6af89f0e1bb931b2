"""What every attention head does: capture A, score it, label it, rank it.

For one head's attention matrix A (T x T, row i = query i, causal so A[i, j] = 0
for j > i, each row sums to 1) the metrics are:

    previous_token   mean over i >= 1 of A[i, i-1]
    induction        on a probe [r1..rn, r1..rn]: mean over i = n..2n-1 of A[i, i-n+1]
                     (the query looks at the token *after* its earlier copy)
    duplicate_token  on the same probe: mean over i = n..2n-1 of A[i, i-n]
                     (the query looks at its earlier copy)
    first_token      mean over i of A[i, 0] (the "attention sink")
    entropy          mean over rows of -sum_j A[i, j] log A[i, j]        (nats)
    norm_entropy     mean over rows i >= 1 of that entropy / log(i + 1)  (1.0 = uniform)
    mean_distance    mean over rows of sum_j A[i, j] (i - j)             (tokens)
    confidence       mean over rows of max_j A[i, j]
    importance       rise in mean loss when the head's output is zeroed (head_gates)
    grad_importance  E_x |dL(x)/d gate_h| at gate = 1 (Michel et al., 2019), one
                     backward pass for all heads
    nearest          the other head with the smallest Jensen-Shannon divergence
                     between their attention rows (bits, averaged over rows)

Several prompts (or probe sequences) are scored one by one and the metrics
averaged over all of them; the first sequence is only what the pictures show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from minigpt.errors import MinigptError
from minigpt.model import GPT
from minigpt.signals import polled
from minigpt.tokenizer import Tokenizer

# ---------------------------------------------------------------------------
# Roles


@dataclass(frozen=True)
class RoleThresholds:
    """How a head's metrics become its role; the first rule that matches wins.

    1. induction        induction score >= induction        (only with --repeated)
    2. previous-token   previous-token score >= previous_token
    3. duplicate-token  duplicate-token score >= duplicate_token (only with --repeated)
    4. first-token      first-token (sink) score >= first_token
    5. broad            normalised entropy >= broad_entropy (close to uniform)
    6. local            mean attention distance <= local_distance tokens
    7. mixed            none of the above
    """

    induction: float = 0.4
    previous_token: float = 0.5
    duplicate_token: float = 0.5
    first_token: float = 0.5
    local_distance: float = 2.0
    broad_entropy: float = 0.75

    def describe(self) -> str:
        """One line per rule, for the CLI help and the reports."""
        return (
            f"induction: induction score >= {self.induction}; "
            f"previous-token: previous-token score >= {self.previous_token}; "
            f"duplicate-token: duplicate-token score >= {self.duplicate_token}; "
            f"first-token: first-token score >= {self.first_token}; "
            f"broad: normalised entropy >= {self.broad_entropy}; "
            f"local: mean attention distance <= {self.local_distance} tokens; "
            "mixed: anything else (first matching rule wins, in this order)"
        )


ROLE_THRESHOLDS = RoleThresholds()
ROLES = ("induction", "previous-token", "duplicate-token", "first-token", "broad", "local", "mixed")

REPEATED_PROBES = 8
"""How many random [r, r] sequences `--repeated N` averages over."""


def assign_role(metrics: dict, thresholds: RoleThresholds = ROLE_THRESHOLDS) -> str:
    """The role of one head from its metrics dict (keys as in `HeadMetrics`)."""

    def at_least(key: str, limit: float) -> bool:
        value = metrics.get(key)
        return value is not None and not math.isnan(value) and value >= limit

    if at_least("induction", thresholds.induction):
        return "induction"
    if at_least("previous_token", thresholds.previous_token):
        return "previous-token"
    if at_least("duplicate_token", thresholds.duplicate_token):
        return "duplicate-token"
    if at_least("first_token", thresholds.first_token):
        return "first-token"
    if at_least("norm_entropy", thresholds.broad_entropy):
        return "broad"
    distance = metrics.get("mean_distance")
    if distance is not None and not math.isnan(distance) and distance <= thresholds.local_distance:
        return "local"
    return "mixed"


# ---------------------------------------------------------------------------
# Metrics of attention matrices. Every function takes A of shape (..., T, T)
# (any leading dims: heads, layers, sequences) and returns shape (...).


def previous_token_score(A: Tensor) -> Tensor:
    """Mean over i >= 1 of A[i, i-1]; NaN for a one-token sequence."""
    return torch.diagonal(A, offset=-1, dim1=-2, dim2=-1).mean(-1)


def _probe_rows(T: int, n: int) -> Tensor:
    if not 1 <= n or 2 * n > T:
        raise MinigptError(
            f"a repeated probe of half-length {n} needs at least {2 * n} tokens, got {T}",
            hint="pass the half-length n of a [r1..rn, r1..rn] sequence",
            param="n",
        )
    return torch.arange(n, 2 * n)


def induction_score(A: Tensor, n: int) -> Tensor:
    """On [r1..rn, r1..rn]: mean over i = n..2n-1 of A[i, i-n+1]."""
    rows = _probe_rows(A.size(-1), n)
    return A[..., rows, rows - n + 1].mean(-1)


def duplicate_token_score(A: Tensor, n: int) -> Tensor:
    """On [r1..rn, r1..rn]: mean over i = n..2n-1 of A[i, i-n]."""
    rows = _probe_rows(A.size(-1), n)
    return A[..., rows, rows - n].mean(-1)


def first_token_score(A: Tensor) -> Tensor:
    """Mean over all rows i of A[i, 0] (row 0 counts: it can only attend to itself)."""
    return A[..., :, 0].mean(-1)


def _row_entropy(A: Tensor) -> Tensor:
    """-sum_j A[i, j] log A[i, j] per row, with 0 log 0 = 0: shape (..., T)."""
    return -torch.special.xlogy(A, A).sum(-1)


def entropy(A: Tensor) -> Tensor:
    """Mean over rows of the row entropy, in nats."""
    return _row_entropy(A).mean(-1)


def normalised_entropy(A: Tensor) -> Tensor:
    """Mean over rows i >= 1 of entropy / log(i + 1): 1.0 for uniform causal attention.

    Row 0 is left out: it sees one key, so its maximum entropy log 1 is 0.
    """
    T = A.size(-1)
    max_entropy = torch.log(torch.arange(1, T + 1, dtype=A.dtype, device=A.device))  # (T,)
    return (_row_entropy(A)[..., 1:] / max_entropy[1:]).mean(-1)


def mean_attention_distance(A: Tensor) -> Tensor:
    """Mean over rows of sum_j A[i, j] (i - j): how far back a head looks, in tokens."""
    T = A.size(-1)
    pos = torch.arange(T, dtype=A.dtype, device=A.device)
    distance = (pos[:, None] - pos[None, :]).clamp(min=0)  # (T, T), i - j
    return (A * distance).sum(-1).mean(-1)


def confidence(A: Tensor) -> Tensor:
    """Mean over rows of max_j A[i, j]."""
    return A.amax(-1).mean(-1)


def js_divergence(P: Tensor, Q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits between rows of P and Q, averaged over rows.

    P, Q: (..., T, T) broadcastable; each row a distribution. Result in [0, 1].
    """
    M = 0.5 * (P + Q)
    kl_pm = torch.special.xlogy(P, P).sum(-1) - torch.special.xlogy(P, M).sum(-1)
    kl_qm = torch.special.xlogy(Q, Q).sum(-1) - torch.special.xlogy(Q, M).sum(-1)
    return ((0.5 * (kl_pm + kl_qm)) / math.log(2)).clamp(min=0).mean(-1)


def head_similarity(A: Tensor) -> Tensor:
    """Pairwise JS divergence between heads: A (N, T, T) for N heads -> (N, N)."""
    N = A.size(0)
    out = torch.empty(N, N, dtype=A.dtype)
    for i in range(N):  # one head against all: (N, T, T) at a time keeps memory small
        out[i] = js_divergence(A[i : i + 1], A).cpu()
    return out


# ---------------------------------------------------------------------------
# Capturing attention


@contextmanager
def evaluating(model: GPT) -> Iterator[GPT]:
    """The model in eval mode (no dropout) for the block, then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def capture_attention(model: GPT, idx: Tensor) -> Tensor:
    """Every head's attention weights for token ids idx (B, T): (B, n_layer, H, T, T)."""
    with evaluating(model):
        _, _, attention = model.forward_with_attention(idx)
    return torch.stack(attention, dim=1).float()  # (B, L, H, T, T)


def repeated_probe(
    tokenizer: Tokenizer, n: int, count: int = REPEATED_PROBES, seed: int = 0
) -> Tensor:
    """`count` seeded random sequences [r1..rn, r1..rn]: (count, 2n) token ids.

    Tokens come from the tokenizer's vocabulary without the document separator
    (`Tokenizer.separator_id`): a separator would tell the model a new, unrelated
    document starts, which is not what the probe asks. Within each half they are
    distinct whenever the vocabulary has n tokens to spare (drawn without
    replacement), because the induction and duplicate-token scores read one place,
    A[i, i-n+1] and A[i, i-n]: with a repeated token a perfect induction head rightly
    splits its attention over every earlier match and would score less than 1. A
    vocabulary smaller than n (a tiny char model) is drawn with replacement.
    """
    vocab = torch.arange(tokenizer.vocab_size)
    separator = tokenizer.separator_id
    if separator is not None and tokenizer.vocab_size > 1:
        vocab = vocab[vocab != separator]
    generator = torch.Generator().manual_seed(seed)
    if len(vocab) >= n:
        picks = torch.stack(
            [torch.randperm(len(vocab), generator=generator)[:n] for _ in range(count)]
        )
    else:
        picks = torch.randint(0, len(vocab), (count, n), generator=generator)
    half = vocab[picks]  # (count, n)
    return torch.cat([half, half], dim=1)  # (count, 2n)


# ---------------------------------------------------------------------------
# Importance


def _loss_per_example(
    model: GPT, x: Tensor, start_layer: int, head_gates: Tensor | None, targets: Tensor
) -> Tensor:
    """Run `model` from layer start_layer on the residual stream x (B, T, n_embd) entering
    it, with head_gates (n_layer, B, H) or None; each example's mean loss (B,)."""
    x, _ = model.run_blocks(x, start_layer, head_gates=head_gates)
    _, loss = model.logits_and_loss(x, targets, reduction="none")  # (B, T)
    return loss.mean(-1)


@torch.no_grad()
def ablation_importance(
    model: GPT, batches: Iterable[tuple[Tensor, Tensor]]
) -> tuple[Tensor, float]:
    """Rise in mean loss when each head alone is zeroed: (n_layer, H), and the base loss.

    Each batch is (x, y), both (B, T). Zeroing a head in layer l leaves layers < l
    untouched, so the residual stream entering layer l is computed once and only
    layers l.. rerun per head, with all of that layer's ablations in one batch:
    the same numbers as `model(x, y, head_gates=...)` without rerunning every layer
    for every head.
    """
    model.eval()
    L, H = model.config.n_layer, model.config.n_head
    every_head_but_one = torch.eye(H, device=model.device).logical_not().float()  # (H, H)
    rise = torch.zeros(L, H, dtype=torch.float64)
    base_total, n_batches = 0.0, 0
    for x_ids, y in polled(batches):
        B = x_ids.size(0)
        x = model.embed(x_ids)  # entering layer 0: (B, T, n_embd)
        base = _loss_per_example(model, x, 0, None, y).mean().item()
        for layer in range(L):
            # H copies of the batch; copy h has head h of this layer zeroed.
            gates = torch.ones(L, H * B, H, device=model.device)
            gates[layer] = every_head_but_one.repeat_interleave(B, 0)  # (H * B, H)
            copies = x.repeat(H, 1, 1)  # (H * B, T, n_embd)
            loss = _loss_per_example(model, copies, layer, gates, y.repeat(H, 1))  # (H * B,)
            rise[layer] += (loss.view(H, B).mean(-1) - base).double().cpu()
            x, _ = model.run_blocks(x, layer, layer + 1)  # now entering layer + 1
        base_total += base
        n_batches += 1
    if n_batches == 0:
        raise MinigptError(
            "no batches to measure head importance on",
            hint="pass at least one (x, y) batch",
            param="batches",
        )
    return (rise / n_batches).float(), base_total / n_batches


def gradient_importance(model: GPT, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Michel et al. (2019): E_x |dL(x)/d gate_h| at gate = 1, (n_layer, H).

    One forward and backward pass per batch for all heads; gates are per example
    (n_layer, B, H) so the absolute value is taken per sequence before averaging.
    """
    model.eval()
    L, H = model.config.n_layer, model.config.n_head
    total, count = torch.zeros(L, H), 0
    for x, y in polled(batches):
        B = x.size(0)
        gates = torch.ones(L, B, H, device=x.device, requires_grad=True)
        _, loss = model(x, y, head_gates=gates)
        (grad,) = torch.autograd.grad(loss, gates)  # d mean-loss / d gate = (1/B) dL_b / d gate
        total += (grad * B).abs().sum(1).cpu()
        count += B
    if count == 0:
        raise MinigptError(
            "no batches to measure head importance on",
            hint="pass at least one (x, y) batch",
            param="batches",
        )
    return total / count


# ---------------------------------------------------------------------------
# The whole inspection


@dataclass
class HeadMetrics:
    """Everything known about one head; None where it was not measured."""

    layer: int
    head: int
    role: str
    previous_token: float
    first_token: float
    entropy: float
    norm_entropy: float
    mean_distance: float
    confidence: float
    induction: float | None = None
    duplicate_token: float | None = None
    importance: float | None = None
    grad_importance: float | None = None
    nearest: tuple[int, int] | None = None
    nearest_js: float | None = None

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass
class Inspection:
    """The result of `inspect_heads`: per-head metrics plus what the pictures need."""

    heads: list[HeadMetrics]
    n_layer: int
    n_head: int
    tokens: list[str]
    """Labels of the first sequence's tokens (what the pictures show)."""
    attention: Tensor
    """The first sequence's attention, (n_layer, H, T, T)."""
    similarity: Tensor
    """JS divergence (bits) between heads, (n_layer * H, n_layer * H), mean over sequences."""
    source: str
    """What was inspected, in words."""
    n_sequences: int
    repeated: int | None = None
    importance_source: str | None = None
    base_loss: float | None = None
    notes: list[str] = field(default_factory=list)
    """Warnings for the user (cropping, importance on the prompt, ...)."""
    thresholds: RoleThresholds = ROLE_THRESHOLDS
    n_kv_head: int | None = None
    """Heads of K and V per layer (None: n_head); fewer means groups share them."""

    def __post_init__(self) -> None:
        groups = self.kv_groups()
        if len(groups) < self.n_head:
            spans = ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}" for g in groups)
            self.notes.append(
                f"grouped-query attention: in every layer heads {spans} share one K and V"
                f" (n_kv_head={len(groups)}); each head keeps its own queries"
            )

    def kv_groups(self) -> list[list[int]]:
        """The heads of each layer that share one K/V head, group by group."""
        group = self.n_head // (self.n_kv_head or self.n_head)
        return [list(range(g, g + group)) for g in range(0, self.n_head, group)]

    def head(self, layer: int, head: int) -> HeadMetrics:
        return self.heads[layer * self.n_head + head]

    def to_dict(self) -> dict:
        """Everything computed, as JSON-able data (attention rows rounded to 4 decimals)."""
        T = self.attention.size(-1)
        rows = [
            [
                [
                    [round(v, 4) for v in self.attention[layer, head, i, : i + 1].tolist()]
                    for i in range(T)
                ]
                for head in range(self.n_head)
            ]
            for layer in range(self.n_layer)
        ]
        return {
            "source": self.source,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "kv_groups": self.kv_groups(),
            "n_sequences": self.n_sequences,
            "repeated": self.repeated,
            "importance_source": self.importance_source,
            "base_loss": self.base_loss,
            "notes": self.notes,
            "thresholds": asdict(self.thresholds),
            "role_rules": self.thresholds.describe(),
            "heads": [
                {
                    k: None if isinstance(v, float) and math.isnan(v) else v
                    for k, v in asdict(h).items()
                }
                for h in self.heads
            ],
            "similarity_js_bits": [[round(v, 5) for v in row] for row in self.similarity.tolist()],
            "tokens": self.tokens,
            "attention_first_sequence": rows,
        }


def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """One printable label per token id (newlines and tabs shown as escapes)."""
    labels = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        labels.append(
            text.encode("unicode_escape").decode("ascii")
            if not text.isprintable() or text == ""
            else text
        )
    return labels


def score_sequences(attention: Tensor, repeated: int | None) -> dict[str, Tensor]:
    """Metrics of one batch of same-length sequences' attention (B, L, H, T, T),
    summed over the batch (divide by the number of sequences for the mean): each (L, H)."""
    scores = {
        "previous_token": previous_token_score(attention),
        "first_token": first_token_score(attention),
        "entropy": entropy(attention),
        "norm_entropy": normalised_entropy(attention),
        "mean_distance": mean_attention_distance(attention),
        "confidence": confidence(attention),
    }
    if repeated is not None:
        scores["induction"] = induction_score(attention, repeated)
        scores["duplicate_token"] = duplicate_token_score(attention, repeated)
    return {k: v.sum(0) for k, v in scores.items()}


def by_length(sequences: Iterable[Tensor]) -> list[list[Tensor]]:
    """Sequences grouped by length, in order of first appearance: each group stacks
    into one batch."""
    groups: dict[int, list[Tensor]] = {}
    for seq in sequences:
        groups.setdefault(seq.numel(), []).append(seq)
    return list(groups.values())


def _capture_and_score(
    model: GPT, sequences: list[Tensor], repeated: int | None
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Every sequence's attention, scored: (the metrics' means over the sequences, each
    (L, H); the mean head similarity (L * H, L * H); the first sequence's attention
    (L, H, T, T))."""
    L, H = model.config.n_layer, model.config.n_head
    sums: dict[str, Tensor] = {}
    similarity = torch.zeros(L * H, L * H)
    first_attention = None
    for group in by_length(sequences):  # the first group holds sequences[0]
        idx = torch.stack(group).to(model.device)  # (B, T)
        attention = capture_attention(model, idx).cpu()  # (B, L, H, T, T)
        if first_attention is None:
            first_attention = attention[0]
        for k, v in score_sequences(attention, repeated).items():
            sums[k] = sums.get(k, 0) + v
        T = attention.size(-1)
        for per_seq in attention:
            similarity += head_similarity(per_seq.reshape(L * H, T, T))
    n = len(sequences)
    return {k: v / n for k, v in sums.items()}, similarity / n, first_attention


def _nearest_heads(
    similarity: Tensor, n_head: int
) -> list[tuple[tuple[int, int], float] | tuple[None, None]]:
    """For each head (in layer * n_head + head order) the other head whose attention is
    closest, as (layer, head), and their JS divergence; (None, None) for a lone head."""
    if similarity.size(0) < 2:
        return [(None, None)] * similarity.size(0)
    others = similarity.clone()
    others.fill_diagonal_(float("inf"))  # a head is not its own nearest
    return [(divmod(int(j), n_head), others[i, j].item()) for i, j in enumerate(others.argmin(1))]


def _head_metrics(
    means: dict[str, Tensor],
    similarity: Tensor,
    importance: Tensor | None,
    grad_importance: Tensor | None,
    thresholds: RoleThresholds,
) -> list[HeadMetrics]:
    """One `HeadMetrics` per head, in (layer, head) order, from (L, H) tensors."""
    L, H = means["previous_token"].shape

    def value(values: Tensor | None, layer: int, head: int) -> float | None:
        return None if values is None else values[layer, head].item()

    nearest = _nearest_heads(similarity, H)
    heads = []
    for layer in range(L):
        for head in range(H):
            scores = {k: v[layer, head].item() for k, v in means.items()}
            closest, closest_js = nearest[layer * H + head]
            heads.append(
                HeadMetrics(
                    layer=layer,
                    head=head,
                    role=assign_role(scores, thresholds),
                    importance=value(importance, layer, head),
                    grad_importance=value(grad_importance, layer, head),
                    nearest=closest,
                    nearest_js=closest_js,
                    **scores,
                )
            )
    return heads


def inspect_heads(
    model: GPT,
    tokenizer: Tokenizer,
    sequences: list[Tensor],
    repeated: int | None = None,
    importance_batches: list[tuple[Tensor, Tensor]] | None = None,
    importance_source: str | None = None,
    source: str = "prompt",
    thresholds: RoleThresholds = ROLE_THRESHOLDS,
) -> Inspection:
    """Score every head of `model` over `sequences` (each a 1-D tensor of token ids).

    repeated: the half-length n when every sequence is a [r, r] probe (enables the
        induction and duplicate-token scores).
    importance_batches: (x, y) batches for ablation and gradient importance; None skips both.
    """
    if not sequences:
        raise MinigptError(
            "nothing to inspect: sequences is empty",
            hint="pass at least one sequence of token ids",
            param="sequences",
        )
    for number, seq in enumerate(sequences):
        if seq.numel() == 0:
            raise MinigptError(
                f"sequence {number} is empty",
                hint="pass sequences of at least one token id",
                param="sequences",
            )
    means, similarity, first_attention = _capture_and_score(model, sequences, repeated)
    importance = grad_importance = base_loss = None
    if importance_batches:
        importance, base_loss = ablation_importance(model, importance_batches)
        grad_importance = gradient_importance(model, importance_batches)
    return Inspection(
        heads=_head_metrics(means, similarity, importance, grad_importance, thresholds),
        n_layer=model.config.n_layer,
        n_head=model.config.n_head,
        n_kv_head=model.config.kv_heads,
        tokens=token_labels(tokenizer, sequences[0].tolist()),
        attention=first_attention,
        similarity=similarity,
        source=source,
        n_sequences=len(sequences),
        repeated=repeated,
        importance_source=importance_source if importance_batches else None,
        base_loss=base_loss,
        thresholds=thresholds,
    )
