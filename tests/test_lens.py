"""The traced forward pass, the logit lens and direct logit attribution, each equal to
an independent computation: the forward pass written out by hand over the same
weights (conftest's `hand_gpt`), for every shape a GPT can take, and transformers'
GPT-2 read through hooks on an imported checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import LayerNorm

from minigpt.checkpoint import Run, load_run
from minigpt.errors import MinigptError
from minigpt.lens import attribute, head_outputs, logit_lens, trace
from minigpt.lens_run import check_position, prompt_ids
from minigpt.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "kfbmapkfbmaphco"  # 15 of the 16 positions the tiny GPTs have


def ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text))


def ranks_of(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Where each target (T,) comes in probs (..., T, vocab) sorted likeliest first: 1, 2, ..."""
    order = probs.argsort(dim=-1, descending=True)
    return (order == targets[:, None]).int().argmax(-1) + 1


def assert_close(ours: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours.double(), expected.double(), atol=atol, rtol=1e-4)


# --------------------------------------------------------------------------- the traced pass


def test_trace_holds_the_streams_heads_and_mlps_of_the_hand_forward(circuit_gpt, hand_gpt):
    model, tokenizer = circuit_gpt
    idx = ids(tokenizer, PROMPT)
    traced, hand = trace(model, idx), hand_gpt.forward(model, idx)
    assert_close(traced.resid, hand.resid)  # (L + 1, T, C)
    assert_close(traced.contexts, hand.z.flatten(-2))  # (L, T, H * d_head)
    heads = torch.stack([head_outputs(model, traced.contexts[i], i) for i in range(2)])
    assert_close(heads, hand.heads)  # (L, T, H, C)
    assert_close(traced.mlps, hand.mlps)


# --------------------------------------------------------------------------- the logit lens


def test_the_last_streams_lens_is_the_models_own_prediction(circuit_gpt):
    model, tokenizer = circuit_gpt
    idx = ids(tokenizer, PROMPT)
    lens = logit_lens(model, tokenizer, idx, top_k=4)
    with torch.no_grad():
        logits = model(idx[None])[0][0]  # (T, vocab)
    top = torch.softmax(logits, dim=-1).topk(4)
    assert torch.equal(lens.top_ids[-1], top.indices)
    assert torch.equal(lens.top_probs[-1], top.values)


def test_every_streams_lens_is_the_hand_computation(circuit_gpt, hand_gpt):
    model, tokenizer = circuit_gpt
    idx = ids(tokenizer, PROMPT)
    lens = logit_lens(model, tokenizer, idx, top_k=3)
    probs = torch.softmax(hand_gpt.forward(model, idx).lens, dim=-1)  # (L + 1, T, vocab)
    following = probs[:, :-1]  # each position's prediction of the token after it
    ranks = ranks_of(following, idx[1:])
    assert lens.streams == ["embed", "L0", "L1"]
    assert lens.tokens == list(PROMPT)
    true_next = following.gather(-1, idx[1:, None].expand(len(probs), -1, 1))[..., 0]
    assert_close(lens.next_probs, true_next)
    assert torch.equal(lens.next_ranks, ranks)
    assert (ranks > 1).any() and (ranks < 16).any()  # the ranks are not all one value
    top = probs.topk(3)
    assert torch.equal(lens.top_ids, top.indices)
    assert_close(lens.top_probs, top.values)
    assert lens.top_tokens[1][4] == [tokenizer.decode([int(i)]) for i in top.indices[1, 4]]


@pytest.mark.parametrize("top_k", [0, 17])
def test_a_top_k_outside_the_vocabulary_is_refused(circuit_gpt, top_k):
    model, tokenizer = circuit_gpt
    with pytest.raises(MinigptError, match=f"top {top_k} is out of range") as caught:
        logit_lens(model, tokenizer, ids(tokenizer, PROMPT), top_k=top_k)
    assert caught.value.param == "top"


# --------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("versus", [None, "b"])
def test_attribution_sums_to_the_models_logit_difference(circuit_gpt, versus):
    model, tokenizer = circuit_gpt
    idx = ids(tokenizer, PROMPT)
    answer = tokenizer.encode("o")[0]
    other = tokenizer.encode(versus)[0] if versus else None
    result = attribute(model, tokenizer, idx, answer, other)
    with torch.no_grad():
        logits = model(idx[None])[0][0, -1]
    expected = float(logits[answer] - (logits[other] if other is not None else 0.0))
    assert result.logit_diff == pytest.approx(expected, abs=1e-5)
    assert result.total == pytest.approx(expected, abs=1e-4)
    assert sum(value for _, value in result.components) == pytest.approx(result.total, abs=1e-5)
    assert len(result.components) == 2 + 2 * 4 + 2  # embed, biases, 8 heads, 2 MLPs
    assert (result.answer, result.versus) == ("o", versus)


