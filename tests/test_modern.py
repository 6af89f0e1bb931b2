"""Modern blocks as options: rotary positions, RMSNorm, SwiGLU, grouped-query
attention, QK-norm, ReLU², and the rolling KV cache that rotary positions allow."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from minigpt import train as trainer
from minigpt.attention import MultiHeadAttention, MultiHeadAttentionWrapper
from minigpt.checkpoint import load_run
from minigpt.config import load_config, resume_config
from minigpt.errors import MinigptError
from minigpt.generate import cache_bytes, generate
from minigpt.hf import hf_config_from_gpt
from minigpt.layers import apply_rope, rope_angles
from minigpt.model import GPT, GPTConfig

# Each option alone on top of GPT-2's block, then all of them at once.
OPTIONS = {
    "rope": {"position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "gqa": {"n_kv_head": 2},
    "qk_norm": {"qk_norm": True},
    "relu2": {"activation": "relu2"},
    "all": {
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "n_kv_head": 2,
        "qk_norm": True,
    },
}


def model_with(options: dict, attention: str = "fused", seed: int = 0, **shape) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True)
    return GPT(GPTConfig(**{**config, **shape, **options, "attention": attention})).eval()


def wrapper_of(model: GPT) -> GPT:
    """The same weights in the per-head (textbook) form."""
    other = GPT(replace(model.config, attention="wrapper")).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("name", OPTIONS)
def test_num_params_counts_what_the_model_holds(name):
    model = model_with(OPTIONS[name])
    assert model.config.num_params() == model.num_params(non_embedding=False)
    assert wrapper_of(model).num_params(non_embedding=False) == model.config.num_params()


def test_swiglu_keeps_the_mlp_about_as_large():
    config = GPTConfig(vocab_size=65, n_embd=384, n_head=6, n_layer=6)
    swiglu = replace(config, mlp="swiglu")
    assert swiglu.mlp_hidden == 1024  # 8/3 x 384 = 1024, a multiple of 64 already
    assert replace(config, n_embd=128, n_head=4, mlp="swiglu").mlp_hidden == 384  # 341.3 -> 384
    ratio = swiglu.num_params() / config.num_params()
    assert 0.99 < ratio < 1.01


@pytest.mark.parametrize("name", OPTIONS)
def test_the_per_head_and_fused_forms_agree_in_outputs_and_gradients(name):
    fused = model_with(OPTIONS[name])
    wrapper = wrapper_of(fused)
    x = torch.randint(50, (3, 16))
    y = torch.randint(50, (3, 16))
    logits_f, loss_f = fused(x, y)
    logits_w, loss_w = wrapper(x, y)
    torch.testing.assert_close(logits_w, logits_f, atol=1e-5, rtol=1e-5)
    loss_f.backward()
    loss_w.backward()
    # the wrapper's gradients, gathered into the fused layout by its state-dict hook
    grads_w = {n: p.grad for n, p in wrapper.named_parameters()}
    wrapper_grads = wrapper.state_dict(keep_vars=True)
    for name_f, param in fused.named_parameters():
        if name_f.endswith("qkv.weight") or name_f.endswith("qkv.bias"):
            expected = _fused_grad(wrapper, name_f)
        else:
            expected = grads_w[name_f] if name_f in grads_w else wrapper_grads[name_f].grad
        torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-4, msg=name_f)


def _fused_grad(wrapper: GPT, name: str) -> torch.Tensor:
    """The gradient of a fused qkv parameter, from the wrapper heads' gradients."""
    layer = int(name.split(".")[1])
    suffix = name.rsplit(".", 1)[1]
    attention = wrapper.blocks[layer].attn
    leaders = range(0, attention.n_head, attention.group)
    rows = [attention.heads[h].W_query for h in range(attention.n_head)]
    rows += [attention.heads[h].W_key for h in leaders]
    rows += [attention.heads[h].W_value for h in leaders]
    return torch.cat([getattr(linear, suffix).grad for linear in rows])


