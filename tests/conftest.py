"""Shared test helpers: the command line in-process and as a subprocess, a tiny GPT, the
trainer tests' tiny corpus and settings, GPT-2-format tokenizer files built offline, a
random GPT-2 checkpoint (and its import), and a GPT's forward pass written out by hand.

Test modules share helpers only through the fixtures here (no test module imports
another); process-level helpers are in tests/e2e/conftest.py.
"""

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import regex

from minigpt.hf_tokenizer import bytes_to_unicode
from minigpt.tokenizer import ENDOFTEXT


@pytest.fixture
def minigpt_cli(monkeypatch, capsys):
    """Run `minigpt ARGS` in-process through cli.main: (exit code, stdout, stderr)."""
    from minigpt import cli

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["minigpt", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def run_minigpt():
    """Run `python -m minigpt ARGS` in a subprocess, capturing its output as text."""

    def run(*args, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "minigpt", *map(str, args)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


# --------------------------------------------------------------------------- corpora for the data tests


@pytest.fixture(scope="session")
def make_text():
    """make_text(n_lines=400, extra=""): a small corpus of numbered lines, `extra` at its end."""

    def make(n_lines: int = 400, extra: str = "") -> str:
        lines = [f"line {i}: the cat sat on mat number {i * 7 % 13}.\n" for i in range(n_lines)]
        return "".join(lines) + extra

    return make


@pytest.fixture(scope="session")
def listing():
    """listing(folder): every path under `folder`, relative to it, sorted."""

    def paths(folder) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))

    return paths


