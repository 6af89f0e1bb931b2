"""The LM head's cross-entropy, a chunk of positions at a time (`train.loss_chunk`).

The plain loss makes all the logits at once: (B*T, vocab_size) floats, 1.6 GB for
8 x 1024 positions of GPT-2's 50,304-token vocabulary, and its backward pass holds
two more tensors of that size (the log-softmax and its gradient). With a large
vocabulary that is most of a small model's training memory.

Here the logits of `chunk` positions are made, turned into their loss and into
d loss / d logits = softmax - one_hot(target), and multiplied straight into the
gradients of the LM head's input and weight; then the next chunk reuses the memory.
The gradients are computed in the forward pass and kept until backward scales them:
at most one chunk of logits is alive at a time. Same loss and gradients as
`F.cross_entropy` over the full logits, up to float rounding (tests hold it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def lm_head_loss(x: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """Mean cross-entropy of the logits x @ weight.T against targets, `chunk` rows at a time.

    x: the final norm's output (N, n_embd); weight: the LM head (vocab_size, n_embd);
    targets: (N,) next-token ids, -1 where ignored. Returns a 0-d float32 loss (NaN
    when every target is ignored, as `F.cross_entropy`).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLoss.apply(x, weight, targets, chunk)
    loss_sum, _, _ = _chunks(x, weight, targets, chunk, grads=False)  # evaluation
    return loss_sum / (targets != -1).sum()


class _ChunkedLoss(torch.autograd.Function):
    """Forward: the loss, and the gradients of x and weight for a loss gradient of 1.
    Backward: those gradients times the incoming one."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        count = (targets != -1).sum()  # the mean is over the targets not ignored
        loss_sum, grad_x, grad_weight = _chunks(x, weight, targets, chunk, grads=True)
        ctx.save_for_backward(grad_x, grad_weight, count)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_x, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_x * scale, grad_weight * scale, None, None


def _chunks(
    x: Tensor, weight: Tensor, targets: Tensor, chunk: int, grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(sum of the losses, d sum / d x, d sum / d weight), chunk rows of logits at a time."""
    loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if grads else None  # (N, n_embd)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None  # (V, n_embd)
    for start in range(0, x.size(0), chunk):
        rows = slice(start, start + chunk)
        x_rows, wanted = x[rows], targets[rows]  # (n, n_embd), (n,)
        kept = wanted != -1
        safe = wanted.clamp(min=0)  # an ignored row gathers id 0, then counts for nothing
        logits = (x_rows @ weight.T).float()  # (n, V): the softmax in float32, as the full loss
        log_norm = torch.logsumexp(logits, dim=-1)  # (n,)
        target_logit = logits.gather(1, safe[:, None]).squeeze(1)  # (n,)
        loss_sum += ((log_norm - target_logit) * kept).sum()
        if not grads:
            continue
        # d loss / d logits = softmax - one_hot(target), written over the logits
        grad_logits = logits.sub_(log_norm[:, None]).exp_()  # (n, V): softmax
        grad_logits[torch.arange(len(safe), device=safe.device), safe] -= 1
        grad_logits.mul_(kept[:, None])
        grad_logits = grad_logits.to(weight.dtype)  # (autocast picks the matmuls' own dtype)
        grad_x[rows] = grad_logits @ weight  # (n, n_embd)
        grad_weight += (grad_logits.T @ x_rows).float()  # (V, n_embd)
    if grads:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, grad_x, grad_weight
