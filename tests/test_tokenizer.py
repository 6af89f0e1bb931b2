"""Tokenizers: round trips, unseen characters, streaming decode, JSON, tiktoken offline."""

import base64
import errno
import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from minigpt.bpe_training import bpe_shortfall
from minigpt.errors import MinigptError
from minigpt.tokenizer import (
    CL100K_SPLIT_PATTERN,
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    HF_GPT2_SPLIT_PATTERN,
    LINE_CUT_PATTERNS,
    MAX_BPE_VOCAB_SIZE,
    O200K_SPLIT_PATTERN,
    BPETokenizer,
    CharTokenizer,
    NamedTokenizer,
    TokenizerFileDamaged,
    check_bpe_vocab_size,
    check_tokenizer_settings,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Café crème, naïve façade, smörgåsbord and jalapeño.\n"
    "def f(x):\n    return x ** 2  # squares 12345\n"
) * 40
HARD_STRINGS = [
    "",
    "hello world",
    "🎉 party 👩‍👩‍👧 family",
    "Ünïcödé äccents, 日本語, Ελληνικά, עברית",
    "tabs\tand\r\nnewlines\n\n\n",
    "<|endoftext|> is just text here",
    "\U0001f600" * 5 + "x",
]


def stream(tokenizer, ids, step=1):
    """Decode ids through the stream decoder `step` ids at a time; return each piece."""
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(decoder.flush())
    return pieces


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([CORPUS], vocab_size=320)


# ------------------------------------------------------------------------------------- char


def test_char_round_trip_and_vocab():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8
    assert tok.eot_id is None
    ids = tok.encode("world hello")
    assert tok.decode(ids) == "world hello"
    assert "".join(stream(tok, ids)) == "world hello"


def test_char_unseen_characters_name_them():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(MinigptError, match=r"2 character\(s\).*'x', 'z'"):
        tok.encode("abzx")


def test_char_fallback_is_opt_in_and_saved(tmp_path):
    tok = CharTokenizer.from_text("ab?", unknown="?")
    assert tok.decode(tok.encode("azb")) == "a?b"
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.unknown == "?"
    assert again.decode(again.encode("zz")) == "??"
    with pytest.raises(MinigptError, match="not in the vocabulary"):
        CharTokenizer(["a", "b"], unknown="?")


def test_train_tokenizer_char_from_documents():
    tok = train_tokenizer("char", ["ab", "cd\n"])
    assert tok.chars == ["\n", "a", "b", "c", "d"]
    with pytest.raises(MinigptError, match="only to the bpe"):
        train_tokenizer("char", ["ab"], vocab_size=300)
    with pytest.raises(MinigptError, match="unknown tokenizer"):
        train_tokenizer("wordpiece", ["ab"])


# -------------------------------------------------------------------------------------- bpe


