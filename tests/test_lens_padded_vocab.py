"""The logit lens of a model whose vocabulary is padded past its tokenizer's
(e.g. 50304 rows for GPT-2's 50257 tokens): only the tokenizer's ids are predictions."""

import pytest
import torch

from minigpt.errors import MinigptError
from minigpt.lens import logit_lens
from minigpt.tokenizer import CharTokenizer


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