def test_each_attribution_term_is_the_hand_computation(circuit_gpt, hand_gpt):
    model, tokenizer = circuit_gpt
    idx = ids(tokenizer, PROMPT)
    answer, versus = tokenizer.encode("o")[0], tokenizer.encode("b")[0]
    result = attribute(model, tokenizer, idx, answer, versus)
    hand = hand_gpt.forward(model, idx)
    W_U = model.tok_emb.weight.detach().double()
    direction = W_U[answer] - W_U[versus]  # (C,)
    gain, eps = model.ln_f.weight.detach().double(), model.config.layer_norm_eps
    x = hand.resid[-1, -1]  # the whole stream at the last position, after the last block

    def read(c: torch.Tensor) -> torch.Tensor:
        """A term c (..., C) through ln_f with x's scale frozen, onto the direction."""
        if isinstance(model.ln_f, LayerNorm):
            c = (c - c.mean(-1, keepdim=True)) / (x.var(unbiased=False) + eps).sqrt()
        else:
            c = c / (x.pow(2).mean() + eps).sqrt()
        return (c * gain) @ direction

    assert_close(result.heads, read(hand.heads[:, -1]))  # (L, H)
    assert_close(result.mlps, read(hand.mlps[:, -1]))  # (L,)
    assert result.embed == pytest.approx(float(read(hand.resid[0, -1])), abs=1e-4)
    constants = [block.attn.out_proj.bias for block in model.blocks]  # W^O's biases
    biases = sum(float(read(b.detach().double())) for b in constants if b is not None)
    if getattr(model.ln_f, "bias", None) is not None:
        biases += float(model.ln_f.bias.detach().double() @ direction)
    assert result.biases == pytest.approx(float(biases), abs=1e-4)
    hand_diff = hand.logits[-1, answer] - hand.logits[-1, versus]
    assert result.logit_diff == pytest.approx(float(hand_diff), abs=1e-4)


# --------------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def tiny_run(circuit_gpt):
    model, tokenizer = circuit_gpt
    return Run(dir=Path("tiny"), model=model, tokenizer=tokenizer, config={})


def test_a_prompt_is_its_token_ids(tiny_run):
    assert prompt_ids(tiny_run, "abc").tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("", "the clean prompt is empty"),
        ("a" * 17, "the clean prompt is 17 tokens, more than the model's context of 16"),
    ],
)
def test_a_prompt_the_measures_cannot_take_is_refused(tiny_run, prompt, words):
    with pytest.raises(MinigptError, match=words) as caught:
        prompt_ids(tiny_run, prompt, "clean")
    assert caught.value.param == "clean"
    assert caught.value.hint


def test_a_position_counts_from_the_end_when_negative_and_is_refused_past_it():
    assert check_position(-1, 5) == 4
    assert check_position(0, 5) == 0
    with pytest.raises(MinigptError, match="position 5 is out of range") as caught:
        check_position(5, 5)
    assert caught.value.param == "position"


# --------------------------------------------------------------------------- GPT-2, by transformers


def hf_pass(hf_model, idx: torch.Tensor):
    """transformers' GPT-2 over idx (T,), read through hooks: (the stream entering each
    layer then after the last block (L + 1, T, C), each head's output W^O_h z_h
    (L, T, H, C), each MLP's output (L, T, C), logits (T, vocab))."""
    gpt = hf_model.transformer
    H = hf_model.config.n_head
    streams, contexts, mlps, hooks = [], [], [], []
    for block in gpt.h:
        hooks.append(block.register_forward_pre_hook(lambda _m, args: streams.append(args[0][0])))
        hooks.append(
            block.attn.c_proj.register_forward_pre_hook(
                lambda _m, args: contexts.append(args[0][0])
            )
        )
        hooks.append(block.mlp.register_forward_hook(lambda _m, _a, out: mlps.append(out[0])))
    hooks.append(gpt.ln_f.register_forward_pre_hook(lambda _m, args: streams.append(args[0][0])))
    try:
        with torch.no_grad():
            logits = hf_model(idx[None]).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    heads = []
    for block, z in zip(gpt.h, contexts, strict=True):  # z (T, H * d_head), heads in order
        W_O = block.attn.c_proj.weight.unflatten(0, (H, -1))  # a Conv1D, x @ W: (H, d_head, C)
        heads.append(torch.einsum("thd,hdc->thc", z.unflatten(-1, (H, -1)), W_O))
    return torch.stack(streams), torch.stack(heads), torch.stack(mlps), logits


