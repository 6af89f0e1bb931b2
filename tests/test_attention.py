"""The attention module: both forms agree, causality holds, the paths and the gate behave."""

import pytest
import torch

from minigpt.attention import CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper
from minigpt.errors import MinigptError
from minigpt.kv_cache import KVCache

D_IN, D_OUT, CTX, N_HEAD = 24, 32, 16, 4


def make_pair(causal=True, qkv_bias=True, seed=0):
    torch.manual_seed(seed)
    wrapper = MultiHeadAttentionWrapper(D_IN, D_OUT, CTX, N_HEAD, qkv_bias=qkv_bias, causal=causal)
    return wrapper, MultiHeadAttention.from_wrapper(wrapper)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_wrapper_to_fused_matches_outputs_and_gradients(causal, qkv_bias):
    wrapper, fused = make_pair(causal, qkv_bias)
    x = torch.randn(3, 10, D_IN, requires_grad=True)
    out_w, _ = wrapper(x)
    out_f, _ = fused(x)
    torch.testing.assert_close(out_f, out_w, atol=1e-5, rtol=0)

    grad_out = torch.randn_like(out_w)
    (grad_x_w,) = torch.autograd.grad(out_w, x, grad_out, retain_graph=True)
    (grad_x_f,) = torch.autograd.grad(out_f, x, grad_out)
    torch.testing.assert_close(grad_x_f, grad_x_w, atol=1e-5, rtol=0)

    # Parameter gradients agree too, once mapped into the shared (fused) layout.
    out_w.backward(grad_out)
    fused(x)[0].backward(grad_out)
    grads_w = {n: p.grad for n, p in wrapper.named_parameters()}
    for suffix in ["weight", "bias"] if qkv_bias else ["weight"]:
        stacked = torch.cat(
            [
                grads_w[f"heads.{h}.{p}.{suffix}"]
                for p in ("W_query", "W_key", "W_value")
                for h in range(N_HEAD)
            ]
        )
        torch.testing.assert_close(fused.qkv.__getattr__(suffix).grad, stacked, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        fused.out_proj.weight.grad, wrapper.out_proj.weight.grad, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("causal", [True, False])
def test_fused_to_wrapper_round_trip(causal):
    torch.manual_seed(1)
    fused = MultiHeadAttention(D_IN, D_OUT, CTX, N_HEAD, qkv_bias=True, causal=causal)
    wrapper = fused.to_wrapper()
    x = torch.randn(2, CTX, D_IN)
    torch.testing.assert_close(wrapper(x)[0], fused(x)[0], atol=1e-5, rtol=0)
    back = MultiHeadAttention.from_wrapper(wrapper)
    for name, tensor in fused.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_wrapper_heads_hold_the_rows_of_the_fused_projection():
    wrapper, fused = make_pair()
    d_head = D_OUT // N_HEAD
    q_rows = fused.qkv.weight[:D_OUT]
    k_rows = fused.qkv.weight[D_OUT : 2 * D_OUT]
    for h, head in enumerate(wrapper.heads):
        assert torch.equal(head.W_query.weight, q_rows[h * d_head : (h + 1) * d_head])
        assert torch.equal(head.W_key.weight, k_rows[h * d_head : (h + 1) * d_head])


@pytest.mark.parametrize("form", ["wrapper", "fused"])
def test_causality_future_tokens_never_change_the_past(form):
    wrapper, fused = make_pair()
    module = wrapper if form == "wrapper" else fused
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(2, CTX, D_IN, generator=generator)
        t = int(torch.randint(0, CTX - 1, (1,), generator=generator))
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn(2, CTX - t - 1, D_IN, generator=generator)
        out, _ = module(x)
        out_changed, _ = module(changed)
        torch.testing.assert_close(out_changed[:, : t + 1], out[:, : t + 1], atol=0, rtol=0)
        assert not torch.allclose(out_changed[:, t + 1 :], out[:, t + 1 :])


def test_bidirectional_attention_sees_the_future():
    _, fused = make_pair(causal=False)
    x = torch.randn(1, 8, D_IN)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(fused(changed)[0][:, 0], fused(x)[0][:, 0])


@pytest.mark.parametrize("form", ["wrapper", "fused"])
def test_weights_are_zero_above_the_diagonal_and_rows_sum_to_one(form):
    wrapper, fused = make_pair()
    module = wrapper if form == "wrapper" else fused
    _, weights = module(torch.randn(2, 12, D_IN), need_weights=True)
    assert weights.shape == (2, N_HEAD, 12, 12)
    above = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)
    assert torch.all(weights[..., above] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, N_HEAD, 12))


