"""Sampling: the sampler's order and edge cases, KV cache == recompute (also far past
block_size), batched samples, stop strings, UTF-8-safe streaming, and the CLI."""

import copy
import io
import json
from pathlib import Path

import pytest
import torch

from minigpt import console
from minigpt import generate as generate_module
from minigpt.checkpoint import BEST_WEIGHTS, CONFIG_FILE, TOKENIZER_FILE, write_run_files
from minigpt.errors import MinigptError
from minigpt.generate import cache_bytes, encode_prompt, generate, generate_text, window_start
from minigpt.model import GPT
from minigpt.sampling import MAX_SEED, Sampling, sample_next
from minigpt.text import StopStrings
from minigpt.tokenizer import BPETokenizer, CharTokenizer

HELLO = "hello world\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def train(model: GPT, ids: list[int], steps: int = 150, lr: float = 1e-2) -> GPT:
    """Fit the model to a short text (random windows, AdamW): greedy sampling then recites it."""
    torch.manual_seed(0)
    data = torch.tensor(ids)
    T = model.config.block_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (16,)).tolist()
        x = torch.stack([data[i : i + T] for i in starts])
        y = torch.stack([data[i + 1 : i + T + 1] for i in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def hello_run(tmp_path_factory, tiny_gpt):
    """A char model trained on 'hello world' and its run directory."""
    tokenizer = CharTokenizer.from_text(HELLO)
    model = train(tiny_gpt(tokenizer.vocab_size), tokenizer.encode(HELLO * 20))
    run_dir = write_run_files(tmp_path_factory.mktemp("runs") / "hello", model, tokenizer)
    return run_dir, model, tokenizer


@pytest.fixture(scope="module")
def random_model(tiny_gpt):
    """Untrained, float64, with large weights: its greedy output depends on every detail
    of the context (window and positions), and float64 leaves no near-ties to flip."""
    return tiny_gpt(11, block_size=16, seed=3, init_std=0.5).double()


def greedy_ids(model, prompt, n, **kwargs):
    return torch.stack(list(generate(model, prompt, n, temperature=0, **kwargs)), dim=1)


# --- the sampler --------------------------------------------------------------------


def draws(logits, n=4000, seed=0, **kwargs):
    """n draws from one row of logits (a batch of n identical rows), as a set and counts."""
    gen = torch.Generator().manual_seed(seed)
    ids = sample_next(torch.as_tensor(logits).expand(n, -1), generator=gen, **kwargs)
    return torch.bincount(ids, minlength=len(logits))


def test_temperature_zero_is_argmax_whatever_top_k_and_top_p():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(-1)
    for top_k, top_p in [(None, None), (3, None), (None, 0.01), (40, 0.5)]:
        assert torch.equal(sample_next(logits, 0, top_k, top_p), expected)


def test_top_k_one_and_tiny_top_p_are_argmax_at_any_temperature():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    for temperature in (0.3, 1.0, 10.0):
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            assert torch.equal(
                sample_next(logits, temperature, top_k=1, generator=gen), logits.argmax(-1)
            )
            assert torch.equal(
                sample_next(logits, temperature, top_p=1e-6, generator=gen), logits.argmax(-1)
            )


def test_top_k_keeps_exactly_k_even_with_ties_and_is_clamped_to_the_vocab():
    counts = draws([1.0, 1.0, 1.0, 1.0, 0.0], top_k=2, temperature=1.0)
    assert (counts > 0).sum() == 2  # four tokens tie for the top; exactly two are kept
    counts = draws([3.0, 2.0, 1.0, 0.0, -1.0], top_k=3, temperature=100.0)
    assert counts[:3].min() > 1000 and counts[3:].sum() == 0  # k before temperature
    # k larger than the vocabulary means "no top-k": the very same draws.
    assert torch.equal(draws([3.0, 2.0, 1.0], top_k=1000), draws([3.0, 2.0, 1.0]))


def test_top_p_keeps_the_smallest_set_reaching_p_after_temperature():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    counts = draws(logits, top_p=0.7)  # 0.5 < 0.7 <= 0.5 + 0.3: two tokens
    assert counts[0] > 0 and counts[1] > 0 and counts[2] == 0
    counts = draws(logits, top_p=0.8)  # exactly 0.8: still two tokens
    assert counts[2] == 0
    # Temperature first: at T=0.1 the top token holds > 99% and is alone in the 0.9 nucleus;
    # at T=10 the distribution is nearly flat and the nucleus holds all three.
    assert (draws(logits, temperature=0.1, top_p=0.9) > 0).sum() == 1
    assert (draws(logits, temperature=10.0, top_p=0.9) > 0).sum() == 3


def test_draws_follow_softmax_of_logits_over_temperature_and_are_seeded():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 2.0):
        counts = draws(logits, n=20000, temperature=temperature).double()
        expected = torch.softmax(logits.double() / temperature, -1)
        assert torch.allclose(counts / counts.sum(), expected, atol=0.015)
    assert torch.equal(draws(logits, seed=7), draws(logits, seed=7))
    assert not torch.equal(draws(logits, seed=7), draws(logits, seed=8))


def test_combined_top_k_temperature_top_p_distribution():
    """k=4 of 5 -> T=2 -> nucleus 0.8 of what is left -> renormalised draw."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    kept = torch.tensor([2.0, 1.0, 0.0, 3.0]) / 2  # top-4 (ids 0, 1, 2, 4), over T
    probs = torch.softmax(kept, -1)  # ids 0, 1, 2, 4: 0.27, 0.16, 0.10, 0.45
    assert 0.27 + 0.45 < 0.8 < 0.27 + 0.45 + 0.16  # so the nucleus is ids 4, 0, 1
    expected = torch.zeros(5, dtype=torch.double)
    expected[[0, 1, 4]] = probs[[0, 1, 3]].double() / probs[[0, 1, 3]].sum()
    counts = draws(logits, n=20000, temperature=2.0, top_k=4, top_p=0.8).double()
    assert torch.allclose(counts / counts.sum(), expected, atol=0.015)


def test_a_tiny_temperature_is_greedy_not_nan():
    """logits / 1e-40 overflows to inf and softmax gives NaN: the sampler must not care."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(2)) * 5
    for dtype in (torch.float32, torch.float64, torch.float16):
        for top_k, top_p in [(None, None), (5, None), (None, 0.9), (10, 0.5)]:
            for temperature in (1e-40, 1e-320, 5e-324):
                gen = torch.Generator().manual_seed(0)
                ids = sample_next(logits.to(dtype), temperature, top_k, top_p, generator=gen)
                assert torch.equal(ids, logits.to(dtype).argmax(-1)), (dtype, top_k, top_p)


def test_a_huge_temperature_draws_uniformly_and_never_nan():
    counts = draws([30.0, 0.0, -30.0, -1e4], n=8000, temperature=1e300).double()
    assert torch.allclose(
        counts / counts.sum(), torch.full((4,), 0.25, dtype=torch.double), atol=0.03
    )


def test_generate_at_a_tiny_temperature_equals_greedy(random_model):
    prompt = [1, 2, 3]
    greedy = greedy_ids(random_model, prompt, 40, num_samples=2)
    for use_kv_cache in (True, False):
        steps = generate(
            random_model,
            prompt,
            40,
            num_samples=2,
            temperature=1e-40,
            seed=1,
            use_kv_cache=use_kv_cache,
        )
        assert torch.equal(torch.stack(list(steps), dim=1), greedy)


def test_vocab_limit_is_never_exceeded_by_any_sampler():
    """The best logits sit past the limit: every sampler must still stay below it."""
    logits = torch.randn(32, 20, generator=torch.Generator().manual_seed(3))
    logits[:, 12:] += 100.0  # ids 12.. would win every draw
    for temperature, top_k, top_p in [
        (0, None, None),
        (1.0, None, None),
        (1.0, 3, None),
        (0.7, None, 0.9),
        (2.0, 50, 0.99),
        (1e-40, None, None),
    ]:
        gen = torch.Generator().manual_seed(0)
        ids = sample_next(logits, temperature, top_k, top_p, generator=gen, vocab_limit=12)
        assert ids.max() < 12, (temperature, top_k, top_p)
    assert torch.equal(sample_next(logits, 0, vocab_limit=12), logits[:, :12].argmax(-1))


def test_window_start_crops_to_block_size_minus_stride():
    assert window_start(16, 0, 16, 4) == 0  # full but not over
    assert window_start(17, 0, 16, 4) == 5  # 12 = block_size - stride tokens remain
    assert window_start(17, 0, 16, 0) == 1  # stride 0: the last block_size tokens
    assert window_start(20, 5, 16, 4) == 5


@pytest.mark.parametrize(
    "settings, param",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"num_samples": 0}, "num_samples"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stride": -1}, "stride"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 99999999999999999999999}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_refuses_settings_that_mean_nothing_naming_the_argument(settings, param):
    with pytest.raises(MinigptError) as caught:
        Sampling(**settings)
    assert caught.value.param == param and param in str(caught.value)
    assert caught.value.hint


def test_sampling_accepts_the_edges_and_the_model_checks_the_stride(random_model):
    Sampling(max_new_tokens=1, num_samples=1, temperature=0, top_k=1, top_p=1.0, stride=0)
    assert Sampling(stop=["a"]).stop == ("a",) and Sampling().stride_for(16) == 4
    with pytest.raises(MinigptError, match="block_size=16") as caught:
        generate(random_model, [1], 5, stride=16)
    assert caught.value.param == "stride"


def test_seeds_at_both_edges_of_torchs_range_work(random_model):
    assert "2**64 - 1" in str(pytest.raises(MinigptError, Sampling, seed=2**64).value)
    for seed in (0, MAX_SEED):
        first = torch.stack(list(generate(random_model, [1, 2], 10, seed=seed)), dim=1)
        again = torch.stack(list(generate(random_model, [1, 2], 10, seed=seed)), dim=1)
        assert torch.equal(first, again)


def test_prompt_ids_and_vocab_limit_are_checked_against_the_model(random_model):
    for prompt in ([11], [1, -1]):  # the model has 11 ids: 0..10
        with pytest.raises(MinigptError, match="outside the vocabulary of 11") as caught:
            generate(random_model, prompt, 3)
        assert caught.value.param == "prompt_ids"
    with pytest.raises(MinigptError, match="outside the vocabulary of 5"):
        generate(random_model, [7], 3, vocab_limit=5)  # the tokenizer has 5 ids
    for limit in (0, 12):
        with pytest.raises(MinigptError, match="vocab_limit") as caught:
            generate(random_model, [1], 3, vocab_limit=limit)
        assert caught.value.param == "vocab_limit"


def test_cache_bytes_is_what_the_kv_cache_allocates(random_model):
    cache = random_model.new_kv_cache(3)
    allocated = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert cache_bytes(random_model, 3) == allocated
    assert 0 < generate_module.memory_limit(random_model.device) <= generate_module.MAX_CACHE_BYTES


def test_too_many_samples_for_memory_are_refused_before_any_work(hello_run, monkeypatch):
    _, model, tokenizer = hello_run
    per_sample = cache_bytes(model, 1)
    monkeypatch.setattr(generate_module, "MAX_CACHE_BYTES", 100 * per_sample)
    generate_text(model, tokenizer, "he", max_new_tokens=2, num_samples=100, seed=0)  # fits
    with pytest.raises(MinigptError, match="num_samples=101 samples need") as caught:
        generate_text(model, tokenizer, "he", max_new_tokens=2, num_samples=101, seed=0)
    assert caught.value.param == "num_samples" and "at most 100 samples" in caught.value.hint


def test_generate_text_takes_a_sampling_or_its_fields_as_keywords(hello_run):
    _, model, tokenizer = hello_run
    sampling = Sampling(max_new_tokens=8, num_samples=2, temperature=1.0, seed=4)
    by_object = generate_text(model, tokenizer, "he", sampling)
    by_keywords = generate_text(model, tokenizer, "he", max_new_tokens=8, num_samples=2, seed=4)
    assert [s.text for s in by_object.samples] == [s.text for s in by_keywords.samples]
    assert by_object.settings == by_keywords.settings
    greedy = generate_text(model, tokenizer, "he", sampling, temperature=0)  # keywords win
    assert greedy.settings["temperature"] == 0 and greedy.settings["seed"] == 4
    assert [s.text for s in greedy.samples] == ["llo worl"] * 2


# --- the KV cache gives exactly what recomputing gives ------------------------------


def nanogpt_greedy(model, prompt, n):
    """The reference loop: recompute the last block_size tokens at every step."""
    idx = torch.tensor([prompt])
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


def strided_greedy(model, prompt, n, stride):
    """Recompute every step over the window the cache keeps: crop to block_size - stride."""
    block_size, tokens, start = model.config.block_size, list(prompt), 0
    for _ in range(n):
        if len(tokens) - start > block_size:
            start = len(tokens) - (block_size - stride)
        logits, _ = model(torch.tensor([tokens[start:]]))
        tokens.append(logits[0, -1].argmax().item())
    return tokens[len(prompt) :]


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 40])
def test_cache_with_stride_zero_equals_recomputing_the_last_block_size_tokens(
    random_model, prompt_len
):
    prompt = torch.randint(
        0, 11, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)
    ).tolist()
    prompt = prompt[-16:]  # a long prompt is cropped to block_size (encode_prompt does this)
    n = 3 * 16 + 5  # far past block_size
    expected = nanogpt_greedy(random_model, prompt, n)
    assert greedy_ids(random_model, prompt, n, stride=0)[0].tolist() == expected
    assert greedy_ids(random_model, prompt, n, stride=0, use_kv_cache=False)[0].tolist() == expected