@pytest.fixture(scope="module")
def gpt2(imported, hf_model, gpt2_text):
    """(our imported run, the token ids of a prompt, transformers' pass over them)."""
    run = load_run(imported)
    idx = torch.tensor(run.tokenizer.encode_prompt(gpt2_text[:90]))
    return run, idx, hf_pass(hf_model, idx)


def test_the_lens_of_an_imported_gpt2_is_transformers_own(gpt2, hf_model):
    run, idx, (streams, _, _, logits) = gpt2
    lens = logit_lens(run.model, run.tokenizer, idx, top_k=5)
    with torch.no_grad():
        probs = torch.softmax(hf_model.lm_head(hf_model.transformer.ln_f(streams)), dim=-1)
    assert torch.allclose(probs[-1], torch.softmax(logits, dim=-1), atol=1e-6)
    following = probs[:, :-1].gather(-1, idx[1:, None].expand(len(streams), -1, 1))[..., 0]
    assert_close(lens.next_probs, following)
    assert torch.equal(lens.next_ranks, ranks_of(probs[:, :-1], idx[1:]))
    top = probs.topk(5)
    assert torch.equal(lens.top_ids, top.indices)
    assert_close(lens.top_probs, top.values)


def test_the_attribution_of_an_imported_gpt2_is_transformers_computation(gpt2, hf_model):
    run, idx, (streams, heads, mlps, logits) = gpt2
    answer, versus = logits[-1].topk(2).indices.tolist()
    result = attribute(run.model, run.tokenizer, idx, answer, versus)
    ln_f = hf_model.transformer.ln_f
    W_U = hf_model.lm_head.weight
    direction = W_U[answer] - W_U[versus]
    x = streams[-1, -1]
    scale = ln_f.weight / (x.var(unbiased=False) + ln_f.eps).sqrt()

    def read(c: torch.Tensor) -> torch.Tensor:
        return ((c - c.mean(-1, keepdim=True)) * scale) @ direction

    with torch.no_grad():
        assert_close(result.heads, read(heads[:, -1]))
        assert_close(result.mlps, read(mlps[:, -1]))
        assert result.embed == pytest.approx(float(read(streams[0, -1])), abs=1e-4)
        biases = sum(read(block.attn.c_proj.bias) for block in hf_model.transformer.h)
        assert result.biases == pytest.approx(float(biases + ln_f.bias @ direction), abs=1e-4)
    assert result.logit_diff == pytest.approx(
        float(logits[-1, answer] - logits[-1, versus]), abs=1e-4
    )
    assert result.total == pytest.approx(result.logit_diff, abs=1e-4)


# --------------------------------------------------------------------------- a padded vocabulary
# A model's vocabulary may be padded past its tokenizer's (50304 rows for GPT-2's 50257
# tokens): only the tokenizer's ids are predictions.


@pytest.fixture(scope="module")
def padded(tiny_gpt):
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz \n")
    model = tiny_gpt(tokenizer.vocab_size + 36, block_size=32)
    with torch.no_grad():
        model.tok_emb.weight[tokenizer.vocab_size :] *= 50  # the padded rows' logits dominate
    return model, tokenizer


def test_lens_lists_only_the_tokenizers_ids(padded):
    model, tokenizer = padded
    idx = torch.tensor(tokenizer.encode("the cat sat on the mat"))
    lens = logit_lens(model, tokenizer, idx, top_k=tokenizer.vocab_size)
    assert int(lens.top_ids.max()) < tokenizer.vocab_size
    assert int(lens.next_ranks.max()) <= tokenizer.vocab_size
    logits = model(idx[None])[0][0, :, : tokenizer.vocab_size]  # (T, tokenizer's vocab)
    torch.testing.assert_close(
        lens.next_probs[-1], logits.softmax(-1)[:-1].gather(-1, idx[1:, None])[:, 0]
    )


def test_lens_refuses_more_predictions_than_the_tokenizer_has(padded):
    model, tokenizer = padded
    with pytest.raises(MinigptError, match="top"):
        logit_lens(
            model, tokenizer, torch.tensor(tokenizer.encode("abc")), top_k=tokenizer.vocab_size + 1
        )
