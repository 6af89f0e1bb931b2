"""The GPT model: config validation, causality, the KV cache, both attention forms, learning."""

import math

import pytest
import torch

from minigpt.errors import MinigptError
from minigpt.kv_cache import KVCache
from minigpt.model import GPT, GPTConfig

TINY = dict(vocab_size=13, block_size=24, n_head=4)  # with tiny_gpt's 2 layers of width 32


def test_config_rejects_impossible_shapes():
    with pytest.raises(MinigptError, match="not divisible by model.n_head"):
        GPTConfig(n_embd=100, n_head=6)
    with pytest.raises(MinigptError, match="positive integer"):
        GPTConfig(n_layer=0)
    with pytest.raises(MinigptError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(MinigptError, match="attention"):
        GPTConfig(attention="flash")
    with pytest.raises(MinigptError, match="unknown model config keys: n_heads"):
        GPTConfig.from_dict({"n_heads": 4})


def test_forward_shapes_loss_and_tied_head(tiny_gpt):
    model = tiny_gpt(**TINY)
    idx = torch.randint(0, 13, (3, 10))
    logits, loss = model(idx, targets=torch.randint(0, 13, (3, 10)))
    assert logits.shape == (3, 10, 13) and loss.ndim == 0
    assert model.lm_head.weight is model.tok_emb.weight
    # At init the prediction is near uniform: loss close to ln(vocab).
    assert abs(loss.item() - math.log(13)) < 0.3
    last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last, logits[:, -1:])


def test_num_params_counts_tied_weights_once(tiny_gpt):
    model = tiny_gpt(**TINY)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params(non_embedding=False) == sum(unique.values())
    assert model.num_params() == sum(unique.values()) - 24 * 32


def test_gpt2_init_scales_residual_projections(tiny_gpt):
    model = tiny_gpt(50, block_size=64, n_layer=8, n_head=4, n_embd=256)
    fc_std = model.blocks[0].mlp.fc.weight.std().item()
    proj_std = model.blocks[0].mlp.proj.weight.std().item()
    assert abs(fc_std - 0.02) < 0.002
    assert abs(proj_std - 0.02 / math.sqrt(16)) < 0.001


@pytest.mark.parametrize("attention", ["fused", "wrapper"])
def test_model_causality_property(tiny_gpt, attention):
    model = tiny_gpt(**TINY, attention=attention)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        idx = torch.randint(0, 13, (2, 24), generator=generator)
        t = int(torch.randint(0, 23, (1,), generator=generator))
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 13, (2, 23 - t), generator=generator)
        torch.testing.assert_close(
            model(changed)[0][:, : t + 1], model(idx)[0][:, : t + 1], atol=0, rtol=0
        )


@pytest.mark.parametrize("attention", ["fused", "wrapper"])
@pytest.mark.parametrize("prefill", [1, 5, 24])
def test_kv_cache_prefill_then_one_token_at_a_time_equals_full_forward(
    tiny_gpt, attention, prefill
):
    model = tiny_gpt(**TINY, attention=attention)
    idx = torch.randint(0, 13, (2, 24))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    pieces = [model(idx[:, :prefill], kv_cache=cache)[0]]
    for t in range(prefill, 24):
        pieces.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["fused", "wrapper"])
def test_chunked_prefill_on_an_existing_cache(tiny_gpt, attention):
    model = tiny_gpt(**TINY, attention=attention)
    idx = torch.randint(0, 13, (3, 24))
    full, _ = model(idx)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        cache = model.new_kv_cache(batch_size=3)
        pieces, start = [], 0
        while start < 24:
            size = int(torch.randint(1, 9, (1,), generator=generator))
            pieces.append(model(idx[:, start : start + size], kv_cache=cache)[0])
            start += size
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_last_only_decoding_matches(tiny_gpt):
    model = tiny_gpt(**TINY)
    idx = torch.randint(0, 13, (1, 12))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=1)
    model(idx[:, :6], kv_cache=cache, last_only=True)
    for t in range(6, 12):
        step, _ = model(idx[:, t : t + 1], kv_cache=cache, last_only=True)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_kv_cache_is_preallocated_in_the_activation_dtype(tiny_gpt):
    model = tiny_gpt(**TINY)
    cache = model.new_kv_cache(batch_size=2, dtype=torch.bfloat16)
    assert len(cache.keys) == 2 and cache.keys[0].shape == (2, 4, 24, 8)
    assert cache.keys[0].dtype == torch.bfloat16
    storage = cache.keys[0].data_ptr()
    model.to(torch.bfloat16)(torch.randint(0, 13, (2, 5)), kv_cache=cache)
    assert cache.keys[0].data_ptr() == storage and cache.pos == 5


