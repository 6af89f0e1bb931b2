"""Continuous batching: a sequence batched with others, joining and leaving at any
step, gets the tokens `generate` gives it alone (greedy and seeded), past the context
too, for learned and rotary positions; rows that end leave their place to the rest.
The static step over every row, compiled on a CPU, gives the same tokens."""

import pytest
import torch
from torch._dynamo.utils import counters

from minigpt import batching
from minigpt.batching import BatchDecoder, RowKVCache, generate_batch
from minigpt.errors import MinigptError
from minigpt.fast_decode import decode_step
from minigpt.generate import generate
from minigpt.sampling import Sampling
from minigpt.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz \n"
PROMPTS = [[1, 2, 3], [4] * 10, list(range(1, 17)), [7, 3], [9]]
NEW_TOKENS = [40, 25, 33, 5, 12]  # past block_size=16: crops and a rolling ring


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.from_text(ALPHABET)


def run_batched(decoder, tokenizer, sampling_of, join_every=3):
    """Decode PROMPTS with up to decoder.max_batch rows, one joining every
    `join_every` steps: each sequence's token ids, by prompt index."""
    waiting = [
        decoder.continuation(tokenizer, prompt, sampling_of(i), owner=i)
        for i, prompt in enumerate(PROMPTS)
    ]
    tokens = {i: [] for i in range(len(PROMPTS))}
    step = 0
    while waiting or decoder.rows:
        if waiting and decoder.free and step % join_every == 0:
            decoder.join(waiting.pop(0))
        for draw in decoder.step() if decoder.rows else []:
            tokens[draw.continuation.owner].append(draw.token_id)
        step += 1
    return tokens


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"position": "rope"},
        {"attention": "wrapper"},
        {"position": "rope", "n_kv_head": 1},
    ],
    ids=["learned", "rope", "wrapper", "rope-gqa"],
)
def test_greedy_batched_tokens_are_the_tokens_of_each_prompt_alone(tiny_gpt, tokenizer, options):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16, **options)
    alone = [
        [int(t) for t in generate(model, prompt, n, temperature=0)]
        for prompt, n in zip(PROMPTS, NEW_TOKENS, strict=True)
    ]
    decoder = BatchDecoder(model, max_batch=3, vocab_limit=tokenizer.vocab_size)
    batched = run_batched(
        decoder, tokenizer, lambda i: Sampling(max_new_tokens=NEW_TOKENS[i], temperature=0)
    )
    assert [batched[i] for i in range(len(PROMPTS))] == alone


@pytest.mark.parametrize("stride", [0, 5])
def test_overflow_stride_crops_each_row_as_generate_does(tiny_gpt, tokenizer, stride):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    sampling = Sampling(max_new_tokens=30, temperature=0, stride=stride)
    alone = [[int(t) for t in generate(model, p, sampling=sampling)] for p in PROMPTS]
    decoder = BatchDecoder(model, max_batch=4, vocab_limit=tokenizer.vocab_size)
    batched = run_batched(decoder, tokenizer, lambda i: sampling, join_every=2)
    assert [batched[i] for i in range(len(PROMPTS))] == alone


def test_a_seeded_sequence_draws_what_it_draws_alone(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16, position="rope")

    def sampling_of(i):
        return Sampling(max_new_tokens=NEW_TOKENS[i], temperature=0.9, top_k=10, seed=100 + i)

    alone = [
        [int(t) for t in generate(model, p, sampling=sampling_of(i))] for i, p in enumerate(PROMPTS)
    ]
    decoder = BatchDecoder(model, max_batch=2, vocab_limit=tokenizer.vocab_size)
    batched = run_batched(decoder, tokenizer, sampling_of)
    assert [batched[i] for i in range(len(PROMPTS))] == alone


def test_rows_that_end_free_their_place_and_the_batch_stays_packed(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    decoder = BatchDecoder(model, max_batch=3, vocab_limit=tokenizer.vocab_size)
    lengths = [1, 4, 2]
    for i, n in enumerate(lengths):
        decoder.join(
            decoder.continuation(tokenizer, PROMPTS[i], Sampling(max_new_tokens=n), owner=i)
        )
    assert decoder.free == 0
    with pytest.raises(MinigptError, match="every row is taken"):
        decoder.join(decoder.continuation(tokenizer, [1], Sampling(max_new_tokens=1)))
    ended = []
    while decoder.rows:
        ended += [d.continuation.owner for d in decoder.step() if d.finish_reason == "length"]
        # rows 0..n-1 are the sequences still running, each at its own length
        assert decoder.cache.n_rows == len(decoder.rows)
    assert ended == [0, 2, 1]
    assert decoder.free == 3


def test_a_stop_string_ends_a_row_and_is_not_in_its_text(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    free = [int(t) for t in generate(model, PROMPTS[0], 20, temperature=0)]
    text = tokenizer.decode(free)
    stop = text[5:7]
    decoder = BatchDecoder(model, max_batch=2, vocab_limit=tokenizer.vocab_size)
    sampling = Sampling(max_new_tokens=20, temperature=0, stop=[stop])
    decoder.join(decoder.continuation(tokenizer, PROMPTS[0], sampling))
    pieces, reasons = [], []
    while decoder.rows:
        for draw in decoder.step():
            pieces.append(draw.text)
            reasons.append(draw.finish_reason)
    assert "".join(pieces) == text[: text.index(stop)]
    assert reasons[-1] == "stop" and all(r is None for r in reasons[:-1])


def test_logprobs_are_the_log_softmax_of_the_step(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    decoder = BatchDecoder(model, max_batch=1, vocab_limit=tokenizer.vocab_size)
    prompt = PROMPTS[1]
    decoder.join(
        decoder.continuation(
            tokenizer, prompt, Sampling(max_new_tokens=1, temperature=0), logprobs=3
        )
    )
    (draw,) = decoder.step()
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]))
    expected = torch.log_softmax(logits[0, -1, : tokenizer.vocab_size], dim=-1)
    assert draw.token_id == int(expected.argmax())
    assert draw.logprob.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [i for i, _ in draw.logprob.top] == expected.topk(3).indices.tolist()


