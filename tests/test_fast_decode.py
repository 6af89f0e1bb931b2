"""The static-shape decode step: the eager step's tokens, in shapes and memory that
never change (what a CUDA graph needs), here compiled by inductor on the CPU."""

import functools

import pytest
import torch

from minigpt import fast_decode
from minigpt.errors import MinigptError
from minigpt.fast_decode import StaticDecoder, StaticKVCache
from minigpt.generate import generate
from minigpt.kv_cache import KVCache
from minigpt.model import GPT, GPTConfig
from minigpt.sampling import Sampling


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


@functools.cache
def shared_gpt(attention: str) -> GPT:
    """One model per attention form for the parametrised test below: its compiled steps
    (one per batch) serve every stride, as they serve every generation."""
    return small_gpt(attention=attention)


@pytest.mark.parametrize("attention", ["fused", "wrapper"])
@pytest.mark.parametrize("stride", [None, 0, 15])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_the_static_decode_step_gives_the_tokens_of_the_eager_one(attention, stride, num_samples):
    model = shared_gpt(attention)
    prompt = torch.randint(50, (5,)).tolist()
    settings = dict(num_samples=num_samples, temperature=0, stride=stride)
    eager = torch.stack(list(generate(model, prompt, 60, **settings)), dim=1)
    static = torch.stack(list(generate(model, prompt, 60, static_decode=True, **settings)), 1)
    assert torch.equal(eager, static)  # 60 tokens past a block of 16: crops and re-prefills


def two_prefilled_caches(model: GPT) -> tuple[KVCache, KVCache]:
    """Two caches of batch 2 holding the same 5 random positions."""
    prefix = torch.randint(50, (2, 5))
    caches = model.new_kv_cache(2), model.new_kv_cache(2)
    with torch.inference_mode():
        for cache in caches:
            model(prefix, kv_cache=cache)
    return caches


def test_the_static_decode_step_keeps_its_shapes_and_its_position_on_the_device():
    model = small_gpt()
    steps = torch.randint(50, (3, 2, 1))
    eager_cache, static_cache = two_prefilled_caches(model)
    with torch.inference_mode():
        static = StaticKVCache(static_cache)
        buffers = [k.data_ptr() for k in static_cache.keys]
        for ids in steps:
            eager, _ = model(ids, kv_cache=eager_cache, last_only=True)  # (2, 1, 50)
            logits, _ = model(ids, kv_cache=static, last_only=True)  # (2, 1, 50)
            torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)
            assert static.attn_mask(1).shape == (1, 16)  # every slot, every step
    assert static.position.item() == 8 and static_cache.pos == 5  # pos: the caller's
    assert [k.data_ptr() for k in static_cache.keys] == buffers  # written in place, never moved


def test_the_static_decode_step_is_refused_without_a_kv_cache():
    with pytest.raises(MinigptError, match="writes into the KV cache, which is turned off"):
        Sampling(static_decode=True, use_kv_cache=False)


def test_the_decoder_s_warm_up_leaves_the_cache_as_it_was():
    # On CUDA the step is warmed up before its capture, in the middle of a generation:
    # what the warm-up writes must never reach a token (run here on the CPU).
    model = small_gpt()
    steps = torch.randint(50, (4, 2, 1))
    eager_cache, static_cache = two_prefilled_caches(model)
    with torch.inference_mode():
        decoder = StaticDecoder(model, static_cache)
        for ids in steps:
            decoder.ids.copy_(torch.randint(50, (2, 1)))  # what a warm-up may be fed
            decoder.warm_up()
            eager, _ = model(ids, kv_cache=eager_cache, last_only=True)
            torch.testing.assert_close(decoder(ids), eager[:, -1], atol=1e-5, rtol=1e-5)
    assert static_cache.pos == eager_cache.pos == 9
    assert decoder.static_cache.position.item() == 9


def test_seeded_draws_through_the_compiled_step_are_the_eager_ones():
    model = small_gpt()
    prompt = torch.randint(50, (5,)).tolist()
    settings = dict(num_samples=2, temperature=0.9, top_k=20, seed=7)
    eager = torch.stack(list(generate(model, prompt, 40, **settings)), dim=1)
    compiled = torch.stack(list(generate(model, prompt, 40, static_decode=True, **settings)), 1)
    assert torch.equal(eager, compiled)


def test_the_step_is_compiled_once_per_model_and_batch_whatever_the_position():
    from torch._dynamo.utils import counters

    model = small_gpt()
    prompt = torch.randint(50, (5,)).tolist()
    counters.clear()
    for _ in range(2):  # 40 tokens past a block of 16: every position, crops, re-prefills
        list(generate(model, prompt, 40, temperature=0, static_decode=True))
    assert counters["stats"]["unique_graphs"] == 1
    list(generate(model, prompt, 10, num_samples=2, temperature=0, static_decode=True))
    assert counters["stats"]["unique_graphs"] == 2  # another batch, another shape
    assert len(fast_decode._compiled_steps[model]) == 2


def test_a_short_generation_gets_a_short_static_cache_and_the_same_tokens():
    assert [fast_decode.static_cache_length(64, n) for n in (1, 16, 17, 40, 64, 500)] == [
        16, 16, 32, 64, 64, 64,
    ]  # fmt: skip
    model = small_gpt(block_size=64, position="rope")
    prompt = torch.randint(50, (5,)).tolist()
    for n in (10, 25, 100):  # caches of 16, 32 and 64 slots, the last one rolling
        eager = torch.stack(list(generate(model, prompt, n, temperature=0)), dim=1)
        static = torch.stack(list(generate(model, prompt, n, temperature=0, static_decode=True)), 1)
        assert torch.equal(eager, static)
    assert {key[2] for key in fast_decode._compiled_steps[model]} == {16, 32, 64}