def test_grouped_heads_share_their_key_and_value_modules():
    attention = MultiHeadAttentionWrapper(32, 32, 16, 4, n_kv_head=2)
    heads = attention.heads
    assert heads[1].W_key is heads[0].W_key and heads[1].W_value is heads[0].W_value
    assert heads[2].W_key is not heads[0].W_key and heads[3].W_key is heads[2].W_key
    assert heads[1].W_query is not heads[0].W_query
    fused = MultiHeadAttention.from_wrapper(attention)
    assert fused.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # 4 query heads, 2 K and 2 V heads
    back = fused.to_wrapper()
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(back(x)[0], attention(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("attention", ["fused", "wrapper"])
def test_the_kv_cache_gives_the_full_forward_s_logits(name, attention):
    model = model_with(OPTIONS[name], attention)
    idx = torch.randint(50, (2, 16))
    full, _ = model(idx)
    cache = model.new_kv_cache(2)
    with torch.inference_mode():
        first, _ = model(idx[:, :9], kv_cache=cache)
        steps = [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.keys[0].size(1) == model.config.kv_heads


def test_the_cache_shrinks_with_grouped_query_attention():
    mha, gqa = model_with({}), model_with({"n_kv_head": 1})
    assert cache_bytes(mha, 4) == 4 * cache_bytes(gqa, 4)  # n_head / n_kv_head = 4
    assert gqa.new_kv_cache(4).keys[0].shape == (4, 1, 16, 8)


def test_rotary_scores_depend_only_on_offsets():
    # Q K^T after the rotation is the same wherever the window starts: what lets the
    # cache roll, and the recomputing path re-base the window to position 0.
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)

    def scores(start: int) -> torch.Tensor:
        cos, sin = rope_angles(torch.arange(start, start + 8), 16, 10000.0)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-2, -1)

    torch.testing.assert_close(scores(37), scores(0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0), q @ k.transpose(-2, -1), atol=1e-2)  # it does rotate


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("attention", ["fused", "wrapper"])
def test_rotary_greedy_tokens_with_the_rolling_cache_equal_recomputing(num_samples, attention):
    model = model_with(OPTIONS["all"], attention)
    prompt = torch.randint(50, (5,)).tolist()
    settings = dict(num_samples=num_samples, temperature=0)
    n = 4 * 16 + 7  # well past block_size=16: the ring wraps four times
    cached = torch.stack(list(generate(model, prompt, n, **settings)), dim=1)
    recomputed = torch.stack(list(generate(model, prompt, n, use_kv_cache=False, **settings)), 1)
    assert torch.equal(cached, recomputed)
    if attention == "fused":
        static = torch.stack(list(generate(model, prompt, n, static_decode=True, **settings)), 1)
        assert torch.equal(static, cached)


@pytest.mark.parametrize("attention", ["fused", "wrapper"])
def test_the_rolling_cache_computes_sliding_window_attention(attention):
    # 2 layers, block_size 8, 30 tokens: the ring wraps, and the last token depends on
    # the last 2 * 7 + 1 = 15 tokens through two windows of 8.
    model = model_with(OPTIONS["rope"], attention, block_size=8)
    ids = torch.randint(50, (1, 30))
    cache = model.new_kv_cache(1)
    assert cache.rolling
    with torch.inference_mode():
        model(ids[:, :8], kv_cache=cache)
        rolled = [model(ids[:, t : t + 1], kv_cache=cache)[0][:, -1] for t in range(8, 30)]
        history, _ = model(ids)  # all 30 tokens under the sliding window
        field, _ = model(ids[:, 15:])  # only what the last token depends on
        last_window, _ = model(ids[:, 22:])  # the last 8 tokens alone, from scratch
    for t, logits in zip(range(8, 30), rolled, strict=True):
        torch.testing.assert_close(logits, history[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(field[:, -1], history[:, -1], atol=1e-5, rtol=1e-5)
    # The "recompute the last block_size tokens" is another function once there
    # are two layers: the oldest of them lost the context they were cached with.
    assert (last_window[:, -1] - history[:, -1]).abs().max() > 1e-3
    with pytest.raises(MinigptError, match="KV cache is full"):
        model(ids[:, :2], kv_cache=cache)  # more than one position at a time past the end


def test_recomputing_a_huge_rotary_window_is_refused_before_it_runs(monkeypatch):
    from minigpt import generate as generate_module

    model = model_with(OPTIONS["rope"])  # reruns 2 x 15 + 1 = 31 tokens: 4 x 4 x 31^2 bytes
    monkeypatch.setattr(generate_module, "memory_limit", lambda device: 10_000)
    with pytest.raises(MinigptError, match="reruns 31 tokens") as info:
        generate(model, [1, 2], 40, use_kv_cache=False)
    assert "KV cache" in info.value.hint
    assert len(list(generate(model, [1, 2], 40))) == 40  # the rolling cache needs no such room


def test_a_stride_is_refused_for_rotary_positions():
    model = model_with(OPTIONS["rope"])
    with pytest.raises(MinigptError, match="stride applies to learned positions"):
        generate(model, [1, 2], 5, stride=4)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.n_kv_head=3", "n_head=4 is not a multiple of model.n_kv_head=3"),
        ("model.n_kv_head=8", "n_kv_head must be from 0"),
        ("model.position=alibi", "model.position must be one of learned, rope"),
        ("model.norm=batchnorm", "model.norm must be one of layernorm, rmsnorm"),
        ("model.mlp=relu", "model.mlp must be one of gelu, swiglu"),
        ("model.n_embd=36", "needs an even head size"),  # 36 / 4 heads = 9
    ],
)
def test_bad_combinations_are_one_sentence_and_exit_2(
    tmp_path, minigpt_cli, tiny_train, setting, message
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_train.text)
    sets = ["model.n_head=4", "model.n_embd=32", "model.position=rope", setting]
    args = ["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--device", "cpu"]
    for item in sets:
        args += ["--set", item]
    code, _, err = minigpt_cli(*args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_relu2_is_relu_squared_between_the_mlps_two_matrices():
    mlp = model_with(OPTIONS["relu2"]).blocks[0].mlp
    x = torch.randn(3, 5, 32)
    expected = torch.relu(x @ mlp.fc.weight.T + mlp.fc.bias) ** 2 @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), expected)
    with pytest.raises(MinigptError, match="relu2"):
        hf_config_from_gpt(model_with(OPTIONS["relu2"]).config, None)