def test_non_finite_logits_end_the_row_with_an_error(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    decoder = BatchDecoder(model, max_batch=1, vocab_limit=tokenizer.vocab_size)
    decoder.join(decoder.continuation(tokenizer, [1, 2], Sampling(max_new_tokens=5)))
    (draw,) = decoder.step()
    assert draw.finish_reason == "error" and "non-finite" in draw.continuation.error
    assert not decoder.rows


def test_a_row_cache_takes_one_token_per_row(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    cache = RowKVCache(model.new_kv_cache(2))
    cache.n_rows = 2
    with pytest.raises(MinigptError, match="one token per row"):
        model(torch.zeros((2, 3), dtype=torch.long), kv_cache=cache)


def test_max_batch_must_be_positive(tiny_gpt, tokenizer):
    with pytest.raises(MinigptError, match="max_batch must be at least 1"):
        BatchDecoder(tiny_gpt(tokenizer.vocab_size), max_batch=0)


def test_generate_batch_returns_results_in_input_order(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    prompts = ["abc", "hello world", "z"]
    sampling = Sampling(max_new_tokens=6, temperature=0)
    results = generate_batch(model, tokenizer, prompts, sampling, max_batch=2)
    for prompt, result in zip(prompts, results, strict=True):
        alone = [int(t) for t in generate(model, tokenizer.encode(prompt), sampling=sampling)]
        assert result.samples[0].text == tokenizer.decode(alone)
        assert result.prompt_tokens == len(prompt)


# --- the static step: every row at every step, compiled on a CPU -------------------------


def test_static_rows_give_the_tokens_of_the_plain_rows_compiled_once(tiny_gpt, tokenizer):
    # more ids than the tokenizer's (a padded vocab); learned positions cropped past the block
    model = tiny_gpt(tokenizer.vocab_size + 4, block_size=16)

    def sampling_of(i):  # greedy and seeded rows side by side
        if i % 2 == 0:
            return Sampling(max_new_tokens=NEW_TOKENS[i], temperature=0)
        return Sampling(max_new_tokens=NEW_TOKENS[i], temperature=0.9, top_k=10, seed=100 + i)

    plain = run_batched(BatchDecoder(model, 3, tokenizer.vocab_size), tokenizer, sampling_of)
    graphs = counters["stats"]["unique_graphs"]
    decoder = BatchDecoder(model, 3, tokenizer.vocab_size, static=True)
    assert run_batched(decoder, tokenizer, sampling_of) == plain
    assert counters["stats"]["unique_graphs"] == graphs + 1  # joins, leaves, crops: one graph


def test_generate_batch_static_writes_the_same_texts_and_compiles_once(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16, position="rope")
    prompts = ["hello", "a", "the quick brown fox jumps over", "zz", "abc"]
    graphs = counters["stats"]["unique_graphs"]
    for sampling in (
        Sampling(max_new_tokens=30, temperature=0),  # past block_size: each row's ring rolls
        Sampling(max_new_tokens=30, temperature=0.9, seed=7),
    ):
        plain = generate_batch(model, tokenizer, prompts, sampling, max_batch=3)
        static = generate_batch(model, tokenizer, prompts, sampling, max_batch=3, static=True)
        assert [r.samples[0].text for r in static] == [r.samples[0].text for r in plain]
    assert counters["stats"]["unique_graphs"] == graphs + 1  # reused by the second batch


def test_a_static_row_cache_steps_every_row_and_moves_only_those_in_use(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    decoder = BatchDecoder(model, 4, tokenizer.vocab_size, static=True)
    decoder.run_step = decode_step  # the step as it is: what is compiled, without compiling it
    cache = decoder.cache
    buffers = [k.data_ptr() for k in cache.cache.keys]
    for prompt in ([1, 2, 3], [4, 5]):
        decoder.join(decoder.continuation(tokenizer, prompt, Sampling(max_new_tokens=20)))
    for _ in range(3):
        decoder.step()
        assert cache.attn_mask(1).shape == (4, 1, 1, 16) and cache.pos == 0  # every row, slot
    assert cache.device_lengths.tolist() == [6, 5, 0, 0] == cache.lengths[:2] + [0, 0]
    decoder.leave(decoder.rows[0])  # the last row moves into row 0
    decoder.step()
    assert cache.device_lengths.tolist() == [6, 0, 0, 0] and cache.active.tolist() == [1, 0, 0, 0]
    assert [k.data_ptr() for k in cache.cache.keys] == buffers  # written in place


def test_a_static_row_cache_takes_one_token_for_every_row(tiny_gpt, tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, block_size=16)
    cache = batching.StaticRowKVCache(model.new_kv_cache(3))
    cache.n_rows = 2
    with pytest.raises(MinigptError, match="one token for each of its 3 rows"):
        model(torch.zeros((2, 1), dtype=torch.long), kv_cache=cache)


def test_int8_weights_with_wrapper_attention_are_refused_in_one_sentence(tiny_gpt, tokenizer):
    pytest.importorskip("torchao")
    from minigpt.quantize import quantize_int8

    model = quantize_int8(tiny_gpt(tokenizer.vocab_size, block_size=16, attention="wrapper"))
    with pytest.raises(MinigptError, match="only by fused attention") as refused:
        BatchDecoder(model, 2, tokenizer.vocab_size)
    assert refused.value.param == "quantize"