def test_bpe_vocab_layout(bpe):
    assert bpe.vocab_size == 320
    assert bpe.eot_id == 319  # bytes 0..255, merges 256..318, then <|endoftext|>
    assert sorted(bpe.mergeable_ranks.values()) == list(range(319))
    assert all(bpe.mergeable_ranks[bytes([b])] == b for b in range(256))
    # merges compress the corpus it was trained on
    assert len(bpe.encode(CORPUS)) < 0.6 * len(CORPUS.encode("utf-8"))


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_bpe_round_trips_any_string(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert "".join(stream(bpe, ids)) == text
    assert "".join(stream(bpe, ids, step=3)) == text


def test_bpe_endoftext_in_text_is_not_special(bpe):
    assert bpe.eot_id not in bpe.encode(ENDOFTEXT)
    assert bpe.decode([bpe.eot_id]) == ENDOFTEXT


def test_stream_decoder_holds_back_a_split_emoji(bpe):
    ids = bpe.encode("a🎉b")
    emoji_ids = bpe.encode("🎉")
    assert len(emoji_ids) == 4  # never seen in training: one token per byte
    assert bpe.decode(emoji_ids[:2]) == "\ufffd"  # decoding a part alone would be broken
    pieces = stream(bpe, ids)
    assert pieces == ["a", "", "", "", "🎉", "b", ""]
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_flushes_a_dangling_partial_character(bpe):
    decoder = bpe.stream_decoder()
    assert decoder.push(bpe.encode("🎉")[:2]) == ""
    assert decoder.flush() == "\ufffd"  # the incomplete bytes are shown, not lost silently


def test_bpe_json_round_trip(bpe, tmp_path):
    data = bpe.to_json()
    assert data["kind"] == "bpe"
    assert data["special_tokens"] == {ENDOFTEXT: 319}
    assert base64.b64decode(data["ranks"][ord("A")]) == b"A"
    save_tokenizer(bpe, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, BPETokenizer)
    for text in HARD_STRINGS + [CORPUS[:500]]:
        assert again.encode(text) == bpe.encode(text)
    assert again.vocab_size == bpe.vocab_size and again.eot_id == bpe.eot_id


@pytest.mark.parametrize("bad_id", [320, 10**6, -1])
def test_unknown_ids_are_a_clear_error(bpe, bad_id):
    with pytest.raises(
        MinigptError, match=f"token id {bad_id} is outside the bpe vocabulary of 320"
    ):
        bpe.decode([5, bad_id])
    with pytest.raises(MinigptError, match="outside the char vocabulary"):
        CharTokenizer(["a"]).decode([bad_id])


def test_bpe_damaged_json_is_a_clear_error():
    with pytest.raises(MinigptError, match="damaged"):
        tokenizer_from_json({"kind": "bpe", "ranks": ["not base64!"]})
    with pytest.raises(MinigptError, match="ranks"):
        BPETokenizer({b"a": 0})


@pytest.mark.parametrize("vocab_size", [0, 256, 257])
def test_bpe_vocab_too_small(vocab_size):
    with pytest.raises(MinigptError, match="too small for BPE"):
        train_tokenizer("bpe", [CORPUS], vocab_size)


@pytest.mark.parametrize(
    "texts, chars",
    [
        (["a"], "1 character"),
        (["x\ny\n7\n"], "6 characters"),  # one-byte pieces under the split: no pair at all
    ],
)
def test_bpe_that_learns_no_merge_is_refused_naming_its_sample(texts, chars):
    with pytest.raises(MinigptError, match=f"no merges: its sample of {chars} has no pair") as err:
        BPETokenizer.train(texts, vocab_size=300)
    assert err.value.param == "bpe_sample_chars" and "bpe_sample_chars" in err.value.hint


def test_bpe_learns_what_pairs_there_are_and_says_how_many_it_lacks():
    tok = BPETokenizer.train(["abcdefg"], vocab_size=1000)
    assert tok.vocab_size == 256 + 6 + 1  # ab cd ef abcd efg abcdefg, and <|endoftext|>
    assert bpe_shortfall(1000, tok.vocab_size) == (
        "bpe learned 263 of the 1,000 tokens asked: "
        "its sample of the corpus has no more pairs to merge"
    )
    assert bpe_shortfall(263, 263) is None


def test_train_tokenizer_bpe_defaults_to_2048():
    tok = train_tokenizer("bpe", [CORPUS * 5])
    # the tiny corpus runs out of pairs before 2048, but the request was for 2048
    assert 300 < tok.vocab_size <= 2048


# A Ctrl-C can land while rustbpe itself calls into Python: here, inside pyo3-log's first
# logging.getLogger, where a raising handler would leave "SystemError: ... returned a
# result with an exception set" and a traceback. Each case runs in a fresh process, since
# pyo3-log looks the logger up once per process.
SIGNAL_IN_RUSTBPE = """
import logging, os, signal, sys
from minigpt.tokenizer import BPETokenizer

class Stop(Exception):
    pass

def handler(signum, frame):
    raise Stop()

signal.signal(signal.SIGINT, handler)
real_get_logger = logging.getLogger

def get_logger(name=None):
    if sys.argv[1] == "logger" and name and name.startswith("rustbpe"):
        os.kill(os.getpid(), signal.SIGINT)
    return real_get_logger(name)

logging.getLogger = get_logger

def texts():
    for i in range(50):
        if sys.argv[1] == "iterator" and i == 10:
            os.kill(os.getpid(), signal.SIGINT)
        yield f"line {i} of a corpus, word{i % 7}\\n" * 2000

try:
    BPETokenizer.train(texts(), 300)
except Stop:
    print("stopped")
else:
    print("finished")
print(signal.getsignal(signal.SIGINT) is handler)
"""


@pytest.mark.parametrize("where", ["logger", "iterator"])
def test_a_signal_while_rustbpe_trains_runs_its_handler_once(where):
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_RUSTBPE, where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.split() == ["stopped", "True"]  # stopped, and the handler is back


def test_unknown_kind_in_json():
    with pytest.raises(MinigptError, match="unknown tokenizer kind"):
        tokenizer_from_json({"kind": "sentencepiece"})


# ------------------------------------------------------------------- named tiktoken encodings

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture
def fresh_tiktoken(monkeypatch, tmp_path):
    """tiktoken with an empty in-process registry and its cache in tmp_path."""
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails (and is recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is blocked in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_named_encoding_from_cache(fresh_tiktoken, no_network, monkeypatch):
    # A tiny stand-in ranks file (256 bytes + 2 merges) under the name tiktoken looks for:
    # sha1 of the blob URL. tiktoken also checks the real file's sha256, which a stand-in
    # cannot match, so that one check is told to pass.
    ranks = {bytes([b]): b for b in range(256)} | {b"he": 256, b"hel": 257}
    lines = [base64.b64encode(token) + b" %d" % rank for token, rank in ranks.items()]
    cache_name = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    (fresh_tiktoken / cache_name).write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setattr(tiktoken.load, "check_hash", lambda data, expected: True)

    tok = NamedTokenizer("cl100k_base")
    assert tok.kind == "cl100k_base"
    ids = tok.encode("hello 🎉")
    assert ids[0] == 257  # "hel" merged
    assert tok.decode(ids) == "hello 🎉"
    assert "".join(stream(tok, ids)) == "hello 🎉"
    assert tok.eot_id == 100257 and tok.vocab_size == 100277
    assert tok.to_json() == {"kind": "cl100k_base"}
    assert tokenizer_from_json({"kind": "cl100k_base"}).encode("hello") == tok.encode("hello")
    assert no_network == []


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_named_encoding_offline_is_one_sentence(fresh_tiktoken, no_network, name):
    with pytest.raises(MinigptError) as err:
        NamedTokenizer(name)
    message = str(err.value)
    assert name in message and "not in tiktoken's cache" in message
    assert "char" in message and "bpe" in message
    assert "\n" not in message
    assert no_network  # it did try, and the attempt was refused before any socket opened
    assert list(fresh_tiktoken.iterdir()) == []


# ------------------------------------------------------------- tokenizer files from elsewhere


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "char"}, "'chars' is not a non-empty list"),
        ({"kind": "char", "chars": 5}, "'chars' is not a non-empty list"),
        ({"kind": "char", "chars": "abc"}, "'chars' is not a non-empty list"),
        ({"kind": "char", "chars": []}, "'chars' is not a non-empty list"),
        ({"kind": "char", "chars": ["a", 5]}, "holds 5, which is not one character"),
        ({"kind": "char", "chars": ["a", None]}, "holds None, which is not one character"),
        ({"kind": "char", "chars": ["a", "bc"]}, "holds 'bc', which is not one character"),
        ({"kind": "char", "chars": ["a", "\ud800"]}, "which is not one character"),
        ({"kind": "char", "chars": ["a", "b", "a"]}, "holds 'a' twice"),
        ({"kind": "char", "chars": ["a"], "unknown": 5}, "'unknown' 5 is not one of"),
        ({"kind": "char", "chars": ["a"], "unknown": "ab"}, "'unknown' 'ab' is not one of"),
        ({"kind": "char", "chars": ["a"], "unknown": "z"}, "'unknown' 'z' is not one of"),
        ({"kind": "bpe", "ranks": "AAEC", "pattern": "x"}, "'ranks' is not a list"),
        ({"kind": "bpe", "ranks": {"AA==": 0}, "pattern": "x"}, "'ranks' is not a list"),
        ({"kind": "bpe", "ranks": [5], "pattern": "x"}, "'ranks' is not a list"),
        ({"kind": "bpe", "ranks": ["QQ==junk"], "pattern": "x"}, "is not base64"),
        ({"kind": "bpe", "ranks": ["AA=="]}, "'pattern' is not a string"),
        ({"kind": "bpe", "ranks": ["AA=="], "pattern": 5}, "'pattern' is not a string"),
        ([1, 2], "is not a JSON object"),
        ("char", "is not a JSON object"),
        (None, "is not a JSON object"),
    ],
)
def test_damaged_tokenizer_json_is_one_sentence(data, message):
    with pytest.raises(TokenizerFileDamaged, match=message) as err:
        tokenizer_from_json(data)
    assert str(err.value).startswith("tokenizer.json is damaged: ")