def test_gpt2_export_refuses_what_gpt2_cannot_hold():
    with pytest.raises(MinigptError, match="position='rope'.*n_kv_head=2"):
        hf_config_from_gpt(replace(model_with(OPTIONS["all"]).config), None)


@pytest.fixture(scope="module")
def data(tiny_train_data):
    return tiny_train_data  # the trainer tests' tiny corpus


def option_sets(options: dict) -> list[str]:
    return [f"model.{key}={str(value).lower()}" for key, value in options.items()]


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_trains_resumes_bit_identically_samples_and_inspects(
    name, tmp_path, data, minigpt_cli, tiny_train
):
    sets = [*tiny_train.sets, "model.n_head=4", "model.n_embd=32", *option_sets(OPTIONS[name])]
    sets += ["train.eval_interval=3", "train.lr_decay_iters=6"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    config = load_config(None, [*sets, f"train.out_dir={straight}", "train.max_iters=6"])
    trainer.train(config, data=data, progress=False)
    config = load_config(None, [*sets, f"train.out_dir={split}", "train.max_iters=3"])
    trainer.train(config, data=data, progress=False)
    trainer.train(resume_config(split, {"train": {"max_iters": 6}}), resume=True, data=data)
    assert tiny_train.losses(split) == tiny_train.losses(straight)  # exact, step by step

    run = load_run(straight)  # the run dir round-trips every option
    for key, value in OPTIONS[name].items():
        assert getattr(run.model.config, key) == value
    code, out, err = minigpt_cli("generate", str(straight), "-p", "def", "-n", "40", "--json")
    assert code == 0 and json.loads(out)["new_tokens"] == 40, err
    # 1 layer x K and V x n_kv_head x block_size 16 x d_head 8 x 4 bytes
    expected = 2 * run.model.config.kv_heads * 16 * 8 * 4
    assert json.loads(out)["settings"]["kv_cache_bytes"] == expected
    report = tmp_path / "heads.json"
    code, _, err = minigpt_cli("inspect-heads", str(straight), "--json", str(report))
    assert code == 0, err
    inspection = json.loads(report.read_text())
    groups = [[0, 1], [2, 3]] if run.model.config.kv_heads == 2 else [[0], [1], [2], [3]]
    assert inspection["kv_groups"] == groups
    shared = any("share one K and V" in note for note in inspection["notes"])
    assert shared == (len(groups) == 2)