@pytest.fixture(scope="session")
def assert_nothing_written(listing):
    """assert_nothing_written(data_dir): nothing in data_dir, hidden or not (or no data_dir)."""

    def check(data_dir) -> None:
        assert not data_dir.exists() or listing(data_dir) == []

    return check


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures(...)`):
    tiny models gain nothing from threads, and on a busy machine threads fight."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_gpt():
    """Build a small GPT in eval mode from torch.manual_seed(seed): the same weights every time."""
    import torch

    from minigpt.model import GPT, GPTConfig

    def build(
        vocab_size, block_size=16, *, seed=0, n_layer=2, n_head=2, n_embd=32, **overrides
    ) -> GPT:
        torch.manual_seed(seed)
        config = dict(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            bias=True,
        )
        return GPT(GPTConfig(**{**config, **overrides})).eval()

    return build


# --------------------------------------------------------------------------- the trainer's tiny run

TINY_TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
) * 40

TINY_SETS = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "model.block_size=16",
    "train.batch_size=4",
    "train.eval_iters=2",
    "train.log_interval=1",
    "train.warmup_iters=2",
    "train.lr=1e-2",
    "train.min_lr=1e-3",
    "train.device=cpu",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def tiny(tiny_gpt):
    """A small GPT over lowercase letters, space and newline, and its char tokenizer:
    what the head inspector's tests look inside."""
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz \n")
    return tiny_gpt(tokenizer.vocab_size, block_size=32, n_head=3, n_embd=24), tokenizer


@pytest.fixture(scope="session")
def tiny_train():
    """The trainer tests' tiny corpus (`text`) and `--set` list (`sets`), and `losses(run_dir)`:
    the (step, loss) pairs a run logged."""
    from minigpt import checkpoint

    def losses(run_dir) -> list[tuple[int, float]]:
        return list(checkpoint.iter_losses(run_dir))

    return SimpleNamespace(text=TINY_TEXT, sets=list(TINY_SETS), losses=losses)


@pytest.fixture(scope="module")
def tiny_train_data():
    """The tiny corpus as the trainer takes it in memory: char tokens, a 90/10 split."""
    import numpy as np

    from minigpt import train as trainer
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(TINY_TEXT)
    ids = np.array(tokenizer.encode(TINY_TEXT), dtype=np.uint16)
    split = int(0.9 * len(ids))
    return trainer.TrainData(tokenizer, ids[:split], ids[split:])


# --------------------------------------------------------------------------- GPT-2 files
# Tiny GPT-2-format tokenizers built offline, for tests that compare minigpt with Hugging
# Face. `write_vocab` learns a few merges from a corpus with textbook BPE (merge the most
# frequent adjacent pair, over GPT-2 pre-tokenized words) and writes `vocab.json` +
# `merges.txt` laid out as GPT-2's are. `reference_encoder` is the GPT-2 release's
# encoder.py (merges applied by pair rank, in pure Python with `regex`): a third
# implementation, independent of both tiktoken and Hugging Face `tokenizers`. `regex` is a
# dependency of tiktoken, so nothing here needs transformers. bench/hf.py builds its
# checkpoints' vocabularies with write_gpt2_vocab and GPT2_CORPUS too.


@pytest.fixture(scope="session")
def gpt2_files():
    """`hard_texts`, `corpus`, `write_vocab(folder, corpus, n_merges)` -> vocab size, and
    `reference_encoder(folder)` -> encode function."""
    return SimpleNamespace(
        hard_texts=list(_HARD_TEXTS),
        corpus=GPT2_CORPUS,
        write_vocab=write_gpt2_vocab,
        reference_encoder=_gpt2_reference_encoder,
    )


# GPT-2's split exactly as its release (and Hugging Face's ByteLevel) writes it
_GPT2_RELEASE_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

_HARD_TEXTS = [
    "",
    "Hello world",
    " Hello  world ",
    "🎉 party 👩‍👩‍👧 family 🇫🇷🇯🇵 flags 👍🏽",
    "日本語のテキスト、中文，한국어",
    "Café crème, naïve façade, smörgåsbord — jalapeño",
    "e\u0301 combining, ﬁ ligature, Ελληνικά, עברית, العربية",
    "runs    of     spaces",
    "tabs\tand\t\ttabs",
    "\n\n\n",
    "trailing spaces   ",
    " \n ",
    "line\r\nwindows\r\n",
    "I'll say don't, it's John's; we've I'm you'd they're",
    "I'LL DON'T 'S 'll",
    "digits 12345 and 3.14159, 1,000,000",
    "mixed!?... punctuation;; (brackets) [x] {y} <z> --> ~~~ @#$%^&*",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "hello <|endoftext|> world <|endoftext|><|endoftext|>",
    "<|endoftext|> is just text here",
    "def f(x):\n    return x ** 2  # squares\n",
    "\u00a0non-breaking\u2003em space\u3000ideographic\u200bzero width",
    "\u0085next line\u2028line sep\u2029para sep\x0bvt\x0cff",
    "mañana 🤷‍♀️ 123abc abc123 ½ ² Ⅻ ٣",
]
"""Strings where tokenizers tend to disagree: emoji (ZWJ sequences, flags, skin tones), CJK,
combining accents, unusual whitespace, contractions, digits, punctuation and <|endoftext|>."""

GPT2_CORPUS = (
    "The quick brown fox jumps over the lazy dog. I'll say it's the dog's day, don't you think?\n"
    "Café crème, naïve façade, smörgåsbord and jalapeño. 日本語のテキスト 🎉🎉\n"
    "def f(x):\n    return x ** 2  # squares 12345 12345\n\n"
) * 20


def _learn_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """GPT-2-style BPE training: count adjacent pairs over the pre-tokenized words and merge
    the most frequent, `n_merges` times (ties go to the smallest pair, so it is deterministic).
    Tokens are strings in GPT-2's byte alphabet (bytes_to_unicode)."""
    byte_char = bytes_to_unicode()
    words = Counter(
        tuple(byte_char[b] for b in word.encode("utf-8"))
        for word in regex.findall(_GPT2_RELEASE_PATTERN, corpus)
    )
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge_word(word, best): count for word, count in words.items()})
    return merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_gpt2_vocab(folder: Path, corpus: str, n_merges: int = 60) -> int:
    """Write vocab.json and merges.txt as GPT-2 lays them out (ids 0..255 the bytes in
    bytes_to_unicode order, then one id per merge in order, then <|endoftext|>); return the
    vocab size (merges + 257)."""
    merges = _learn_merges(corpus, n_merges)
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[ENDOFTEXT] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def _gpt2_reference_encoder(folder: Path) -> Callable[[str], list[int]]:
    """The GPT-2 release's encoder.py over vocab.json + merges.txt in `folder`: for each
    pre-tokenized word, join every occurrence of the adjacent pair that comes first in
    merges.txt until none is left. Ordinary text only (no special tokens)."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merge_rank = {tuple(line.split(" ")): i for i, line in enumerate(lines) if line}
    byte_char = bytes_to_unicode()

    def encode_word(word: tuple[str, ...]) -> list[int]:
        while len(word) > 1:
            pair = min(zip(word, word[1:], strict=False), key=lambda p: merge_rank.get(p, 1e18))
            if pair not in merge_rank:
                break
            word = _merge_word(word, pair)
        return [vocab[part] for part in word]

    def encode(text: str) -> list[int]:
        words = regex.findall(_GPT2_RELEASE_PATTERN, text)
        return [i for w in words for i in encode_word(tuple(byte_char[b] for b in w.encode()))]

    return encode


# --------------------------------------------------------------------------- a random GPT-2
# A small GPT-2 with random weights (every parameter random, LayerNorms and biases
# included, so a misplaced transpose or a dropped bias shows) and a byte-level
# vocabulary learned from GPT2_TEXT, saved with transformers' `save_pretrained`; and the
# run directory `minigpt import` makes of it. Nothing is downloaded.

GPT2_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy "
    "to the people.\n\n"
)


@pytest.fixture(scope="session")
def gpt2_text():
    """The text the random GPT-2's vocabulary is learned from: its tokens are few and long."""
    return GPT2_TEXT


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, gpt2_files):
    """A GPT-2 checkpoint folder as save_pretrained writes it: 3 layers, 4 heads, 48 wide,
    64 positions, random weights."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder = tmp_path_factory.mktemp("gpt2")
    vocab_size = gpt2_files.write_vocab(folder, GPT2_TEXT * 4, n_merges=80)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=48,
        n_layer=3,
        n_head=4,
        layer_norm_epsilon=1e-4,  # not the default: the option must be carried over
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "ln" in name and name.endswith("weight") else 0.0
            param.copy_(base + 0.15 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_model(gpt2_dir):
    """transformers' GPT2LMHeadModel loaded from gpt2_dir, in eval mode."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


@pytest.fixture(scope="session")
def imported(gpt2_dir, tmp_path_factory):
    """The run directory `minigpt import` makes of gpt2_dir."""
    from minigpt import hf

    run_dir = tmp_path_factory.mktemp("runs") / "gpt2"
    hf.import_checkpoint(str(gpt2_dir), run_dir)
    return run_dir


# --------------------------------------------------------------------------- a GPT by hand
# The forward pass of minigpt's GPT written out again from its state dict, in float64,
# with none of minigpt's forward code: the independent computation the circuit tests
# (logit lens, attribution, patching) compare with. Every option of the model's shape
# is here (RMSNorm, rotary positions, grouped-query attention, QK-norm, SwiGLU).

CIRCUIT_SHAPES = {
    "gpt2": {},  # learned positions, LayerNorm with biases, GELU MLP
    "no-bias": {"bias": False},  # minigpt's default: no bias anywhere
    "rmsnorm": {"norm": "rmsnorm"},
    "modern": {
        "position": "rope",
        "n_kv_head": 2,
        "qk_norm": True,
        "mlp": "swiglu",
        "norm": "rmsnorm",
    },
    "wrapper": {"attention": "wrapper", "activation": "gelu_tanh"},
}


@pytest.fixture(scope="session")
def hand_gpt():
    """`forward(model, idx, ...)`: the GPT's forward pass by hand (`_hand_forward`);
    `randomise(model)`: every weight random, norm gains and biases included, so a
    dropped bias or a misread gain shows."""
    return SimpleNamespace(forward=_hand_forward, randomise=_randomise)


@pytest.fixture(scope="module", params=list(CIRCUIT_SHAPES))
def circuit_gpt(request, tiny_gpt):
    """(model, tokenizer): a randomised 2-layer, 4-head GPT of each shape in
    CIRCUIT_SHAPES over a char vocabulary of 16 letters."""
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("abcdefghijklmnop")
    model = tiny_gpt(
        tokenizer.vocab_size, 16, n_layer=2, n_head=4, n_embd=32, **CIRCUIT_SHAPES[request.param]
    )
    return _randomise(model), tokenizer


def _randomise(model, std: float = 0.25):
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            gain = name.endswith("weight") and param.dim() == 1  # a norm's gain
            param.copy_(float(gain) + std * torch.randn_like(param))
    return model


def _hand_forward(model, idx, z=None, mlps=None, resid=None) -> SimpleNamespace:
    """The forward pass of `model` over token ids idx (T,), from its state dict, in float64.

    Returns resid (L + 1, T, C): the stream entering each layer, then after the last
    block; z (L, T, H, d_head): each head's context; heads (L, T, H, C): each head's
    W^O_h z_h; mlps (L, T, C): each MLP's output; lens (L + 1, T, vocab): each
    stream through the final norm and the tied head; logits (T, vocab): the last of them.
    Patches, each replacing what the pass computes there: z {(layer, head): (T, d_head)},
    mlps {layer: (T, C)}, resid {(layer, position): (C,)} (the stream entering layer).
    """
    import torch

    c = model.config
    w = {name: t.double() for name, t in model.state_dict().items()}
    T, H, H_kv, d = idx.numel(), c.n_head, c.kv_heads, c.d_head
    x = w["tok_emb.weight"][idx]  # (T, C)
    if c.position == "learned":
        x = x + w["pos_emb.weight"][:T]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)  # no future
    streams, contexts, heads, mlp_outs = [], [], [], []
    for layer in range(c.n_layer):
        p = f"blocks.{layer}."
        x = x.clone()
        for (at, position), value in (resid or {}).items():
            if at == layer:
                x[position] = value
        streams.append(x)
        q, k, v = _linear(w, p + "attn.qkv", _norm(c, w, p + "ln_attn", x)).split(
            [H * d, H_kv * d, H_kv * d], dim=-1
        )
        q = q.view(T, H, d).transpose(0, 1)  # (H, T, d)
        k, v = (t.view(T, H_kv, d).transpose(0, 1).repeat_interleave(H // H_kv, 0) for t in (k, v))
        if c.qk_norm:
            q = _rms(q, c.layer_norm_eps) * w[p + "attn.q_norm.weight"]
            k = _rms(k, c.layer_norm_eps) * w[p + "attn.k_norm.weight"]
        if c.position == "rope":
            q, k = _rotate(q, c.rope_theta), _rotate(k, c.rope_theta)
        att = torch.softmax(q @ k.transpose(1, 2) / d**0.5 + mask, dim=-1)  # (H, T, T)
        ctx = (att @ v).transpose(0, 1).clone()  # (T, H, d)
        for (at, head), value in (z or {}).items():
            if at == layer:
                ctx[:, head] = value
        W_O = w[p + "attn.out_proj.weight"].view(-1, H, d)  # (C, H, d)
        out = torch.einsum("thd,chd->thc", ctx, W_O)  # (T, H, C)
        x = x + out.sum(1) + w.get(p + "attn.out_proj.bias", 0.0)
        mlp = (mlps or {}).get(layer, _mlp(c, w, p, _norm(c, w, p + "ln_mlp", x)))
        x = x + mlp
        contexts.append(ctx)
        heads.append(out)
        mlp_outs.append(mlp)
    streams.append(x)
    resid = torch.stack(streams)
    lens = _norm(c, w, "ln_f", resid) @ w["tok_emb.weight"].T  # the tied head: (L + 1, T, V)
    return SimpleNamespace(
        resid=resid, z=torch.stack(contexts), heads=torch.stack(heads),
        mlps=torch.stack(mlp_outs), lens=lens, logits=lens[-1],
    )  # fmt: skip


def _linear(w, name, x):
    return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)


def _rms(x, eps):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _norm(c, w, name, x):
    """LayerNorm or RMSNorm over the last dimension, eps the model's."""
    if c.norm == "rmsnorm":
        return _rms(x, c.layer_norm_eps) * w[name + ".weight"]
    centered = x - x.mean(-1, keepdim=True)
    std = (centered.pow(2).mean(-1, keepdim=True) + c.layer_norm_eps).sqrt()
    return centered / std * w[name + ".weight"] + w.get(name + ".bias", 0.0)


def _rotate(x, theta):
    """Rotary positions: feature pair (i, i + d/2) of x (H, T, d) turned by t * theta^(-2i/d)."""
    import torch

    T, d = x.shape[-2:]
    freq = theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, d / 2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1)


def _mlp(c, w, p, x):
    """GELU MLP (exact, or GPT-2's tanh approximation) or SwiGLU, by their formulas."""
    import math

    import torch

    if c.mlp == "swiglu":
        gate = _linear(w, p + "mlp.fc_gate", x)
        hidden = gate * torch.sigmoid(gate) * _linear(w, p + "mlp.fc_up", x)
    else:
        a = _linear(w, p + "mlp.fc", x)
        if c.activation == "gelu_tanh":
            hidden = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
        else:
            hidden = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    return _linear(w, p + "mlp.proj", hidden)