def test_single_head_returns_its_weights_and_uses_the_triu_mask():
    head = CausalAttention(D_IN, 8, CTX)
    assert torch.equal(head.mask, torch.triu(torch.ones(CTX, CTX, dtype=torch.bool), diagonal=1))
    context, weights = head(torch.randn(2, 5, D_IN), need_weights=True)
    assert context.shape == (2, 5, 8) and weights.shape == (2, 5, 5)
    assert torch.all(weights[:, 0, 1:] == 0) and torch.allclose(weights[:, 0, 0], torch.ones(2))


@pytest.mark.parametrize("causal", [True, False])
def test_explicit_path_equals_sdpa_path(causal):
    _, fused = make_pair(causal=causal)
    x = torch.randn(3, CTX, D_IN)
    sdpa, none = fused(x)
    explicit, weights = fused(x, need_weights=True)
    assert none is None and weights is not None
    torch.testing.assert_close(explicit, sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", ["wrapper", "fused"])
def test_gate_of_ones_changes_nothing(form):
    wrapper, fused = make_pair()
    module = wrapper if form == "wrapper" else fused
    x = torch.randn(2, 9, D_IN)
    torch.testing.assert_close(module(x, gate=torch.ones(N_HEAD))[0], module(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("form", ["wrapper", "fused"])
def test_zeroing_one_head_removes_exactly_its_contribution(form):
    wrapper, fused = make_pair(qkv_bias=True)
    module = wrapper if form == "wrapper" else fused
    x = torch.randn(2, 9, D_IN)
    d_head = D_OUT // N_HEAD
    # Head h's contribution is its context times its d_head columns of W^O.
    contexts = torch.stack([wrapper.heads[h](x) for h in range(N_HEAD)], dim=1)  # (B, H, T, d_head)
    w_o = wrapper.out_proj.weight  # (d_out, H * d_head)
    for h in range(N_HEAD):
        gate = torch.ones(N_HEAD)
        gate[h] = 0
        contribution = contexts[:, h] @ w_o[:, h * d_head : (h + 1) * d_head].T
        torch.testing.assert_close(
            module(x, gate=gate)[0], module(x)[0] - contribution, atol=1e-5, rtol=0
        )


def test_per_example_gate_broadcasts_over_batch():
    _, fused = make_pair()
    x = torch.randn(2, 6, D_IN)
    gate = torch.ones(2, N_HEAD)
    gate[1] = 0  # second example: every head off
    out, _ = fused(x, gate=gate)
    torch.testing.assert_close(out[0], fused(x[:1])[0][0])
    torch.testing.assert_close(out[1], fused.out_proj.bias.expand(6, D_OUT))


def test_bad_input_raises_clear_value_errors():
    wrapper, fused = make_pair()
    for module in (wrapper, fused):
        with pytest.raises(ValueError, match="longer than the context length"):
            module(torch.randn(1, CTX + 1, D_IN))
        with pytest.raises(ValueError, match=r"shape \(batch, tokens, 24\)"):
            module(torch.randn(1, 4, D_IN + 1))
        with pytest.raises(ValueError, match="does not broadcast"):
            module(torch.randn(2, 4, D_IN), gate=torch.ones(N_HEAD + 1))
    with pytest.raises(MinigptError, match="not divisible"):
        MultiHeadAttention(D_IN, 30, CTX, 4)


@pytest.mark.parametrize("form", ["wrapper", "fused"])
def test_a_module_called_on_its_own_checks_its_kv_cache(form):
    wrapper, fused = make_pair()
    module = wrapper if form == "wrapper" else fused
    x = torch.randn(2, 6, D_IN)
    cache = KVCache(1, 2, N_HEAD, CTX, D_OUT // N_HEAD)
    out, _ = module(x[:, :4], kv_cache=cache)
    cache.advance(4)
    step, _ = module(x[:, 4:], kv_cache=cache)
    cache.advance(2)
    torch.testing.assert_close(torch.cat([out, step], dim=1), module(x)[0], atol=1e-5, rtol=0)
    with pytest.raises(MinigptError, match="KV cache holds"):
        module(torch.randn(3, 1, D_IN), kv_cache=cache)
    with pytest.raises(MinigptError, match="longer than the context length"):
        module(torch.randn(2, CTX - 5, D_IN), kv_cache=cache)
