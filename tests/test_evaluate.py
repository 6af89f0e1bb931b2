"""Loss, perplexity and bits per byte: the strided sliding window against a literal
port of the Hugging Face guide's loop, byte counts per tokenizer, and runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minigpt.checkpoint import load_run, write_run_files
from minigpt.encode import tokenize_documents
from minigpt.errors import MinigptError
from minigpt.evaluate import (
    evaluate_run,
    evaluate_tokens,
    sliding_window_nll,
    sliding_windows,
    token_byte_counts,
)
from minigpt.prepare import prepare
from minigpt.tokenizer import BPETokenizer, CharTokenizer

BLOCK = 16
VOCAB = 20


@pytest.fixture(scope="module")
def model(tiny_gpt):
    return tiny_gpt(VOCAB, block_size=BLOCK)


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def guide_reference(model, ids: np.ndarray, stride: int) -> tuple[float, int, int]:
    """The guide's loop, literally: (total nll, predicted tokens, windows). The guide's
    model shifts the labels itself; ours takes them shifted, so input[:-1] predicts
    labels[1:]. Weighted by the labels actually scored."""
    ids = torch.as_tensor(ids)
    max_length, seq_len = model.config.block_size, len(ids)
    nll_sum, n_tokens, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end]
        labels = input_ids.clone()
        labels[:-trg_len] = -1
        windows += 1
        valid = int((labels[1:] != -1).sum())
        if valid:  # a window of one token predicts nothing
            with torch.no_grad():
                _, loss = model(input_ids[None, :-1], labels[None, 1:])
            nll_sum += loss.item() * valid
            n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens, windows


# ---------------------------------------------------------------------------- the window


@pytest.mark.parametrize("n", [2, 7, BLOCK])
def test_text_within_the_context_is_the_models_own_loss(model, n):
    ids = random_ids(n, seed=n)
    x = torch.as_tensor(ids)
    with torch.no_grad():
        _, expected = model(x[None, :-1], x[None, 1:])
    for stride in (1, 5, BLOCK):  # one window whatever the stride
        nll, targets = sliding_window_nll(model, ids, stride)
        assert len(nll) == n - 1 and nll.dtype == np.float64
        assert nll.mean() == pytest.approx(expected.item(), abs=1e-5)
        assert np.array_equal(targets, ids[1:])


@pytest.mark.parametrize("n", [5, BLOCK, BLOCK + 1, 3 * BLOCK, 3 * BLOCK + 1, 61, 100])
@pytest.mark.parametrize("stride", [1, 3, BLOCK // 2, BLOCK - 1, BLOCK])
def test_strided_windows_follow_the_guide(model, n, stride):
    ids = random_ids(n, seed=n + stride)
    nll, targets = sliding_window_nll(model, ids, stride, batch_size=3)
    total, count, windows = guide_reference(model, ids, stride)
    assert len(nll) == count
    assert nll.sum() == pytest.approx(total, abs=1e-4)
    assert nll.mean() == pytest.approx(total / count, abs=1e-5)
    assert len(sliding_windows(n, BLOCK, stride)) == windows
    if stride < BLOCK:  # every position 1..N-1 is predicted once, in order
        assert count == n - 1 and np.array_equal(targets, ids[1:])
    else:  # disjoint chunks: the first token of each later chunk has no context
        assert count == n - windows


def test_batching_does_not_change_the_numbers(model):
    ids = random_ids(77)
    one, _ = sliding_window_nll(model, ids, 5, batch_size=1)
    for batch_size in (2, 8, 100):
        many, _ = sliding_window_nll(model, torch.as_tensor(ids), 5, batch_size=batch_size)
        assert np.allclose(many, one, atol=1e-5)


def test_stride_block_size_is_disjoint_chunks(model):
    ids = torch.as_tensor(random_ids(5 * BLOCK + 7))
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(BLOCK):
            if len(chunk) >= 2:
                _, loss = model(chunk[None, :-1], chunk[None, 1:])
                total += loss.item() * (len(chunk) - 1)
                count += len(chunk) - 1
    nll, _ = sliding_window_nll(model, ids, BLOCK)
    assert len(nll) == count and nll.mean() == pytest.approx(total / count, abs=1e-5)


def test_overlap_gives_later_tokens_more_context(model):
    windows = sliding_windows(40, BLOCK, BLOCK // 2)
    assert windows[:3] == [(0, 16, 1), (8, 24, 16), (16, 32, 24)]
    assert windows[-1] == (24, 40, 32)
    # every scored token after the first window sees at least block_size - stride before it
    assert all(first - begin >= BLOCK - BLOCK // 2 for begin, _, first in windows[1:])


@pytest.mark.parametrize("stride", [0, -1, BLOCK + 1, 2.5, True, "8"])
def test_a_bad_stride_is_refused(model, stride):
    with pytest.raises(MinigptError, match="stride must be") as err:
        sliding_window_nll(model, random_ids(30), stride)
    assert err.value.param == "window_stride" and str(BLOCK) in err.value.hint


def test_too_few_or_bad_ids_are_refused(model):
    for ids in (np.zeros(0, dtype=np.int64), np.array([3])):
        with pytest.raises(MinigptError, match="at least 2"):
            sliding_window_nll(model, ids, 4)
    with pytest.raises(MinigptError, match="vocabulary") as err:
        sliding_window_nll(model, np.array([1, VOCAB]), 4)
    assert err.value.param == "ids"
    with pytest.raises(MinigptError, match="one sequence"):
        sliding_window_nll(model, np.zeros((2, 5), dtype=np.int64), 4)


@pytest.mark.parametrize("n", [2, 3, 40])
def test_a_context_of_one_token_is_scored_as_the_bigram_model_it_is(tiny_gpt, n):
    model = tiny_gpt(VOCAB, block_size=1)
    ids = random_ids(n, seed=n)
    x = torch.as_tensor(ids)
    with torch.no_grad():  # what it trains on: each token alone predicting the next
        _, expected = model(x[:-1, None], x[1:, None])
    nll, targets = sliding_window_nll(model, ids, 1, batch_size=3)
    assert len(nll) == n - 1 and np.array_equal(targets, ids[1:])
    assert nll.mean() == pytest.approx(expected.item(), abs=1e-5)
    assert sliding_windows(n, 1, 1) == [(p, p + 2, p + 1) for p in range(n - 1)]
    result = evaluate_tokens(model, CharTokenizer([chr(65 + i) for i in range(VOCAB)]), ids)
    assert result.loss == pytest.approx(expected.item(), abs=1e-5) and result.tokens == n - 1


def test_a_model_whose_loss_is_not_a_number_is_refused(tiny_gpt):
    model = tiny_gpt(VOCAB, block_size=BLOCK)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    tokenizer = CharTokenizer([chr(65 + i) for i in range(VOCAB)])
    with pytest.raises(MinigptError, match="loss on tokens is nan: its weights hold NaN"):
        evaluate_tokens(model, tokenizer, random_ids(30))


def test_eval_mode_is_used_and_the_mode_restored(tiny_gpt):
    model = tiny_gpt(VOCAB, block_size=BLOCK, dropout=0.5)
    ids = random_ids(40)
    expected, _ = sliding_window_nll(model, ids, 4)
    model.train()
    again, _ = sliding_window_nll(model, ids, 4)
    assert np.array_equal(again, expected) and model.training


# ---------------------------------------------------------------------------- bits per byte


def test_char_bits_per_byte_on_ascii_is_loss_over_ln2(tiny_gpt):
    text = "the quick brown fox jumps over the lazy dog\n" * 3
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_gpt(tokenizer.vocab_size, block_size=BLOCK)
    result = evaluate_tokens(model, tokenizer, tokenizer.encode(text))
    assert result.tokens == result.bytes == len(text) - 1
    assert result.stride == BLOCK // 2 and result.block_size == BLOCK
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2), rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_char_bits_per_byte_counts_multibyte_characters(tiny_gpt):
    text = "héllo wörld, ça va? ✓ 你好 🙂\n" * 4
    tokenizer = CharTokenizer.from_text(text)
    counts = token_byte_counts(tokenizer)
    assert counts.dtype == np.int64 and counts.shape == (tokenizer.vocab_size,)
    for ch, size in [("h", 1), ("é", 2), ("✓", 3), ("你", 3), ("🙂", 4)]:
        assert counts[tokenizer.stoi[ch]] == size
    model = tiny_gpt(tokenizer.vocab_size, block_size=BLOCK)
    result = evaluate_tokens(model, tokenizer, tokenizer.encode(text), stride=5)
    predicted = text[1:]
    assert result.tokens == len(predicted) and result.bytes == len(predicted.encode())
    ratio = result.tokens / result.bytes
    assert ratio < 1
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2) * ratio, rel=1e-12)


@pytest.fixture(scope="module")
def bpe():
    documents = ["def add(a, b):\n    return a + b\n", "naïve café: «déjà vu» 🙂\n"] * 20
    return BPETokenizer.train(documents, 300), documents


def test_bpe_bytes_are_the_texts_and_eot_is_left_out(tiny_gpt, bpe):
    tokenizer, documents = bpe
    counts = token_byte_counts(tokenizer)
    assert counts[tokenizer.eot_id] == 0 and (counts[:256] == 1).all()
    merges = range(256, tokenizer.eot_id)  # the corpus may run out of merges before 300
    assert all(counts[i] == len(tokenizer.token_bytes([i])) for i in merges)
    ids = tokenize_documents(tokenizer, documents, progress=False)
    eot = ids == tokenizer.eot_id
    assert eot.sum() == len(documents) - 1
    model = tiny_gpt(tokenizer.vocab_size, block_size=BLOCK)
    result = evaluate_tokens(model, tokenizer, ids)
    first = len(tokenizer.token_bytes([int(ids[0])]))  # the first token is never predicted
    assert result.bytes == len("".join(documents).encode()) - first
    assert result.tokens == len(ids) - 1  # eot is predicted, and counted in the loss
    nll, targets = sliding_window_nll(model, ids, BLOCK // 2)
    text = targets != tokenizer.eot_id
    assert result.loss == pytest.approx(nll.mean(), rel=1e-12)
    expected_bpb = nll[text].sum() / (math.log(2) * result.bytes)
    assert result.bits_per_byte == pytest.approx(expected_bpb, rel=1e-12)
    assert nll[~text].sum() > 0  # so leaving eot out did change something


# ---------------------------------------------------------------------------- runs


CORPUS = "the quick brown fox jumps over the lazy dog\n" * 40


@pytest.fixture(scope="module")
def runs(tiny_gpt, tmp_path_factory):
    """A run whose config.json names its prepared data, and one without (imported)."""
    root = tmp_path_factory.mktemp("evaluate")
    source = root / "corpus.txt"
    source.write_text(CORPUS)
    prepared = prepare(str(source), "char", data_dir=root / "data", progress=False)
    tokenizer = prepared.tokenizer
    model = tiny_gpt(tokenizer.vocab_size, block_size=BLOCK)
    recorded = {"dir": str(prepared.dir), "content_hash": prepared.meta["content_hash"]}
    with_data = write_run_files(root / "run", model, tokenizer, {"prepared_data": recorded})
    imported = write_run_files(root / "imported", model, tokenizer)
    return load_run(with_data), load_run(imported), prepared, root


def test_a_run_is_evaluated_on_its_validation_split(runs):
    run, _, prepared, _ = runs
    result = evaluate_run(run)
    val = np.asarray(prepared.val_tokens(), dtype=np.int64)
    assert result.source == f"validation split of {prepared.dir}"
    assert result.tokens == len(val) - 1 and result.stride == BLOCK // 2
    nll, _ = sliding_window_nll(run.model, val, BLOCK // 2)
    assert result.loss == pytest.approx(nll.mean(), rel=1e-12)
    record = result.to_dict()
    assert record["loss"] == result.loss and record["source"] == result.source
    assert set(record) >= {"perplexity", "bits_per_byte", "tokens", "bytes", "windows"}


def test_a_run_is_evaluated_on_given_data(runs):
    run, imported, _, root = runs
    path = root / "other.txt"
    text = "a lazy dog jumps over the quick brown fox\n" * 5
    path.write_text(text)
    for each in (run, imported):  # the given data wins over the validation split
        result = evaluate_run(each, data=str(path), stride=3)
        assert result.source == str(path) and result.stride == 3
        assert result.tokens == len(text) - 1 == result.bytes
        nll, _ = sliding_window_nll(each.model, np.array(run.tokenizer.encode(text)), 3)
        assert result.loss == pytest.approx(nll.mean(), rel=1e-12)


def test_a_run_without_validation_data_is_refused(runs):
    _, imported, _, _ = runs
    with pytest.raises(MinigptError, match="has no validation split to evaluate") as err:
        evaluate_run(imported)
    assert str(imported.dir) in str(err.value) and "--data" in err.value.hint


def test_a_bad_stride_or_short_data_is_refused_for_a_run(runs):
    run, _, _, root = runs
    for stride in (0, BLOCK + 1):
        with pytest.raises(MinigptError) as err:
            evaluate_run(run, stride=stride)
        assert err.value.param == "window_stride"
    short = root / "short.txt"
    short.write_text("a")
    with pytest.raises(MinigptError, match="at least 2"):
        evaluate_run(run, data=str(short))