@pytest.mark.parametrize("stride", [1, 4, 15])
@pytest.mark.parametrize("prompt_len", [3, 16])
def test_cache_equals_recompute_over_the_same_windows(random_model, stride, prompt_len):
    prompt = list(range(prompt_len))
    prompt = [t % 11 for t in prompt]
    n = 3 * 16 + 7
    expected = strided_greedy(random_model, prompt, n, stride)
    assert greedy_ids(random_model, prompt, n, stride=stride)[0].tolist() == expected
    assert (
        greedy_ids(random_model, prompt, n, stride=stride, use_kv_cache=False)[0].tolist()
        == expected
    )
    # The check can fail: past block_size another window policy gives other tokens.
    assert expected != nanogpt_greedy(random_model, prompt, n)


def test_cache_equals_recompute_in_float32_with_default_stride(hello_run):
    _, model, tokenizer = hello_run
    prompt = tokenizer.encode("hello wor")
    cached = greedy_ids(model, prompt, 60)
    assert torch.equal(cached, greedy_ids(model, prompt, 60, use_kv_cache=False))
    assert tokenizer.decode(cached[0].tolist()).startswith("ld\nhello world\nhello")


def test_sampling_with_cache_equals_sampling_without(random_model):
    def run(use_kv_cache):
        gen = torch.Generator().manual_seed(5)
        steps = generate(
            random_model,
            [1, 2, 3],
            50,
            num_samples=3,
            temperature=1.3,
            top_k=6,
            top_p=0.9,
            generator=gen,
            use_kv_cache=use_kv_cache,
        )
        return torch.stack(list(steps), dim=1)

    assert torch.equal(run(True), run(False))


