"""Loss, perplexity and bits per byte of a run on its validation split or on any text.

Text longer than the model's context is scored with the strided sliding window of
the Hugging Face perplexity guide (https://huggingface.co/docs/transformers/perplexity):
windows of block_size tokens start every `stride` tokens, and each window scores only
the tokens the previous one did not reach. With stride < block_size every token but
the first is predicted exactly once, and every one past the first window with at
least block_size - stride tokens of context; disjoint chunks (stride = block_size)
give the first tokens of each chunk almost none, overstating the loss, and cannot
predict a chunk's first token at all (the guide skips it too).

Loss and perplexity are per token, so they depend on the tokenizer: a char model's
and a BPE model's cannot be compared. Bits per byte divides the same total by the
UTF-8 bytes of the text the tokens stand for, which any two tokenizers share.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from minigpt.checkpoint import Run
from minigpt.console import progress_bar
from minigpt.corpus import AUTO_GLOB, DEFAULT_FIELD
from minigpt.data import DEFAULT_DATA_DIR, find_run_data
from minigpt.datasets import load_source
from minigpt.encode import tokenize_corpus
from minigpt.errors import MinigptError
from minigpt.model import GPT, GPTConfig
from minigpt.signals import polled
from minigpt.tokenizer import CharTokenizer, Tokenizer


@dataclass
class Evaluation:
    """What `evaluate_run` measured, and on what."""

    loss: float
    """Mean negative log-likelihood in nats per predicted token."""
    perplexity: float
    """exp(loss): the number of equally likely tokens the model is as unsure as."""
    bits_per_byte: float
    """Bits per UTF-8 byte of the predicted text (special tokens left out); NaN if it has none."""
    tokens: int
    """Predicted tokens counted in the loss."""
    bytes: int
    """UTF-8 bytes of the text those tokens stand for (0 for each special token)."""
    windows: int
    block_size: int
    stride: int
    source: str
    """What was evaluated, in words: 'validation split of <folder>' or the data path."""

    def to_dict(self) -> dict:
        """A JSON-able dict; a NaN (no bytes to count) becomes None, as strict JSON needs."""
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}


def _finite_or_none(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------------------- bytes per token


def token_byte_counts(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for, int64 (vocab_size,); 0 for special tokens
    such as <|endoftext|>, which separate documents and are no text."""
    n = tokenizer.vocab_size
    if isinstance(tokenizer, CharTokenizer):
        # surrogatepass: a lone surrogate cannot be UTF-8, but it still was a character
        sizes = [len(ch.encode("utf-8", "surrogatepass")) for ch in tokenizer.chars]
        return np.array(sizes, dtype=np.int64)
    encoding = getattr(tokenizer, "encoding", None)  # a tiktoken.Encoding, for byte-level BPE
    special = {tokenizer.eot_id}
    if encoding is not None:
        special |= {encoding.encode_single_token(s) for s in encoding.special_tokens_set}
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in special:
            continue
        try:
            if encoding is not None:
                counts[i] = len(encoding.decode_single_token_bytes(i))
            else:
                counts[i] = len(tokenizer.decode([i]).encode("utf-8", "surrogatepass"))
        except KeyError:  # an id the encoding leaves unassigned (cl100k has gaps)
            continue
    return counts


# ---------------------------------------------------------------------------- the sliding window


def check_stride(stride: int, block_size: int) -> None:
    """A window moves on by 1 to block_size tokens: more would skip tokens unscored."""
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise MinigptError(
            f"window_stride must be a whole number from 1 to block_size={block_size}, "
            f"got {stride!r}",
            hint=f"pass window_stride from 1 to {block_size}; {max(1, block_size // 2)} "
            "(half the context) is the usual choice",
            param="window_stride",  # not generate's overflow "stride": the CLI names differ
        )