def test_full_cache_and_overlong_input_raise(tiny_gpt):
    model = tiny_gpt(**TINY)
    with pytest.raises(ValueError, match="exceed the model's block_size=24"):
        model(torch.randint(0, 13, (1, 25)))
    cache = model.new_kv_cache(batch_size=1)
    model(torch.randint(0, 13, (1, 24)), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 13, (1, 1)), kv_cache=cache)
    small = KVCache(2, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.randint(0, 13, (1, 5)), kv_cache=small)
    with pytest.raises(ValueError, match="KV cache holds"):
        model(torch.randint(0, 13, (2, 3)), kv_cache=model.new_kv_cache(batch_size=1))
    with pytest.raises(ValueError, match=r"shape \(batch, tokens\)"):
        model(torch.randint(0, 13, (5,)))
    cache.reset()
    assert cache.pos == 0 and cache.remaining == 24


def test_wrapper_and_fused_models_share_one_checkpoint_layout(tiny_gpt):
    fused = tiny_gpt(**TINY, seed=1)
    wrapper = tiny_gpt(**TINY, seed=2, attention="wrapper")
    assert set(wrapper.state_dict()) == set(fused.state_dict())
    wrapper.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 13, (2, 16))
    torch.testing.assert_close(wrapper(idx)[0], fused(idx)[0], atol=1e-5, rtol=0)
    fused_again = tiny_gpt(**TINY, seed=3)
    fused_again.load_state_dict(wrapper.state_dict())
    torch.testing.assert_close(fused_again(idx)[0], fused(idx)[0], atol=1e-5, rtol=0)


def test_head_gates_and_attention_capture(tiny_gpt):
    model = tiny_gpt(**TINY)
    idx = torch.randint(0, 13, (2, 10))
    logits, _ = model(idx)
    gated, _ = model(idx, head_gates=torch.ones(2, 4))
    torch.testing.assert_close(gated, logits, atol=0, rtol=0)
    gates = torch.ones(2, 4)
    gates[1, 2] = 0
    assert not torch.allclose(model(idx, head_gates=gates)[0], logits)
    logits_w, _, attention = model.forward_with_attention(idx)
    torch.testing.assert_close(logits_w, logits, atol=1e-5, rtol=0)
    assert len(attention) == 2 and attention[0].shape == (2, 4, 10, 10)
    with pytest.raises(ValueError, match="head_gates has 3 layers"):
        model(idx, head_gates=torch.ones(3, 4))


@pytest.mark.parametrize("attention", ["fused", "wrapper"])
def test_tiny_gpt_overfits_a_short_sequence(tiny_gpt, attention):
    model = tiny_gpt(**TINY, attention=attention).train()
    sequence = torch.randint(0, 13, (1, 25))
    x, y = sequence[:, :-1], sequence[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, targets=y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1


def test_forward_in_steps_equals_forward(tiny_gpt):
    model = tiny_gpt(**TINY)
    idx, y = torch.randint(0, 13, (3, 10)), torch.randint(0, 13, (3, 10))
    logits, loss = model(idx, targets=y)
    x = model.embed(idx)
    for layer in range(2):
        x, _ = model.run_blocks(x, layer, layer + 1)
    stepped, per_token = model.logits_and_loss(x, y, reduction="none")
    torch.testing.assert_close(stepped, logits, atol=0, rtol=0)
    assert per_token.shape == (3, 10)
    torch.testing.assert_close(per_token.mean(), loss)
    # From layer 1's residual stream with per-example gates, as the head inspector runs it.
    gates = torch.ones(2, 3, 4)
    gates[1, 0, 2] = 0
    _, gated = model(idx, targets=y, head_gates=gates)
    entering_1, _ = model.run_blocks(model.embed(idx), 0, 1)
    x, _ = model.run_blocks(entering_1, 1, head_gates=gates)
    torch.testing.assert_close(model.logits_and_loss(x, y)[1], gated)
    assert not torch.allclose(gated, loss)


def test_kv_cache_is_checked_before_any_layer_writes_to_it(tiny_gpt):
    model = tiny_gpt(**TINY)
    idx = torch.randint(0, 13, (1, 3))
    with pytest.raises(MinigptError, match="KV cache has 1 layers, 2 are needed"):
        model(idx, kv_cache=KVCache(1, 1, 4, 24, 8))
    with pytest.raises(MinigptError, match="KV cache holds"):
        model(idx, kv_cache=KVCache(2, 1, 2, 24, 16))
    cache = model.new_kv_cache(batch_size=1)
    with pytest.raises(MinigptError, match="head_gates has 3 layers"):
        model(idx, kv_cache=cache, head_gates=torch.ones(3, 4))
    assert cache.pos == 0 and not any(keys.any() for keys in cache.keys)


@pytest.mark.parametrize("attention", ["fused", "wrapper"])
def test_a_model_built_for_weights_computes_what_the_original_does(attention):
    # load_run builds on the meta device and loads over uninitialised memory: the
    # masks (never saved) and the tied head must come out as a normal build's
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32,
                       attention=attention, bias=True)  # fmt: skip
    torch.manual_seed(0)
    original = GPT(config).eval()
    loaded = GPT.for_weights(config)
    loaded.load_state_dict(original.state_dict())
    loaded.eval()
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], original(idx)[0])
        assert torch.equal(
            loaded.forward_with_attention(idx)[2][1], original.forward_with_attention(idx)[2][1]
        )