# --- batched samples ----------------------------------------------------------------


def test_samples_share_one_prefill_and_differ_only_through_the_generator(random_model):
    prompt = [4, 1, 7, 2]
    greedy = greedy_ids(random_model, prompt, 40, num_samples=3)
    assert all(torch.equal(row, greedy[0]) for row in greedy)  # greedy: same for all
    assert torch.equal(greedy[0], greedy_ids(random_model, prompt, 40)[0])

    def sampled(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.stack(
            list(generate(random_model, prompt, 40, num_samples=4, generator=gen)), 1
        )

    first = sampled(0)
    assert len({tuple(row.tolist()) for row in first}) == 4  # four different samples
    assert torch.equal(first, sampled(0)) and not torch.equal(first, sampled(1))


def test_generate_text_batches_samples_and_counts_tokens(hello_run):
    _, model, tokenizer = hello_run
    result = generate_text(
        model, tokenizer, "hello", max_new_tokens=12, num_samples=3, temperature=0, seed=0
    )
    assert [s.text for s in result.samples] == [" world\nhello"] * 3
    assert result.new_tokens == 36 and result.prompt_tokens == 5
    assert result.tokens_per_second > 0


# --- stop strings -------------------------------------------------------------------


def push_all(stopper, pieces):
    out = []
    for piece in pieces:
        text, hit = stopper.push(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + stopper.flush(), False


def test_stop_strings_are_caught_across_pieces_and_held_back_text_is_released():
    assert push_all(StopStrings(["o w"]), list("hello world")) == ("hell", True)
    assert push_all(StopStrings(["bc"]), ["xa", "b", "cd"]) == ("xa", True)
    assert push_all(StopStrings(["world!"]), ["wor", "ld", "?"]) == ("world?", False)
    assert push_all(StopStrings(["zz", "l"]), ["hel", "lo"]) == ("he", True)  # earliest wins
    stopper = StopStrings(["abc"])
    assert stopper.push("xab") == ("x", False)  # "ab" might begin "abc": held back
    assert stopper.flush() == "ab"
    with pytest.raises(MinigptError, match="empty"):
        StopStrings([""])


def test_generation_ends_before_a_stop_string_split_over_tokens(hello_run):
    _, model, tokenizer = hello_run
    pieces = []
    result = generate_text(
        model,
        tokenizer,
        "hel",
        max_new_tokens=50,
        temperature=0,
        stop=["xyz", "o w"],
        on_text=lambda i, t: pieces.append(t),
    )
    sample = result.samples[0]
    assert sample.text == "l" and "".join(pieces) == "l"
    assert sample.finish_reason == "stop" and sample.new_tokens == 4  # 'l', 'o', ' ', 'w'


# --- UTF-8-safe streaming with a byte-level BPE tokenizer ---------------------------


@pytest.fixture(scope="module")
def emoji_model(tiny_gpt):
    """Byte-level BPE (256 byte tokens and one merge) and a model trained to write 😀."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 256
    tokenizer = BPETokenizer(ranks)
    text = "ab \U0001f600 c\n" * 30
    model = train(tiny_gpt(tokenizer.vocab_size, block_size=24), tokenizer.encode(text), steps=200)
    return model, tokenizer


def test_streaming_emoji_with_byte_level_bpe_never_splits_a_character(emoji_model):
    model, tokenizer = emoji_model
    assert len(tokenizer.encode("\U0001f600")) == 4  # the emoji is four byte tokens
    pieces = []
    result = generate_text(
        model,
        tokenizer,
        "ab ",
        max_new_tokens=9,
        temperature=0,
        on_text=lambda i, t: pieces.append(t),
    )
    text = result.samples[0].text
    assert text == "\U0001f600 c\nab "
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "\U0001f600" in pieces  # one piece, released when its fourth byte arrived
    # Decoding token by token would have printed four replacement characters instead.
    ids = tokenizer.encode(text)
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)


def test_a_stop_string_spread_over_byte_tokens_is_caught(emoji_model):
    model, tokenizer = emoji_model
    result = generate_text(
        model, tokenizer, "c\n", max_new_tokens=20, temperature=0, stop=["\U0001f600"]
    )
    assert result.samples[0].text == "ab " and result.samples[0].finish_reason == "stop"


def test_a_sample_ends_at_end_of_text(tiny_gpt):
    tokenizer = BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_gpt(tokenizer.vocab_size)
    with torch.no_grad():  # make every position predict <|endoftext|>
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(1e4 * model.tok_emb.weight[tokenizer.eot_id])
    result = generate_text(model, tokenizer, "hi", max_new_tokens=5, num_samples=2, seed=0)
    assert [(s.text, s.new_tokens, s.finish_reason) for s in result.samples] == [("", 1, "eot")] * 2


# --- a padded vocabulary and damaged weights -----------------------------------------


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory, tiny_gpt):
    """A char model of 9 characters with model.vocab_size=64, whose unused ids 9..63
    have the largest logits everywhere: any sampler that looks past 9 picks them."""
    tokenizer = CharTokenizer.from_text(HELLO)
    assert tokenizer.vocab_size == 9
    model = tiny_gpt(64)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.normal_(generator=torch.Generator().manual_seed(0))
        model.tok_emb.weight[9:] = 10 * model.ln_f.bias  # ids 9.. dominate every position
        assert model(torch.tensor([[1, 2]]))[0][0, -1].argmax() >= 9
    run_dir = write_run_files(tmp_path_factory.mktemp("runs") / "padded", model, tokenizer)
    return run_dir, model, tokenizer


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0},
        {"temperature": 1.0},
        {"temperature": 1.0, "top_k": 20},
        {"temperature": 0.8, "top_p": 0.95},
        {"temperature": 0, "use_kv_cache": False},
        {"temperature": 1.0, "use_kv_cache": False, "num_samples": 3},
    ],
)
def test_a_padded_vocabulary_only_samples_ids_the_tokenizer_has(padded_run, settings):
    _, model, tokenizer = padded_run
    result = generate_text(model, tokenizer, "he", max_new_tokens=40, seed=0, **settings)
    for sample in result.samples:
        assert sample.new_tokens == 40 and set(sample.text) <= set(HELLO)


def test_cli_generates_from_a_padded_vocabulary(padded_run, minigpt_cli):
    run_dir, _, _ = padded_run
    for options in (["--temperature", "0"], ["-s", "2", "--no-kv-cache", "--seed", "1"]):
        code, out, err = minigpt_cli("generate", run_dir, "-p", "he", "-n", "30", *options)
        assert code == 0, err
        assert set(out) <= set(HELLO + "-")  # the samples and their separator line


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0},
        {"temperature": 0.8, "top_k": 3},
        {"temperature": 1.0, "use_kv_cache": False},
    ],
)
def test_nan_weights_are_reported_not_sampled(hello_run, settings):
    _, model, tokenizer = hello_run
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.ln_f.weight[0] = float("nan")
    with pytest.raises(MinigptError, match="non-finite logits") as caught:
        generate_text(broken, tokenizer, "he", max_new_tokens=5, seed=0, **settings)
    assert caught.value.hint


# --- the prompt ---------------------------------------------------------------------


def test_prompt_is_cropped_to_block_size_and_empty_prompt_starts_from_a_newline():
    tokenizer = CharTokenizer.from_text(HELLO)
    ids, cropped = encode_prompt(tokenizer, "hello world hello", 16)
    assert cropped == 1 and ids == tokenizer.encode("ello world hello")
    assert encode_prompt(tokenizer, "", 16) == (tokenizer.encode("\n"), 0)


# --- the command line ---------------------------------------------------------------


def test_cli_streams_text_and_prints_a_stats_line(hello_run, minigpt_cli):
    run_dir, _, _ = hello_run
    greedy = ["-n", "12", "--temperature", "0"]
    code, out, err = minigpt_cli(
        "generate", run_dir, "--prompt", "hello", *greedy, "--device", "cpu"
    )
    assert code == 0 and out == "hello world\nhello\n"
    assert "prompt tokens: 5, new tokens: 12" in err and "tokens/s" in err
    code, out2, _ = minigpt_cli(
        "generate", run_dir, "-p", "hello", *greedy, "--no-kv-cache", "--no-stream"
    )
    assert code == 0 and out2 == out


def test_cli_json_and_samples(hello_run, minigpt_cli):
    run_dir, _, _ = hello_run
    options = ["--num-samples", "2", "--seed", "3", "--stop", "\n", "--stop", "zz"]
    code, out, _ = minigpt_cli("generate", run_dir, "-p", "he", "-n", "30", "--json", *options)
    assert code == 0
    data = json.loads(out)
    assert data["prompt_tokens"] == 2 and data["settings"]["seed"] == 3
    assert len(data["samples"]) == 2
    assert data["new_tokens"] == sum(s["new_tokens"] for s in data["samples"])
    assert all("\n" not in s["text"] for s in data["samples"])
    assert data["seconds"] > 0 and data["tokens_per_second"] > 0
    code, out, _ = minigpt_cli("generate", run_dir, "-p", "he", "-n", "5", "-s", "3")
    assert code == 0 and out.count("---------------") == 2 and out.count("he") >= 3


def test_cli_passes_every_sampling_option(hello_run, minigpt_cli):
    run_dir, _, _ = hello_run
    options = ["-n", "7", "-s", "2", "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9"]
    options += ["--seed", "11", "--stop", "zz", "--no-kv-cache", "--overflow-stride", "5"]
    code, out, _ = minigpt_cli(
        "generate", run_dir, "-p", "he", "--json", "--device", "cpu", *options
    )
    assert code == 0
    assert json.loads(out)["settings"] == {
        "max_new_tokens": 7,
        "num_samples": 2,
        "temperature": 0.5,
        "top_k": 3,
        "top_p": 0.9,
        "seed": 11,
        "stop": ["zz"],
        "kv_cache": False,
        "stride": 5,
        "static_decode": False,
        "device": "cpu",
        "dtype": "float32",
        "quantize": None,
        "kv_cache_bytes": 0,
    }


def test_cli_warns_about_a_cropped_prompt_and_starts_without_one(hello_run, minigpt_cli):
    run_dir, _, _ = hello_run
    code, out, err = minigpt_cli(
        "generate", run_dir, "-p", HELLO * 3, "-n", "4", "--temperature", "0"
    )
    assert code == 0 and "warning:" in err and "block_size=16" in err
    code, out, err = minigpt_cli("generate", run_dir, "-n", "11", "--temperature", "0")
    assert code == 0 and out == "hello world\n"


def test_cli_reads_the_prompt_file(hello_run, tmp_path, minigpt_cli):
    run_dir, _, _ = hello_run
    (tmp_path / "p.txt").write_text("hello w", encoding="utf-8")
    code, out, _ = minigpt_cli(
        "generate", run_dir, "--prompt-file", tmp_path / "p.txt", "-n", "4", "--temperature", "0"
    )
    assert code == 0 and out == "hello world\n"


def test_cli_interactive_loop_keeps_the_model_and_survives_bad_prompts(
    hello_run, monkeypatch, minigpt_cli
):
    run_dir, _, _ = hello_run
    lines = iter(["hello", "XYZ", "hel"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, err = minigpt_cli("generate", run_dir, "-i", "-n", "6", "--temperature", "0")
    assert code == 0
    assert out == "hello world\nhello wor\n"
    assert "never saw" in err and err.count("prompt tokens:") == 2


def interactive_output(monkeypatch, capsys, as_json):
    """What the interactive loop writes when each prompt's answer is one JSON object;
    input() itself (not a stand-in) reads the prompts, so its marker shows."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nXYZ\nhel\n"))

    def answer(line):
        if line == "XYZ":
            raise MinigptError("the text has 3 character(s) the char tokenizer never saw")
        console.print_json({"prompt": line})

    console.interactive_loop(answer, {}, as_json=as_json)
    return capsys.readouterr()


