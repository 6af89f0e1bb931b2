"""batches.py: random windows of the token files, seeded and resumable."""

import numpy as np
import pytest
import torch

from minigpt.batches import Batcher
from minigpt.errors import MinigptError
from minigpt.prepare import prepare

# ------------------------------------------------------------------------------------ batcher


def test_batcher_windows_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    batcher = Batcher(tokens, block_size=16, batch_size=8, seed=0)
    x, y = batcher.next()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # windows of consecutive tokens, y shifted by one
    assert torch.equal(x, x[:, :1] + torch.arange(16))
    starts = torch.cat([batcher.next()[0][:, 0] for _ in range(200)])
    assert starts.min() >= 0 and starts.max() <= 1000 - 17  # the last window ends at the last token
    assert starts.max() > 900  # and windows reach the end


def test_batcher_is_seeded_and_resumes_exactly(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 500, 5000).astype(np.uint16)
    a = Batcher(tokens, 32, 4, seed=7)
    b = Batcher(tokens, 32, 4, seed=7)
    assert all(torch.equal(a.next()[0], b.next()[0]) for _ in range(3))
    assert not torch.equal(
        Batcher(tokens, 32, 4, seed=8).next()[0], Batcher(tokens, 32, 4, seed=7).next()[0]
    )
    for _ in range(5):
        a.next()
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [a.next() for _ in range(4)]
    resumed = Batcher(tokens, 32, 4, seed=123)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for x, y in expected:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_batcher_on_prepared_memmap(tmp_path, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    prepared = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    tokens = prepared.train_tokens()
    x, y = Batcher(tokens, 64, 4, seed=0).next()
    text = prepared.tokenizer.decode(tokens.tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert prepared.tokenizer.decode(row_x) in text
        assert row_x[1:] == row_y[:-1]
    with pytest.raises(MinigptError, match="fewer than block_size \\+ 1"):
        Batcher(prepared.val_tokens(), len(prepared.val_tokens()), 4, seed=0)
