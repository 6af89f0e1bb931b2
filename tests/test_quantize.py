"""Int8 weights (torchao, weight-only): logits close to float32's, the tied embedding
read from the head's int8 rows, a quarter of the bytes, the compiled step's greedy
tokens, and one sentence for every combination that cannot work."""

import sys

import pytest
import torch

from minigpt.errors import MinigptError
from minigpt.fast_decode import StaticDecoder
from minigpt.generate import generate
from minigpt.inference import decide_static
from minigpt.model import GPT, GPTConfig
from minigpt.quantize import (
    Int8Embedding,
    check_quantize,
    is_int8,
    quantize_int8,
    weight_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def tolerance(logits: torch.Tensor) -> float:
    """How far int8 logits may be from float32's, relative to the logits' scale.

    An int8 model rounds each linear layer's input to bfloat16 (8 significant bits) and
    its weights to one of 255 steps of their row's largest value; each of a few dozen
    matmuls a layer adds such a relative error. A real mistake (a wrong scale, another
    token's row) moves logits by about their own size, far past this bound.
    """
    return 0.03 * float(logits.abs().max())


def with_random_biases(model: GPT) -> GPT:
    """The model with every bias and norm gain moved off its init (zero, one), so the
    int8 model's biases and gains (kept in float32) are part of what is compared."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_logits_are_close_to_float32_s(tiny_gpt, position, bias):
    model = with_random_biases(tiny_gpt(64, position=position, bias=bias))
    ids = torch.randint(64, (2, 12))
    with torch.inference_mode():
        expected, _ = model(ids)  # (2, 12, 64) float32
    quantize_int8(model)
    with torch.inference_mode():
        logits, _ = model(ids)
    assert logits.dtype == torch.float32  # float32 around the int8 weights
    torch.testing.assert_close(logits.float(), expected, atol=tolerance(expected), rtol=0)


def test_the_token_embedding_reads_the_head_s_int8_rows(tiny_gpt):
    model = tiny_gpt(64)
    float_rows = model.tok_emb.weight.detach().clone()  # (64, 32) float32
    quantize_int8(model)
    assert model.lm_head.weight is model.tok_emb.weight  # quantized once, with the head
    assert isinstance(model.tok_emb, Int8Embedding)
    head = model.lm_head.weight
    ids = torch.randint(64, (2, 7))
    rows = model.tok_emb(ids)  # (2, 7, 32)
    # each row is its int8 values times its scale, in float32, as the head reads them
    dequantized = head.qdata.float() * head.scale.float().reshape(-1, 1)
    assert rows.dtype == torch.float32
    assert torch.equal(rows, dequantized[ids])
    # and those rows stand for the trained ones: each weight within half a step of its
    # row's scale (plus float32's rounding of the product)
    error = (rows.float() - float_rows[ids]).abs()
    bound = 0.5 * head.scale.float()[ids] + float_rows[ids].abs() / 2**7
    assert (error <= bound).all()


def test_weight_bytes_counts_int8_data_scales_and_the_rest_in_float32(tiny_gpt):
    # 1 layer, n_embd 32, vocab 64, block 16, biases: bytes counted by hand
    model = tiny_gpt(64, n_layer=1, bias=True)
    linear_rows = {"lm_head": 64, "qkv": 96, "out_proj": 32, "fc": 128, "proj": 32}
    linear_weights = 64 * 32 + 96 * 32 + 32 * 32 + 128 * 32 + 32 * 128  # head tied to tok_emb
    others = 16 * 32 + 3 * 2 * 32 + (96 + 32 + 128 + 32)  # positions, 3 norms, 4 biases
    assert weight_bytes(model) == 4 * (linear_weights + others)  # float32, the tie counted once
    quantize_int8(model)
    rows = sum(linear_rows.values())
    # per row: a float32 scale and an int8 zero point (torchao's layout, zero here)
    assert weight_bytes(model) == linear_weights + rows * (4 + 1) + 4 * others


def test_int8_weights_are_about_a_quarter_of_float32_s_for_gpt2_s_proportions():
    # GPT-2 small's shape, narrowed: most bytes in the blocks' matrices and the tied
    # embedding, few in positions, norms and biases
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=4, n_embd=256, bias=True)
    model = GPT(config).eval()
    before = weight_bytes(model)
    quantize_int8(model)
    assert 0.25 <= weight_bytes(model) / before < 0.27


def successor_model() -> tuple[GPT, torch.Tensor]:
    """A small GPT trained, for a few seconds, to follow a fixed permutation of its
    vocabulary (token t is followed by succ[t]): its greedy tokens follow the
    permutation's cycles, each chosen by a clear margin, as a trained model's mostly are."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=True)
    model = GPT(config)
    succ = torch.randperm(50)  # (50,)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        walks = [torch.randint(50, (8,))]
        for _ in range(32):
            walks.append(succ[walks[-1]])
        x = torch.stack(walks, dim=1)  # (8, 33)
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), succ