def sliding_windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """The guide's windows over n tokens: (begin, end, first) of each, where the window
    feeds ids[begin:end] and scores the positions first..end-1.

    The guide masks all but the last trg_len = end - prev_end labels and the model
    shifts them by one, so position p is scored iff prev_end <= p < end and p > begin
    (the window's first token has no context in it to be predicted from).

    A model of block_size 1 predicts the next token from one token (a bigram model),
    but a window of one token has nothing in it to predict: its windows are a token and
    the one after it, of which the model reads the first (`_batch_nll`).
    """
    span = max(block_size, 2)
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + span, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def _window_batches(
    windows: list[tuple[int, int, int]], batch_size: int
) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most batch_size together: one forward
    pass each. Only the last window can be shorter than the rest."""
    batches: list[list[tuple[int, int, int]]] = []
    for window in windows:
        last = batches[-1] if batches else None
        same_length = last and last[0][1] - last[0][0] == window[1] - window[0]
        if same_length and len(last) < batch_size:
            last.append(window)
        else:
            batches.append([window])
    return batches


def _batch_nll(model: GPT, ids: Tensor, batch: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor]:
    """One forward pass over equal-length windows: (nll, target ids) of the positions
    they score, in order. ids (N,) is on the model's device."""
    device = ids.device
    begin, end, first = (torch.tensor(c, device=device)[:, None] for c in zip(*batch, strict=True))
    # a bigram window (block_size 1) is one token longer than the model reads
    length = min(batch[0][1] - batch[0][0], model.config.block_size)
    positions = begin + torch.arange(length, device=device)  # (B, T) where each input is
    x = ids[positions]  # (B, T)
    targets = positions + 1  # (B, T) the position each output predicts
    scored = (targets >= first) & (targets < end)  # (B, T)
    y = torch.where(scored, ids[targets.clamp(max=len(ids) - 1)], -1)  # (B, T), -1: not scored
    h, _ = model.run_blocks(model.embed(x))  # (B, T, n_embd)
    _, nll = model.logits_and_loss(h, y, reduction="none")  # (B, T), float32
    return nll[scored], y[scored]  # row-major: window by window, position by position


LOGITS_BYTES = 1 << 28
"""How much memory one forward pass's logits may take (256 MiB): GPT-2's 1024 x 50257
logits are 200 MB a window, so it scores one window at a time where a char model
scores dozens."""