def test_interactive_json_writes_only_json_lines_to_stdout(monkeypatch, capsys):
    out, err = interactive_output(monkeypatch, capsys, as_json=True)
    assert [json.loads(line) for line in out.splitlines()] == [
        {"prompt": "hello"},
        {"prompt": "hel"},
    ]
    assert err.count("> ") == 4 and "never saw" in err  # three prompts and the end of input
    out, err = interactive_output(monkeypatch, capsys, as_json=False)
    assert out.startswith("> {") and out.count("> ") == 4  # the terminal loop is unchanged


def broken_runs(hello_run, tmp_path):
    """Run directories that must be refused, each with a word the error must contain."""
    run_dir, model, tokenizer = hello_run
    no_weights = write_run_files(tmp_path / "no_weights", model, tokenizer)
    (no_weights / BEST_WEIGHTS).unlink()
    no_tokenizer = write_run_files(tmp_path / "no_tokenizer", model, tokenizer)
    (no_tokenizer / TOKENIZER_FILE).unlink()
    no_config = write_run_files(tmp_path / "no_config", model, tokenizer)
    (no_config / CONFIG_FILE).unlink()
    future = write_run_files(tmp_path / "future", model, tokenizer)
    config = json.loads((future / CONFIG_FILE).read_text())
    (future / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 99}))
    return [
        (tmp_path / "missing", "does not exist"),
        (no_weights, "no weights"),
        (no_tokenizer, "no tokenizer"),
        (no_config, "config.json"),
        (future, "format version 99"),
    ]