def byte_ranks() -> list[str]:
    return [base64.b64encode(bytes([b])).decode() for b in range(256)]


@pytest.mark.parametrize(
    "ranks, pattern, message",
    [
        (byte_ranks()[1:] + [base64.b64encode(b"ab").decode()], r"\s+|\S+", "all 256 bytes"),
        (byte_ranks() + [byte_ranks()[65]], r"\s+|\S+", "not the ids 0..n-1"),
        (byte_ranks() + [""], r"\s+|\S+", "not the ids 0..n-1"),
        (byte_ranks(), "(", "'pattern' does not compile"),
    ],
)
def test_damaged_bpe_ranks_are_refused_on_load(ranks, pattern, message):
    # a missing byte is the dangerous one: tiktoken panics when it meets that byte
    with pytest.raises(TokenizerFileDamaged, match=message):
        tokenizer_from_json({"kind": "bpe", "ranks": ranks, "pattern": pattern})


def test_load_tokenizer_names_the_file_and_why(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"kind": "char", "chars": 5}')
    with pytest.raises(MinigptError, match=f"{path} is damaged: its char 'chars'"):
        load_tokenizer(path)
    path.write_text("[" * 100_000)  # deep enough to overflow json's parser
    with pytest.raises(MinigptError, match=f"{path} is not valid JSON"):
        load_tokenizer(path)
    path.write_text("[]")
    with pytest.raises(MinigptError, match="is damaged: it is not a JSON object"):
        load_tokenizer(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(MinigptError, match=f"cannot read {path}: Is a directory") as err:
        load_tokenizer(path)
    assert err.value.hint
    path.rmdir()
    save_tokenizer(CharTokenizer.from_text("abc"), path)

    def refuse(self, *args, **kwargs):  # tests run as root, so chmod cannot refuse
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(MinigptError, match=f"cannot read {path}: Permission denied") as err:
        load_tokenizer(path)
    assert "permission" in err.value.hint
    monkeypatch.undo()
    with pytest.raises(MinigptError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")


@pytest.mark.parametrize("vocab_size", [MAX_BPE_VOCAB_SIZE + 1, 10_000_000_000, 2**64])
def test_bpe_vocab_too_large(vocab_size):
    with pytest.raises(MinigptError, match="too large for BPE, whose most is 1,048,576") as err:
        check_tokenizer_settings("bpe", vocab_size)
    assert err.value.param == "vocab_size"


def test_bpe_vocab_size_limits():
    assert MAX_BPE_VOCAB_SIZE == 2**20
    assert check_tokenizer_settings("bpe", MAX_BPE_VOCAB_SIZE) == MAX_BPE_VOCAB_SIZE
    for bad in (3.5, "2048", True, None):
        with pytest.raises(MinigptError, match="whole number"):
            check_bpe_vocab_size(bad)


# ------------------------------------------------------------------ tokenising corpora in pieces

# what a line start can look like: letters of many scripts, digits, marks, punctuation that
# o200k glues to newlines ("/"), contractions, carriage returns, runs of spaces and tabs
FUZZ_ATOMS = [
    "the", "The", "cat", "don't", "I'm", "caf\u00e9", "e\u0301", "\u4e2d\u6587", "\u0645\u0631",
    "\u00b2", "42", "1234567", "x=1;", "/usr", "//", "(", ".", "...", "!", "'", "'s",
    " ", "  ", "\t", "\n", "\n", "\n", "\n\n", " \n", "\r\n", "\r", "\U0001f600", "\u200d",
]  # fmt: skip


def fuzz_texts(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ATOMS) for _ in range(rng.randint(1, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def line_cut_tokenizers() -> dict[str, BPETokenizer]:
    """A small BPE's merges under every split that cut_point trusts, and one it does not."""
    ranks = BPETokenizer.train([CORPUS, *fuzz_texts(200, seed=1)], vocab_size=400).mergeable_ranks
    patterns = {
        "gpt4": GPT4_SPLIT_PATTERN,
        "gpt2": GPT2_SPLIT_PATTERN,
        "hf-gpt2": HF_GPT2_SPLIT_PATTERN,
        "cl100k": CL100K_SPLIT_PATTERN,
        "o200k": O200K_SPLIT_PATTERN,
        "unknown": r"""[^\n]+|\n""",
    }
    return {name: BPETokenizer(ranks, pattern) for name, pattern in patterns.items()}


@pytest.mark.parametrize("name", ["gpt4", "gpt2", "hf-gpt2", "cl100k", "o200k"])
def test_text_cut_where_cut_point_says_encodes_as_the_whole(line_cut_tokenizers, name):
    tok = line_cut_tokenizers[name]
    assert tok.pattern in LINE_CUT_PATTERNS
    cuts = 0
    for text in fuzz_texts(300):
        whole = tok.encode(text)
        start = 1
        while (at := tok.cut_point(text, start)) is not None:
            assert at >= start and text[at - 1] == "\n"
            assert tok.encode(text[:at]) + tok.encode(text[at:]) == whole, (text, at)
            cuts, start = cuts + 1, at + 1
    assert cuts > 300  # the fuzz reaches many line starts


def test_cut_point_never_cuts_under_a_split_it_does_not_know(line_cut_tokenizers):
    tok = line_cut_tokenizers["unknown"]
    assert tok.cut_point("one line\ntwo lines\n" * 10, 1) is None
    char = CharTokenizer(sorted(set("abc\n")))
    assert char.cut_point("abc\nabc", 2) == 2 and char.cut_point("ab", 2) is None


def test_encode_array_is_encode(bpe):
    char = CharTokenizer.from_text(CORPUS + "".join(HARD_STRINGS))
    for tok in (bpe, char):
        for text in [CORPUS, *HARD_STRINGS]:
            ids = tok.encode_array(text)
            assert ids.tolist() == tok.encode(text) and ids.ndim == 1
    fallback = CharTokenizer(list("ab?"), unknown="?")
    assert fallback.encode_array("abz\U0001f600").tolist() == fallback.encode("abz\U0001f600")
    with pytest.raises(MinigptError, match="never saw: 'z'"):
        CharTokenizer(list("ab")).encode_array("abz")


def test_a_copy_for_each_thread_encodes_the_same_with_its_own_encoding(bpe):
    clone = bpe.for_thread()
    assert clone.encoding is not bpe.encoding and clone.to_json() == bpe.to_json()
    for text in [CORPUS, *HARD_STRINGS]:
        assert clone.encode_array(text).tolist() == bpe.encode(text)
    char = CharTokenizer(list("ab"))
    assert char.for_thread() is char  # nothing in it that threads hold up