def test_the_compiled_int8_step_gives_eager_int8_s_logits_and_greedy_tokens():
    # Compiled, inductor multiplies bfloat16 activations by the int8 weights and scales
    # the sums; eager torchao dequantizes each weight to bfloat16 and multiplies. Both
    # round in bfloat16, at different places: the two steps' logits agree up to that
    # rounding, so their greedy tokens agree wherever the best logit is ahead by more
    # than it (a near tie may go either way, as it may between any two machines).
    model, succ = successor_model()
    prompt = [7, 3, 41, 12]
    expected = [succ[prompt[-1]].item()]
    while len(expected) < 40:
        expected.append(succ[expected[-1]].item())
    quantize_int8(model)
    # 40 tokens past a block of 32: the window is cropped and prefilled again
    compiled = torch.cat(list(generate(model, prompt, 40, temperature=0, static_decode=True)))
    eager = torch.cat(list(generate(model, prompt, 40, temperature=0)))
    assert compiled.tolist() == eager.tolist() == expected

    # step by step, from the same tokens: the compiled step's logits against eager's
    ids = torch.tensor([prompt + expected[:20]])  # (1, 24)
    kv_cache = model.new_kv_cache(1)
    with torch.inference_mode():
        eager_logits, _ = model(ids)  # (1, 24, 50), no cache
        model(ids[:, :4], kv_cache=kv_cache)
        decoder = StaticDecoder(model, kv_cache, mode="compiled")  # generate's compiled step
        steps = [decoder(ids[:, t : t + 1]).clone() for t in range(4, 24)]  # 20 x (1, 50)
    compiled_logits = torch.stack(steps, dim=1).float()  # (1, 20, 50)
    reference = eager_logits[:, 4:].float()
    torch.testing.assert_close(compiled_logits, reference, atol=tolerance(reference), rtol=0)


# --------------------------------------------------------------------------- refusals


def test_int8_is_refused_on_a_device_other_than_a_cpu():
    with pytest.raises(MinigptError, match="for sampling on a CPU; the device is meta") as err:
        check_quantize("int8", torch.device("meta"))
    assert "--device cpu" in err.value.hint
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(MinigptError, match="the model is on meta") as err:
        quantize_int8(model)
    assert "CPU first" in err.value.hint


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_int8_is_refused_with_a_dtype(dtype):
    with pytest.raises(MinigptError, match=f"--quantize int8 and --dtype {dtype} both set") as err:
        check_quantize("int8", CPU, dtype)
    assert "leave out --dtype" in err.value.hint


def test_int8_is_refused_without_the_compiled_step():
    with pytest.raises(MinigptError, match="samples through the compiled decode step") as err:
        decide_static(False, "int8")
    assert "--no-compile" in err.value.hint
    assert decide_static(None, "int8") and not decide_static(None, None)


def test_an_unknown_quantization_is_refused():
    with pytest.raises(MinigptError, match="unknown quantization 'int4'") as err:
        check_quantize("int4", CPU)
    assert "int8" in err.value.hint
    check_quantize(None, torch.device("meta"), "bfloat16")  # no quantization: nothing to check


def test_a_model_is_quantized_once(tiny_gpt):
    model = quantize_int8(tiny_gpt(50))
    with pytest.raises(MinigptError, match="int8 already") as err:
        quantize_int8(model)
    assert err.value.hint


def test_int8_without_torchao_says_how_to_install_it(monkeypatch, tiny_gpt):
    # None in sys.modules makes `import torchao...` fail, as where it is not installed
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(MinigptError, match="needs torchao, which is not installed") as err:
        check_quantize("int8", CPU)
    assert "pip install 'minigpt[int8]'" in err.value.hint
    model = tiny_gpt(50)
    with pytest.raises(MinigptError, match="needs torchao"):
        quantize_int8(model)
    assert not is_int8(model)  # refused before any weight changed
