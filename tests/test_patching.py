"""Activation patching, equal to an independent computation: the forward pass written
out by hand (conftest's `hand_gpt`) over the corrupted prompt with one head's
context, one MLP's output or the stream at one position taken from the clean run,
for every shape a GPT can take; and transformers' GPT-2 patched through hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minigpt import patching
from minigpt.checkpoint import Run, load_run
from minigpt.errors import MinigptError
from minigpt.lens import trace
from minigpt.lens_run import parse_heads, patch_run, single_token
from minigpt.patching import Patches, activation_patching, patched_diffs

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAN = "kfbmapkfbmaph"
CORRUPT = "kfbmepkfbnaph"  # positions 4 and 9 differ
DIFFERS = [4, 9]


@pytest.fixture(scope="module")
def prompts(circuit_gpt):
    """(clean ids, corrupt ids, answer, versus): the answer is the token the clean
    prompt favours most over the corrupted one, versus the one it favours least."""
    model, tokenizer = circuit_gpt
    clean, corrupt = torch.tensor(tokenizer.encode(CLEAN)), torch.tensor(tokenizer.encode(CORRUPT))
    with torch.no_grad():
        gain = model(clean[None])[0][0, -1] - model(corrupt[None])[0][0, -1]  # (vocab,)
    return clean, corrupt, int(gain.argmax()), int(gain.argmin())


def hand_diff(hand, answer: int, versus: int) -> float:
    return float(hand.logits[-1, answer] - hand.logits[-1, versus])


def test_patching_nothing_restores_nothing_and_everything_restores_all(circuit_gpt, prompts):
    model, tokenizer = circuit_gpt
    clean_ids, corrupt_ids, answer, versus = prompts
    result = activation_patching(model, tokenizer, clean_ids, corrupt_ids, answer, versus)
    clean, corrupt = trace(model, clean_ids), trace(model, corrupt_ids)
    L, H = model.config.n_layer, model.config.n_head
    nothing = patched_diffs(
        model, corrupt.resid[0][None], 0, clean, Patches.none(1, L, H), answer, versus
    )
    assert float(nothing[0]) == result.corrupt_diff
    # every head and MLP patched from the corrupted run itself: hooks that change nothing
    same = Patches(torch.ones(1, L, H, dtype=torch.bool), torch.ones(1, L, dtype=torch.bool))
    itself = patched_diffs(model, corrupt.resid[0][None], 0, corrupt, same, answer, versus)
    assert float(itself[0]) == pytest.approx(result.corrupt_diff, abs=1e-6)
    all_patched = patched_diffs(model, clean.resid[0][None], 0, clean, same, answer, versus)
    restored = (float(all_patched[0]) - result.corrupt_diff) / (
        result.clean_diff - result.corrupt_diff
    )
    assert restored == pytest.approx(1.0, abs=1e-6)


def test_clean_and_corrupt_differences_are_the_models_own(circuit_gpt, prompts):
    model, tokenizer = circuit_gpt
    clean_ids, corrupt_ids, answer, versus = prompts
    result = activation_patching(model, tokenizer, clean_ids, corrupt_ids, answer, versus)
    with torch.no_grad():
        for ids, diff in ((clean_ids, result.clean_diff), (corrupt_ids, result.corrupt_diff)):
            logits = model(ids[None])[0][0, -1]
            assert diff == pytest.approx(float(logits[answer] - logits[versus]), abs=1e-5)
    assert result.clean_diff > result.corrupt_diff
    assert (result.clean_tokens, result.corrupt_tokens) == (list(CLEAN), list(CORRUPT))


def test_each_head_and_mlp_patch_is_the_hand_computation(circuit_gpt, prompts, hand_gpt):
    model, tokenizer = circuit_gpt
    clean_ids, corrupt_ids, answer, versus = prompts
    result = activation_patching(model, tokenizer, clean_ids, corrupt_ids, answer, versus)
    clean = hand_gpt.forward(model, clean_ids)
    clean_diff = hand_diff(clean, answer, versus)
    corrupt_diff = hand_diff(hand_gpt.forward(model, corrupt_ids), answer, versus)
    L, H = model.config.n_layer, model.config.n_head
    expected = torch.zeros(L, H + 1)
    for layer in range(L):
        for head in range(H):
            patched = hand_gpt.forward(
                model, corrupt_ids, z={(layer, head): clean.z[layer, :, head]}
            )
            expected[layer, head] = hand_diff(patched, answer, versus)
        patched = hand_gpt.forward(model, corrupt_ids, mlps={layer: clean.mlps[layer]})
        expected[layer, H] = hand_diff(patched, answer, versus)
    expected = (expected - corrupt_diff) / (clean_diff - corrupt_diff)
    assert result.restored.shape == (L, H + 1)
    torch.testing.assert_close(result.restored, expected, atol=1e-4, rtol=1e-4)
    assert result.restored.abs().max() > 0.05  # some patch matters
    assert result.rows == ["L0", "L1"] and result.columns == ["H0", "H1", "H2", "H3", "MLP"]


def test_heads_patched_together_are_the_hand_computation(circuit_gpt, prompts, hand_gpt):
    model, tokenizer = circuit_gpt
    clean_ids, corrupt_ids, answer, versus = prompts
    circuit = [(0, 1), (1, 2), (1, 3)]
    result = activation_patching(
        model, tokenizer, clean_ids, corrupt_ids, answer, versus, "head", circuit
    )
    clean = hand_gpt.forward(model, clean_ids)
    clean_diff = hand_diff(clean, answer, versus)
    corrupt_diff = hand_diff(hand_gpt.forward(model, corrupt_ids), answer, versus)
    swaps = {(layer, head): clean.z[layer, :, head] for layer, head in circuit}
    patched = hand_diff(hand_gpt.forward(model, corrupt_ids, z=swaps), answer, versus)
    expected = (patched - corrupt_diff) / (clean_diff - corrupt_diff)
    assert result.together == ["L0H1", "L1H2", "L1H3"]
    assert result.together_restored == pytest.approx(expected, abs=1e-4)
    alone = activation_patching(
        model, tokenizer, clean_ids, corrupt_ids, answer, versus, "head", [(1, 2)]
    )
    assert alone.together_restored == pytest.approx(float(result.restored[1, 2]), abs=1e-6)


def test_each_layer_position_patch_is_the_hand_computation(circuit_gpt, prompts, hand_gpt):
    model, tokenizer = circuit_gpt
    clean_ids, corrupt_ids, answer, versus = prompts
    by = "layer-position"
    result = activation_patching(model, tokenizer, clean_ids, corrupt_ids, answer, versus, by)
    T = len(CLEAN)
    assert result.restored.shape == (2, T) and result.columns == [str(t) for t in range(T)]
    agree = [t for t in range(T) if t not in DIFFERS]
    assert (result.restored[0, agree] == 0).all()  # the same token at the same place
    assert (result.restored[0, DIFFERS] != 0).all()
    clean = hand_gpt.forward(model, clean_ids)
    clean_diff = hand_diff(clean, answer, versus)
    corrupt_diff = hand_diff(hand_gpt.forward(model, corrupt_ids), answer, versus)
    for layer, position in [(0, 4), (0, 9), (1, 4), (1, 7), (1, 12)]:
        patched = hand_gpt.forward(
            model, corrupt_ids, resid={(layer, position): clean.resid[layer, position]}
        )
        expected = (hand_diff(patched, answer, versus) - corrupt_diff) / (clean_diff - corrupt_diff)
        assert float(result.restored[layer, position]) == pytest.approx(expected, abs=1e-4)


def test_the_stream_entering_layer_0_patched_where_the_prompts_differ_restores_all(
    circuit_gpt, prompts
):
    model, tokenizer = circuit_gpt
    clean_ids, corrupt_ids, answer, versus = prompts
    clean, corrupt = trace(model, clean_ids), trace(model, corrupt_ids)
    start = corrupt.resid[0].clone()
    start[DIFFERS] = clean.resid[0, DIFFERS]
    L, H = model.config.n_layer, model.config.n_head
    nothing = Patches.none(1, L, H)
    diffs = [
        float(patched_diffs(model, s[None], 0, clean, nothing, answer, versus)[0])
        for s in (clean.resid[0], corrupt.resid[0], start)
    ]
    clean_diff, corrupt_diff, patched = diffs
    assert (patched - corrupt_diff) / (clean_diff - corrupt_diff) == pytest.approx(1.0, abs=1e-6)


def test_copies_run_a_few_at_a_time_give_what_one_batch_gives(circuit_gpt, prompts, monkeypatch):
    model, tokenizer = circuit_gpt
    clean_ids, corrupt_ids, answer, versus = prompts
    whole = activation_patching(model, tokenizer, clean_ids, corrupt_ids, answer, versus)
    monkeypatch.setattr(patching, "TOKENS_PER_BATCH", 2 * len(CLEAN))  # two copies a batch
    chunked = activation_patching(model, tokenizer, clean_ids, corrupt_ids, answer, versus)
    torch.testing.assert_close(chunked.restored, whole.restored, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- what is refused


@pytest.fixture(scope="module")
def tiny_run(circuit_gpt):
    model, tokenizer = circuit_gpt
    return Run(dir=Path("tiny"), model=model, tokenizer=tokenizer, config={})


def test_prompts_of_different_lengths_are_refused_saying_so(tiny_run):
    with pytest.raises(MinigptError) as caught:
        patch_run(tiny_run, CLEAN, CORRUPT + "a", "a", "b", "head")
    message = str(caught.value)
    assert "the clean prompt is 13 tokens and the corrupted one 14" in message
    assert "same length in tokens" in message
    assert caught.value.param == "corrupt"
    assert caught.value.hint


@pytest.mark.parametrize(
    "answer, versus, param, words",
    [
        ("ab", "c", "answer", "answer 'ab' is 2 tokens ('a', 'b'); it must be exactly one token"),
        ("a", "", "versus", "versus '' is no token; it must be exactly one token"),
    ],
)
def test_an_answer_that_is_not_one_token_is_refused_saying_which(
    tiny_run, answer, versus, param, words
):
    with pytest.raises(MinigptError) as caught:
        patch_run(tiny_run, CLEAN, CORRUPT, answer, versus, "head")
    assert str(caught.value) == words
    assert caught.value.param == param
    assert caught.value.hint


def test_heads_to_patch_together_are_read_as_the_tables_name_them():
    assert parse_heads("L1H0,l1h2, L0H3", 2, 4) == [(1, 0), (1, 2), (0, 3)]


@pytest.mark.parametrize(
    "text, words",
    [
        ("L1H0,head2", "'head2' is not a head name"),
        ("L2H0", "L2H0 is not in this model, which has layers 0 to 1 and heads 0 to 3"),
        ("L1H4", "L1H4 is not in this model"),
    ],
)
def test_heads_that_are_not_the_models_are_refused_saying_which(text, words):
    with pytest.raises(MinigptError, match=words) as caught:
        parse_heads(text, 2, 4)
    assert caught.value.hint


def test_a_single_token_is_its_id(tiny_run):
    assert single_token(tiny_run.tokenizer, "c", "answer") == 2


def test_an_unknown_mode_is_refused(tiny_run):
    with pytest.raises(MinigptError, match="by must be one of head, layer-position") as caught:
        patch_run(tiny_run, CLEAN, CORRUPT, "a", "b", "neuron")
    assert caught.value.param == "by"


def test_prompts_that_give_the_same_difference_leave_nothing_to_restore(tiny_run):
    with pytest.raises(MinigptError, match="nothing for a patch to restore"):
        patch_run(tiny_run, CLEAN, CLEAN, "a", "b", "head")


# --------------------------------------------------------------------------- GPT-2, by transformers


def hf_diff(hf_model, ids, answer: int, versus: int, module=None, pre_hook=None, hook=None):
    """transformers' GPT-2 over ids (T,): logit(answer) - logit(versus) at the last
    position, with a forward pre-hook or hook on `module` in place while it runs."""
    handles = []
    if pre_hook is not None:
        handles.append(module.register_forward_pre_hook(pre_hook))
    if hook is not None:
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf_model(ids[None]).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return float(logits[answer] - logits[versus])


def hf_record(hf_model, ids, module_of, inputs: bool) -> list[torch.Tensor]:
    """The input (or output) of module_of(block) in every block over ids, each (T, width)."""
    seen = []

    def record(_module, args, out=None):  # a pre-hook (inputs) or a hook
        seen.append(args[0][0] if inputs else out[0])

    hooks = [
        module_of(block).register_forward_pre_hook(record)
        if inputs
        else module_of(block).register_forward_hook(record)
        for block in hf_model.transformer.h
    ]
    hf_diff(hf_model, ids, 0, 0)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.fixture(scope="module")
def gpt2_patching(imported, hf_model, gpt2_text):
    """Our imported run patched both ways, and the prompts: (by head, by layer-position,
    clean ids, corrupt ids, answer, versus, transformers' clean and corrupt LD)."""
    run = load_run(imported)
    clean = torch.tensor(run.tokenizer.encode_prompt(gpt2_text[:60]))
    corrupt = clean.clone()
    corrupt[[2, 5]] = clean[[5, 2]]  # two tokens swapped
    with torch.no_grad():
        gain = hf_model(clean[None]).logits[0, -1] - hf_model(corrupt[None]).logits[0, -1]
    answer, versus = int(gain.argmax()), int(gain.argmin())
    by_head, by_position = (
        activation_patching(run.model, run.tokenizer, clean, corrupt, answer, versus, by)
        for by in ("head", "layer-position")
    )
    diffs = [hf_diff(hf_model, ids, answer, versus) for ids in (clean, corrupt)]
    return by_head, by_position, clean, corrupt, answer, versus, *diffs


def test_head_patching_of_an_imported_gpt2_is_transformers_computation(gpt2_patching, hf_model):
    result, _, clean, corrupt, answer, versus, clean_diff, corrupt_diff = gpt2_patching
    assert result.clean_diff == pytest.approx(clean_diff, abs=1e-4)
    assert result.corrupt_diff == pytest.approx(corrupt_diff, abs=1e-4)
    contexts = hf_record(hf_model, clean, lambda block: block.attn.c_proj, True)  # (T, H * d)
    mlps = hf_record(hf_model, clean, lambda block: block.mlp, False)  # (T, C)
    L, H = hf_model.config.n_layer, hf_model.config.n_head
    d = hf_model.config.n_embd // H

    def clean_head(layer: int, head: int):  # c_proj's pre-hook: one head's z from the clean run
        span = slice(head * d, (head + 1) * d)

        def hook(_module, args):
            z = args[0].clone()  # (1, T, H * d)
            z[0, :, span] = contexts[layer][:, span]
            return (z,)

        return hook

    expected = torch.zeros(L, H + 1)
    for layer, block in enumerate(hf_model.transformer.h):
        for head in range(H):
            expected[layer, head] = hf_diff(
                hf_model, corrupt, answer, versus, block.attn.c_proj, clean_head(layer, head)
            )
        expected[layer, H] = hf_diff(
            hf_model, corrupt, answer, versus, block.mlp,
            hook=lambda _m, _args, _out, layer=layer: mlps[layer][None],
        )  # fmt: skip
    expected = (expected - corrupt_diff) / (clean_diff - corrupt_diff)
    torch.testing.assert_close(result.restored, expected, atol=1e-4, rtol=1e-4)
    assert result.restored.abs().max() > 0.05


def test_layer_position_patching_of_an_imported_gpt2_is_transformers_computation(
    gpt2_patching, hf_model
):
    _, result, clean, corrupt, answer, versus, clean_diff, corrupt_diff = gpt2_patching
    streams = hf_record(hf_model, clean, lambda block: block, True)  # entering each (T, C)

    def clean_stream(layer: int, position: int):  # the block's pre-hook
        def hook(_module, args):
            x = args[0].clone()  # (1, T, C)
            x[0, position] = streams[layer][position]
            return (x, *args[1:])

        return hook

    expected = torch.zeros(result.restored.shape)  # (L, T)
    for layer, block in enumerate(hf_model.transformer.h):
        for position in range(clean.numel()):
            expected[layer, position] = hf_diff(
                hf_model, corrupt, answer, versus, block, clean_stream(layer, position)
            )
    expected = (expected - corrupt_diff) / (clean_diff - corrupt_diff)
    torch.testing.assert_close(result.restored, expected, atol=1e-4, rtol=1e-4)
    assert result.restored[-1, -1] != 0
