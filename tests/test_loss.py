"""The chunked LM-head loss (`train.loss_chunk`): the loss and the gradients of the
plain cross-entropy over all the logits, without ever holding them all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt.loss import lm_head_loss
from minigpt.model import GPT, GPTConfig


def _inputs(n: int = 37, d: int = 16, vocab: int = 50, ignored=(3, 4, 30)):
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(vocab, (n,))
    targets[list(ignored)] = -1
    return x, weight, targets


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 1000])
def test_chunked_loss_and_gradients_equal_the_full_cross_entropy(chunk):
    """Any chunk size, one that does not divide the rows included, and ignored targets."""
    x, weight, targets = _inputs()
    loss = lm_head_loss(x, weight, targets, chunk)
    grad_x, grad_weight = torch.autograd.grad(3.0 * loss, (x, weight))
    reference = F.cross_entropy(x @ weight.T, targets, ignore_index=-1)
    ref_x, ref_weight = torch.autograd.grad(3.0 * reference, (x, weight))
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad_x, ref_x)
    torch.testing.assert_close(grad_weight, ref_weight)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(lm_head_loss(x, weight, targets, chunk), reference)


def test_every_target_ignored_gives_nan_as_cross_entropy_does():
    x, weight, targets = _inputs(n=4, ignored=(0, 1, 2, 3))
    assert torch.isnan(lm_head_loss(x, weight, targets, 2))
    assert torch.isnan(F.cross_entropy(x @ weight.T, targets, ignore_index=-1))


def test_chunked_loss_under_bf16_autocast_stays_close():
    """With autocast the matmuls run in bf16 (as the full loss's do) and the softmax in
    float32: the same loss and gradients to bf16's precision."""
    x, weight, targets = _inputs(n=64, d=32, vocab=300, ignored=(5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_head_loss(x, weight, targets, 24)
        reference = F.cross_entropy((x @ weight.T).float(), targets, ignore_index=-1)
    grads = torch.autograd.grad(loss, (x, weight))
    ref_grads = torch.autograd.grad(reference, (x, weight))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-3, atol=1e-3)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref, rtol=2e-2, atol=2e-3)


def test_the_model_with_loss_chunk_gives_the_same_loss_and_gradients():
    """GPT.forward(loss_chunk=...): the same loss and the same gradient in every weight
    (the tied embedding's two paths included), and no logits."""
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    idx, targets = torch.randint(97, (3, 16)), torch.randint(97, (3, 16))
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    no_logits, chunked = model(idx, targets, loss_chunk=10)
    chunked.backward()
    assert logits.shape == (3, 16, 97) and no_logits is None
    torch.testing.assert_close(chunked, loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], msg=name)


def test_the_compiled_model_with_loss_chunk_is_one_graph():
    """torch.compile traces the chunked loss (its autograd.Function and its loop) into
    the model's one graph: no graph break."""
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32)
    model = GPT(config)
    idx = torch.randint(97, (2, 16))
    explained = torch._dynamo.explain(model)(idx, idx, loss_chunk=8)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