def test_cli_refuses_bad_run_directories(hello_run, tmp_path, minigpt_cli):
    for run_dir, words in broken_runs(hello_run, tmp_path):
        code, out, err = minigpt_cli("generate", run_dir, "-p", "hello")
        assert code == 2, (run_dir, err)
        assert err.startswith("error:") and words in err and "Traceback" not in err
        assert out == ""


@pytest.mark.parametrize(
    "args, words",
    [
        (["-p", "hello Xq"], "never saw: 'X', 'q'"),
        (["-n", "-1"], "--max-new-tokens"),
        (["-n", "1000000000"], "--max-new-tokens"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--num-samples", "0"], "--num-samples"),
        (["--stop", ""], "stop string is empty"),
        (["--overflow-stride", "16"], "stride"),
        (["--prompt-file", "EMPTY"], "is empty"),
        (["--prompt-file", "MISSING"], "does not exist"),
        (["--prompt-file", "EMPTY", "-p", "he"], "both"),
        (["--device", "warp9"], "unknown device"),
        (["--threads", "0"], "--threads"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to 2**64 - 1"),
        (["--seed", "-1"], "--seed must be"),
        (["--top-p", "nan"], "--top-p"),
        (["--temperature", "inf"], "--temperature"),
    ],
)
def test_cli_refuses_bad_input_with_exit_code_2(hello_run, tmp_path, args, words, minigpt_cli):
    run_dir, _, _ = hello_run
    (tmp_path / "empty.txt").write_text("")
    paths = {"EMPTY": tmp_path / "empty.txt", "MISSING": tmp_path / "missing.txt"}
    args = [paths.get(a, a) for a in args]
    code, out, err = minigpt_cli("generate", run_dir, *args)
    assert code == 2, err
    assert err.startswith("error:") and words in err and "Traceback" not in err
    assert out == ""  # nothing printed before the error


def test_entry_point_exit_code_and_stderr(hello_run, run_minigpt):
    run_dir, _, _ = hello_run
    proc = run_minigpt("generate", run_dir, "--top-k", "0", cwd=Path(__file__).parent)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --top-k must be at least 1")
    assert proc.stdout == ""


def test_cli_interactive_json_is_json_lines(hello_run, monkeypatch, minigpt_cli):
    """--json with --interactive: stdout carries one JSON object per prompt, nothing else."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhel\n"))
    code, out, err = minigpt_cli(
        "generate", hello_run[0], "-i", "--json", "-n", "3", "--temperature", "0"
    )
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["hello", "hel"]


READ_AHEAD_SETTINGS = [
    dict(temperature=0, stride=0),  # crops and re-prefills at every step past the block
    dict(temperature=0, stride=4, num_samples=3),
    dict(temperature=0, static_decode=True, num_samples=2),
    dict(temperature=0, use_kv_cache=False),
    dict(temperature=0.8, top_k=5, top_p=0.9, seed=7, num_samples=3),  # the draws stay in order
    dict(temperature=1.0, seed=3, position="rope"),  # the rolling cache
]


@pytest.mark.parametrize("settings", READ_AHEAD_SETTINGS)
def test_reading_ahead_gives_the_same_tokens(tiny_gpt, monkeypatch, settings):
    """On CUDA the loop queues each step's forward pass before reading the last ids;
    forced on here, on the CPU, it must give the tokens of the plain loop."""
    settings = dict(settings)
    overrides = {"position": settings.pop("position")} if "position" in settings else {}
    model = tiny_gpt(11, block_size=16, seed=3, init_std=0.5, **overrides).double()

    def run(ahead: bool) -> list[list[int]]:
        monkeypatch.setattr(generate_module, "computes_ahead", lambda device: ahead)
        return [ids.tolist() for ids in generate(model, [1, 2, 3], 40, **settings)]

    plain, ahead = run(False), run(True)
    assert len(plain) == 40 and ahead == plain


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_step_gone_non_finite_gives_out_no_ids(tiny_gpt, monkeypatch, ahead, temperature):
    """Logits that turn NaN at the 4th step: the three tokens before it come out, then
    the error, whether or not the next step was queued before the read, and a draw
    from NaN probabilities never reaches multinomial (on CUDA, a dead context)."""
    monkeypatch.setattr(generate_module, "computes_ahead", lambda device: ahead)
    model = tiny_gpt(11, block_size=16)
    settings = dict(temperature=temperature, seed=0)
    clean = [ids.tolist() for ids in generate(model, [1, 2], 6, **settings)]
    calls = 0

    def nan_from_the_4th_forward(module, inputs, output):
        nonlocal calls
        calls += 1
        return output.fill_(float("nan")) if calls >= 4 else output  # prefill, then steps

    model.ln_f.register_forward_hook(nan_from_the_4th_forward)
    given = []
    with pytest.raises(MinigptError, match="non-finite logits"):
        for ids in generate(model, [1, 2], 6, **settings):
            given.append(ids.tolist())
    assert given == clean[:3]


def test_generate_quantize_int8_recites_what_float32_recites(hello_run, minigpt_cli):
    run_dir, _, _ = hello_run
    base = ["generate", run_dir, "-p", "he", "-n", "40", "--temperature", "0", "--device", "cpu"]
    code, eager, _ = minigpt_cli(*base)
    assert code == 0
    code, int8, err = minigpt_cli(*base, "--quantize", "int8")
    assert code == 0 and int8 == eager  # past block_size=16: crops and re-prefills
    assert "int8 weights:" in err and "of float32's" in err
    assert "compiled the decode step in" in err  # shown, and not in tokens/s
    code, out, _ = minigpt_cli(*base, "--quantize", "int8", "--json")
    settings = json.loads(out)["settings"]
    assert code == 0 and settings["quantize"] == "int8" and settings["static_decode"] is True
    assert settings["dtype"] == "float32"  # around the int8 weights


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "int8", "--dtype", "bfloat16"], "--quantize int8 and --dtype bfloat16"),
        (["--quantize", "int8", "--dtype", "float32"], "both set the weights' type"),
        (["--quantize", "int8", "--no-compile"], "samples through the compiled decode step"),
        (["--quantize", "int4"], "unknown quantization 'int4'"),
    ],
)
def test_generate_refuses_int8_combinations_it_cannot_run(hello_run, minigpt_cli, args, message):
    run_dir, _, _ = hello_run
    code, out, err = minigpt_cli("generate", run_dir, "-p", "he", "-n", "4", *args)
    assert code == 2 and message in err and "hint:" in err and out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_train_refuses_int8_in_one_sentence(minigpt_cli, tmp_path):
    code, _, err = minigpt_cli("train", "--quantize", "int8", "--out", tmp_path / "run")
    assert code == 2 and "training needs float weights" in err and "--quantize int8" in err
    assert not (tmp_path / "run").exists()


def test_compile_without_a_cpp_compiler_is_one_sentence(hello_run, minigpt_cli):
    import torch._inductor.config as inductor_config

    run_dir, _, _ = hello_run
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):  # what inductor searches
        code, out, err = minigpt_cli("generate", run_dir, "-p", "he", "-n", "4", "--compile")
    assert code == 2 and "found no C++ compiler" in err and "leave out --compile" in err
    assert out == "" and "Traceback" not in err


def test_eval_of_an_int8_run_is_within_a_percent_of_float32(hello_run, minigpt_cli, tmp_path):
    run_dir, _, _ = hello_run
    (tmp_path / "hello.txt").write_text(HELLO * 40)
    losses = []
    for extra in ([], ["--quantize", "int8"]):
        code, out, err = minigpt_cli("eval", run_dir, "--data", tmp_path / "hello.txt", "--json", *extra)
        assert code == 0, err
        losses.append(json.loads(out)["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=0.01)


def test_generate_compile_and_dtype_on_the_command_line(hello_run, minigpt_cli):
    run_dir, _, _ = hello_run
    base = ["generate", run_dir, "-p", "he", "-n", "40", "--temperature", "0", "--device", "cpu"]
    code, eager, _ = minigpt_cli(*base)
    assert code == 0
    code, compiled, _ = minigpt_cli(*base, "--compile")
    assert code == 0 and compiled == eager  # past block_size=16: crops and re-prefills
    code, out, _ = minigpt_cli(*base, "--dtype", "bfloat16", "--compile", "--json")
    assert code == 0
    settings = json.loads(out)["settings"]
    assert settings["dtype"] == "bfloat16" and settings["static_decode"] is True
    code, _, err = minigpt_cli(*base, "--dtype", "float16")
    assert code == 2 and "dtype must be one of auto, float32, bfloat16" in err and "--dtype" in err
    code, _, err = minigpt_cli(*base, "--compile", "--no-kv-cache")
    assert code == 2 and "--compile (a static-shape step) writes into the KV cache" in err
    assert "or --compile off" in err


# --- generate --prompts-file: many prompts as one batch -------------------------------


def batch_json(minigpt_cli, run_dir, prompts_file, *options) -> list[dict]:
    code, out, err = minigpt_cli(
        "generate", run_dir, "--prompts-file", prompts_file, "--json", *options
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["run_dir"] == str(run_dir)
    return data["results"]


def alone_text(minigpt_cli, run_dir, prompt, *options) -> str:
    code, out, err = minigpt_cli("generate", run_dir, "-p", prompt, "--json", *options)
    assert code == 0, err
    return json.loads(out)["samples"][0]["text"]


def test_cli_prompts_file_gives_each_prompt_its_greedy_text_alone_in_file_order(
    hello_run, tmp_path, minigpt_cli
):
    run_dir, _, _ = hello_run
    prompts = ["hello", "d", "hello world\nhello w", "wor", "", HELLO * 2]  # 3rd, 6th: cropped
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in prompts) + "\n", encoding="utf-8")
    greedy = ["-n", "20", "--temperature", "0"]  # past block_size=16: rows crop on their own
    results = batch_json(minigpt_cli, run_dir, path, *greedy)
    assert [r["prompt"] for r in results] == prompts
    assert [r["cropped_prompt_tokens"] for r in results] == [0, 0, 3, 0, 0, 8]
    texts = [r["samples"][0]["text"] for r in results]
    assert texts == [alone_text(minigpt_cli, run_dir, p, *greedy) for p in prompts]
    code, out, err = minigpt_cli("generate", run_dir, "--prompts-file", path, *greedy)
    assert code == 0
    assert out == console.SAMPLE_SEPARATOR.join(map(str.__add__, prompts, texts)) + "\n"
    assert "warning: prompt 3 has 19 tokens" in err and "warning: prompt 6 has 24 tokens" in err
    assert err.splitlines()[-1].startswith("prompts: 6, prompt tokens: 42, new tokens: 120,")
    code, compiled, err = minigpt_cli(
        "generate", run_dir, "--prompts-file", path, *greedy, "--compile"
    )
    assert code == 0 and compiled == out  # the rows' static step, compiled
    assert "compiled the decode step in" in err


def test_cli_prompts_file_draws_prompt_i_with_seed_plus_i(hello_run, tmp_path, minigpt_cli):
    run_dir, _, _ = hello_run
    (tmp_path / "p.txt").write_text("he\n\nwor\n", encoding="utf-8")  # the blank line is no prompt
    sampled = ["-n", "12", "--temperature", "3"]  # hot enough that seeds 5 and 6 differ
    results = batch_json(minigpt_cli, run_dir, tmp_path / "p.txt", "--seed", "5", *sampled)
    assert [r["settings"]["seed"] for r in results] == [5, 6]
    assert [r["samples"][0]["text"] for r in results] == [
        alone_text(minigpt_cli, run_dir, "he", "--seed", "5", *sampled),
        alone_text(minigpt_cli, run_dir, "wor", "--seed", "6", *sampled),
    ]


@pytest.mark.parametrize(
    "args, words",
    [
        (["-p", "he"], "--prompts-file and --prompt were both given"),
        (["--prompt-file", "PROMPTS"], "--prompts-file and --prompt-file were both given"),
        (["-i"], "--prompts-file and --interactive were both given"),
        (["-s", "2"], "--num-samples does not apply to --prompts-file"),
        (["--no-kv-cache"], "--no-kv-cache does not apply to --prompts-file"),
        (["--prompts-file", "MISSING"], "--prompts-file MISSING does not exist"),
        (["--prompts-file", "BAD"], "--prompts-file BAD line 2 is not JSON"),
    ],
)
def test_cli_prompts_file_refusals_are_one_error_and_a_hint(
    hello_run, tmp_path, args, words, minigpt_cli
):
    paths = {"PROMPTS": tmp_path / "p.txt", "MISSING": tmp_path / "no.txt"}
    paths["BAD"] = tmp_path / "bad.jsonl"
    paths["PROMPTS"].write_text("he\n", encoding="utf-8")
    paths["BAD"].write_text('"he"\n{"prompt"\n', encoding="utf-8")
    args = [paths.get(a, a) for a in args]
    if "--prompts-file" not in args:
        args += ["--prompts-file", paths["PROMPTS"]]
    code, out, err = minigpt_cli("generate", hello_run[0], *args)
    for name, path in paths.items():
        words = words.replace(name, str(path))
    assert code == 2 and out == "" and words in err, err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