def default_batch_size(config: GPTConfig) -> int:
    """Windows per forward pass: as many as fit LOGITS_BYTES of float32 logits, 1 to 64."""
    per_window = 4 * config.block_size * config.vocab_size
    return max(1, min(64, LOGITS_BYTES // per_window))


def sliding_window_nll(
    model: GPT,
    ids: np.ndarray | Tensor,
    stride: int,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood (float64, nats) of each token the guide's strided windows
    predict, and those tokens' ids (int64), in text order.

    With stride < block_size every position 1..N-1 is predicted exactly once; with
    stride = block_size (disjoint chunks) the first token of each chunk is not.
    batch_size: windows per forward pass (default: `default_batch_size`).
    """
    block_size = model.config.block_size
    check_stride(stride, block_size)
    batch_size = default_batch_size(model.config) if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MinigptError(
            f"batch_size must be a positive whole number, got {batch_size!r}",
            hint="pass batch_size=8, or less to use less memory",
            param="batch_size",
        )
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if not torch.is_tensor(ids) else ids)
    _check_ids(ids, model.config.vocab_size)
    ids = ids.to(model.device, torch.long)
    batches = _window_batches(sliding_windows(len(ids), block_size, stride), batch_size)
    was_training = model.training
    model.eval()  # no dropout: the same text always scores the same
    try:
        with torch.no_grad():
            batches = polled(progress_bar(batches, show=progress))  # a signal stops between two
            parts = [_batch_nll(model, ids, b) for b in batches]
    finally:
        model.train(was_training)
    nll = torch.cat([p[0] for p in parts]).double().cpu().numpy()
    targets = torch.cat([p[1] for p in parts]).cpu().numpy()
    return nll, targets


def _check_ids(ids: Tensor, vocab_size: int) -> None:
    if ids.dim() != 1:
        raise MinigptError(
            f"ids must be one sequence of token ids, got shape {tuple(ids.shape)}",
            hint="pass a 1-D array; join documents with the end-of-text id",
            param="ids",
        )
    if len(ids) < 2:
        raise MinigptError(
            f"{len(ids)} token(s) leave nothing to predict: evaluating needs at least 2",
            hint="give more text",
            param="ids",
        )
    if ids.dtype.is_floating_point or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise MinigptError(
            f"ids must be whole numbers from 0 to {vocab_size - 1}, the model's vocabulary",
            hint="the ids come from a different tokenizer",
            param="ids",
        )


# ---------------------------------------------------------------------------- a run


def evaluate_tokens(
    model: GPT,
    tokenizer: Tokenizer,
    ids: np.ndarray | Tensor,
    stride: int | None = None,
    source: str = "tokens",
    batch_size: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Loss, perplexity and bits per byte of `model` on the token ids `ids`.

    stride: default block_size // 2, the guide's choice: every token gets at least
    half a context, at twice the cost of disjoint chunks.
    """
    block_size = model.config.block_size
    stride = max(1, block_size // 2) if stride is None else stride
    check_stride(stride, block_size)
    counts = token_byte_counts(tokenizer)
    ids = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(counts)):
        raise MinigptError(
            f"{source} holds token ids outside the tokenizer's {len(counts)}",
            hint="the tokens were written by a different tokenizer",
        )
    nll, targets = sliding_window_nll(model, ids, stride, batch_size, progress)
    n_bytes = counts[targets]  # (n,) 0 for special tokens
    text = n_bytes > 0  # special tokens are no text: bits per byte leaves them out
    total_bytes = int(n_bytes.sum())
    loss = float(nll.mean())
    if not math.isfinite(loss):  # log-softmax of finite logits is finite: the weights are not
        raise MinigptError(
            f"the model's loss on {source} is {loss}: its weights hold NaN or infinity",
            hint="evaluate an earlier or the best checkpoint, or train again",
        )
    return Evaluation(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=float(nll[text].sum()) / (math.log(2) * total_bytes)
        if total_bytes
        else math.nan,
        tokens=len(nll),
        bytes=total_bytes,
        windows=len(sliding_windows(len(ids), block_size, stride)),
        block_size=block_size,
        stride=stride,
        source=source,
    )


def evaluate_run(
    run: Run,
    data: str | None = None,
    stride: int | None = None,
    *,
    data_dir: Path = DEFAULT_DATA_DIR,
    glob: str = AUTO_GLOB,
    text_field: str = DEFAULT_FIELD,
    batch_size: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Evaluate a loaded run (`checkpoint.load_run`) on its validation split, or on
    `data` (a file, a folder or a built-in dataset name; a folder's files chosen by
    `glob`, a JSONL or Parquet file's text in `text_field`), on the run's device."""
    if stride is not None:
        check_stride(stride, run.model.config.block_size)  # before any data is read
    ids, source = _tokens_to_evaluate(run, data, data_dir, glob, text_field, progress)
    if len(ids) < 2:
        raise MinigptError(
            f"{source} has {len(ids)} token(s): evaluating needs at least 2",
            hint="give more text",
        )
    return evaluate_tokens(
        run.model, run.tokenizer, ids, stride, source, batch_size=batch_size, progress=progress
    )


def _tokens_to_evaluate(
    run: Run, data: str | None, data_dir: Path, glob: str, text_field: str, progress: bool
) -> tuple[np.ndarray, str]:
    """(token ids, what they are in words): `data` tokenised by the run's tokenizer,
    else the run's prepared validation split."""
    if data is not None:
        corpus = load_source(data, Path(data_dir), glob, progress, text_field)
        return tokenize_corpus(run.tokenizer, corpus, progress=progress), str(data)
    prepared = find_run_data(run.config.get("prepared_data"), run.dir, tokenizer=run.tokenizer)
    if prepared is None:
        raise MinigptError(
            f"{run.dir} has no validation split to evaluate (it was imported, or its "
            "prepared data is gone)",
            hint="pass --data FILE or a folder",
        )
    tokens = np.asarray(prepared.val_tokens(), dtype=np.int64)
    return tokens, f"validation split of {prepared.dir}"


def describe(result: Evaluation) -> str:
    """What `minigpt eval` prints."""
    bpb = "n/a" if math.isnan(result.bits_per_byte) else f"{result.bits_per_byte:.4f}"
    return "\n".join(
        [
            f"evaluated {result.source}",
            f"  loss           {result.loss:.4f} nats/token",
            f"  perplexity     {result.perplexity:.3f}",
            f"  bits per byte  {bpb}",
            f"  tokens         {result.tokens:,} predicted ({result.bytes:,} bytes of text)",
            f"  windows        {result.windows:,} of {result.block_size} "
            f"token{'s' if result.block_size != 1 else ''}, stride {result.stride}",
        ]
    )
