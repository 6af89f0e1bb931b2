"""Hugging Face tokenizer files: minigpt gives transformers' ids, both ways, or refuses.

Everything is built offline: a tiny GPT-2-format vocab learned by the `gpt2_files` fixture, and
minigpt's own BPE. transformers (a test-only dependency) is the judge of what HF does.
"""

import json
import random
import shutil
from pathlib import Path

import pytest

from minigpt.errors import MinigptError
from minigpt.hf_tokenizer import (
    GPT2_SPLIT_PATTERN,
    HF_GPT2_SPLIT_PATTERN,
    bytes_to_unicode,
    recover_merges,
    tokenizer_from_hf,
    write_hf_tokenizer,
)
from minigpt.tokenizer import ENDOFTEXT, GPT4_SPLIT_PATTERN, BPETokenizer, CharTokenizer

# characters that stress the split: exotic whitespace and digits, letters of every case,
# combining marks, emoji sequences, controls, private use, <|endoftext|> itself
FUZZ_POOL = [
    *"aab bc  \n\n\t\r'sltdmrevSLT1234567890.,!?;:-_()[]<>|\"`~@#$%^&*/\\",
    *"\u00a0\u2003\u3000\u200b\u0085\u2028\x0b\x0c\u1680\u180e\ufeff\x00\x7f\ue000",
    *"０٣½²Ⅻ\u06f1\U00010140ǅʰ\u0345ᛮé",
    "e\u0301", "日本", "한", "🎉", "👩‍👩‍👧", "🇫🇷", ENDOFTEXT, "'ll", "'S", "\U000e0041",
]  # fmt: skip


def fuzz_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(FUZZ_POOL, k=rng.randint(0, 24))) for _ in range(n)]


@pytest.fixture(scope="module")
def transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, gpt2_files) -> Path:
    """vocab.json + merges.txt of a tiny GPT-2-format tokenizer (200 merges)."""
    folder = tmp_path_factory.mktemp("gpt2")
    corpus = gpt2_files.corpus + "".join(gpt2_files.hard_texts) + "".join(fuzz_texts(500, seed=1))
    assert gpt2_files.write_vocab(folder, corpus, n_merges=200) == 256 + 200 + 1
    return folder


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_dir) -> BPETokenizer:
    return tokenizer_from_hf(gpt2_dir)


@pytest.fixture(scope="module")
def gpt4_tok(gpt2_files) -> BPETokenizer:
    """minigpt's own BPE (rustbpe, GPT-4 split)."""
    return BPETokenizer.train(
        [gpt2_files.corpus, *gpt2_files.hard_texts, *fuzz_texts(500, seed=2)], vocab_size=600
    )


def assert_same_ids(tok: BPETokenizer, hf_tokenizer, texts: list[str]) -> None:
    """Same ids as HF (which reads <|endoftext|> as special, as encode_prompt does), and
    both decode the ids to the same text."""
    for text in texts:
        ids = tok.encode_prompt(text)
        assert ids == hf_tokenizer(text)["input_ids"], repr(text)
        assert tok.decode(ids) == hf_tokenizer.decode(ids) == text, repr(text)


# ------------------------------------------------------------------------- the split pattern


def test_split_pattern_is_tiktokens_gpt2_pattern():
    """Ours is tiktoken's own form of GPT-2's split (its r50k/gpt2 encodings use it)."""
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert GPT2_SPLIT_PATTERN == openai_public.r50k_pat_str


def test_split_pattern_splits_as_the_release_pattern(gpt2_files):
    """tiktoken cuts text with GPT2_SPLIT_PATTERN where the `regex` module cuts it with the
    release's pattern. With every piece in the vocab tiktoken emits each piece as one token
    (it looks a whole piece up before merging), so its tokens are its pieces."""
    import regex

    texts = gpt2_files.hard_texts + fuzz_texts(300, seed=3)
    for text in texts:
        text = text.replace(ENDOFTEXT, "")
        pieces = regex.findall(HF_GPT2_SPLIT_PATTERN, text)
        assert "".join(pieces) == text
        ranks = {bytes([b]): b for b in range(256)}
        for piece in pieces:  # each whole piece a token: tiktoken then emits one id per piece
            ranks.setdefault(piece.encode(), len(ranks))
        tok = BPETokenizer(ranks, GPT2_SPLIT_PATTERN)
        got = [tok.token_bytes([i]).decode() for i in tok.encode(text)]
        assert got == pieces, repr(text)


def test_bytes_to_unicode_is_gpt2s_map():
    byte_char = bytes_to_unicode()
    assert sorted(byte_char) == list(range(256))
    assert len(set(byte_char.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in byte_char.values())
    assert byte_char[ord(" ")] == "Ġ" and byte_char[ord("\n")] == "Ċ" and byte_char[0] == "Ā"
    assert byte_char[ord("A")] == "A" and byte_char[0xE9] == "é"
    assert list(byte_char.values())[:3] == ["!", '"', "#"]  # GPT-2's ids 0, 1, 2


# ------------------------------------------------------------------------------------ import


def test_gpt2_files_give_transformers_ids(gpt2_dir, gpt2_tok, transformers, gpt2_files):
    slow = transformers.GPT2Tokenizer(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    fast = transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir)
    assert gpt2_tok.vocab_size == len(fast) == 457 and gpt2_tok.eot_id == 456
    assert_same_ids(gpt2_tok, slow, gpt2_files.hard_texts)
    assert_same_ids(gpt2_tok, fast, gpt2_files.hard_texts + fuzz_texts(1000))


def test_gpt2_files_give_the_release_encoders_ids(gpt2_dir, gpt2_tok, gpt2_files):
    """A third implementation (pair-rank BPE and the `regex` module) agrees, no HF needed."""
    reference = gpt2_files.reference_encoder(gpt2_dir)
    for text in gpt2_files.hard_texts + fuzz_texts(300, seed=4):
        assert gpt2_tok.encode(text) == reference(text), repr(text)


def test_tokenizer_json_written_by_transformers(
    gpt2_dir, gpt2_tok, tmp_path, transformers, gpt2_files
):
    fast = transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir)
    fast.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):  # older transformers write these too
        (tmp_path / name).unlink(missing_ok=True)
    tok = tokenizer_from_hf(tmp_path)
    assert tok.to_json() == gpt2_tok.to_json()
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_ids(tok, reloaded, gpt2_files.hard_texts)


@pytest.mark.parametrize("form", ["strings", "lists"])
def test_tokenizer_json_merges_in_either_form(gpt2_tok, tmp_path, form):
    """tokenizers < 0.20 writes merges as "a b", later ones as ["a", "b"]."""
    write_hf_tokenizer(gpt2_tok, tmp_path, 64)
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "merges.txt").unlink()
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [
        merge.split(" ") if isinstance(merge, str) else merge for merge in data["model"]["merges"]
    ]
    data["model"]["merges"] = [" ".join(m) for m in merges] if form == "strings" else merges
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert tokenizer_from_hf(tmp_path).to_json() == gpt2_tok.to_json()


@pytest.mark.parametrize("other", ["gpt2_split", "gpt4_split"])
def test_tokenizer_json_and_disagreeing_slow_files_give_transformers_ids(
    gpt2_dir, gpt2_tok, tmp_path, transformers, gpt2_files, other, request
):
    """vocab.json + merges.txt of one tokenizer beside the tokenizer.json of another:
    AutoTokenizer reads tokenizer.json, and so does minigpt."""
    if other == "gpt2_split":
        texts = ["zebras quietly graze on the grass near rivers\n" * 40, *fuzz_texts(200, 7)]
        ranks = BPETokenizer.train(texts, vocab_size=400).mergeable_ranks
        theirs = BPETokenizer(ranks, GPT2_SPLIT_PATTERN)
    else:
        theirs = request.getfixturevalue("gpt4_tok")
    write_hf_tokenizer(theirs, tmp_path, 64)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / name, tmp_path / name)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = tokenizer_from_hf(tmp_path)
    assert tok.to_json() == theirs.to_json() != gpt2_tok.to_json()
    texts = gpt2_files.hard_texts + fuzz_texts(300, seed=8)
    assert_same_ids(tok, auto, texts)
    assert any(gpt2_tok.encode_prompt(t) != auto(t)["input_ids"] for t in texts)  # they differ


# ------------------------------------------------------------------------------------ export


def test_export_gpt2_split_round_trip(gpt2_dir, gpt2_tok, tmp_path, transformers, gpt2_files):
    written = write_hf_tokenizer(gpt2_tok, tmp_path, model_max_length=64)
    assert sorted(written) == [
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    # the merges recovered from the ranks are the very merges the vocab was learned with
    assert (tmp_path / "merges.txt").read_text().split() == (
        gpt2_dir / "merges.txt"
    ).read_text().split()
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads(
        (gpt2_dir / "vocab.json").read_text()
    )
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.model_max_length == 64 and auto.eos_token == ENDOFTEXT
    assert_same_ids(gpt2_tok, auto, gpt2_files.hard_texts + fuzz_texts(500, seed=5))
    slow = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert_same_ids(gpt2_tok, slow, gpt2_files.hard_texts)


def test_export_gpt4_split_round_trip(gpt4_tok, tmp_path, transformers, gpt2_files):
    written = write_hf_tokenizer(gpt4_tok, tmp_path, model_max_length=128)
    assert sorted(written) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # no slow format for this split
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": GPT4_SPLIT_PATTERN} and byte_level["use_regex"] is False
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.model_max_length == 128 and len(auto) == gpt4_tok.vocab_size
    assert_same_ids(gpt4_tok, auto, gpt2_files.hard_texts + fuzz_texts(1000, seed=6))


@pytest.mark.parametrize("which", ["gpt2_tok", "gpt4_tok"])
def test_import_of_export_is_the_same_tokenizer(which, request, tmp_path):
    tok = request.getfixturevalue(which)
    write_hf_tokenizer(tok, tmp_path, 64)
    assert tokenizer_from_hf(tmp_path).to_json() == tok.to_json()
    for name in ("vocab.json", "merges.txt"):  # and from tokenizer.json alone
        (tmp_path / name).unlink(missing_ok=True)
    assert tokenizer_from_hf(tmp_path).to_json() == tok.to_json()


def test_recover_merges_makes_each_token_from_two_lower_ones(gpt4_tok):
    ranks = gpt4_tok.mergeable_ranks
    merges = recover_merges(ranks)
    assert len(merges) == len(ranks) - 256
    for (a, b), (token, rank) in zip(
        merges, sorted(ranks.items(), key=lambda kv: kv[1])[256:], strict=True
    ):
        assert a + b == token and ranks[a] < rank and ranks[b] < rank


# ---------------------------------------------------------------------------------- refusals


def assert_refused(folder: Path, match: str) -> MinigptError:
    with pytest.raises(MinigptError, match=match) as info:
        tokenizer_from_hf(folder)
    assert "\n" not in str(info.value) and info.value.hint, str(info.value)
    return info.value


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data = change(data) or data
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def slow_dir(gpt2_dir, tmp_path) -> Path:
    """A copy of the GPT-2-format files to spoil."""
    folder = tmp_path / "slow"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / name, folder / name)
    return folder


@pytest.fixture
def fast_dir(gpt2_tok, tmp_path) -> Path:
    """tokenizer.json (+ tokenizer_config.json) alone, to spoil."""
    folder = tmp_path / "fast"
    write_hf_tokenizer(gpt2_tok, folder, 64)
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    return folder


def test_refuses_missing_files(tmp_path, slow_dir):
    assert_refused(tmp_path / "nowhere", "no folder at")
    empty = tmp_path / "empty"
    empty.mkdir()
    err = assert_refused(empty, "no vocab.json \\+ merges.txt and no tokenizer.json")
    assert "vocab.json and merges.txt, or tokenizer.json" in err.hint
    (slow_dir / "merges.txt").unlink()
    assert_refused(slow_dir, "has vocab.json but neither merges.txt nor tokenizer.json")


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer.json", "tokenizer_config.json"])
def test_refuses_bad_json(slow_dir, fast_dir, name):
    folder = fast_dir if name == "tokenizer.json" else slow_dir
    (folder / name).write_text('{"a": ', encoding="utf-8")
    assert_refused(folder, f"{name} is not valid JSON")


def test_refuses_files_of_the_wrong_shape(slow_dir, fast_dir):
    (slow_dir / "vocab.json").write_bytes(b"\xff\xfe")
    assert_refused(slow_dir, "is not UTF-8 text")
    (fast_dir / "tokenizer.json").write_text("[1, 2]", encoding="utf-8")
    assert_refused(fast_dir, "tokenizer.json is not laid out as Hugging Face writes it")


def test_refuses_ids_out_of_merge_order(slow_dir):
    def swap_two_merge_results(vocab):
        first, second = [t for t, i in vocab.items() if i in (300, 301)]
        vocab[first], vocab[second] = vocab[second], vocab[first]

    edit_json(slow_dir / "vocab.json", swap_two_merge_results)
    assert_refused(
        slow_dir, "vocab.json's ids do not follow the order of merges.txt, which tiktoken needs"
    )


def test_refuses_a_missing_byte_token(slow_dir):
    def drop_byte_zero(vocab):  # 'Ā' (the byte 0x00) is in no merge; renumber to keep ids 0..n-1
        gone = vocab.pop("Ā")
        return {t: i - (i > gone) for t, i in vocab.items()}

    edit_json(slow_dir / "vocab.json", drop_byte_zero)
    assert_refused(slow_dir, "vocab.json has no token for the byte 0x00")


def test_refuses_an_extra_special_token(fast_dir, slow_dir):
    n = json.loads((fast_dir / "tokenizer.json").read_text())["added_tokens"][0]["id"]
    pad = {"id": n + 1, "content": "<|pad|>", "special": True}
    edit_json(fast_dir / "tokenizer.json", lambda data: data["added_tokens"].append(pad))
    assert_refused(fast_dir, "adds the token '<\\|pad\\|>'")
    config = {"added_tokens_decoder": {str(n + 1): {"content": "<|im_start|>", "special": True}}}
    (slow_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert_refused(slow_dir, "adds the token '<\\|im_start\\|>'")


@pytest.mark.parametrize("with_gap", [True, False])
def test_a_missing_byte_token_is_named_as_one_whatever_the_ids(slow_dir, fast_dir, with_gap):
    """A byte token dropped without renumbering leaves a gap and <|endoftext|> one past
    the count: the missing byte is the cause, not where <|endoftext|> sits."""

    def drop(vocab, text):
        gone = vocab.pop(text)
        return vocab if with_gap else {t: i - (i > gone) for t, i in vocab.items()}

    edit_json(slow_dir / "vocab.json", lambda vocab: drop(vocab, "Ā"))  # the byte 0x00
    assert_refused(slow_dir, "^vocab.json has no token for the byte 0x00$")

    def drop_from_model(data):
        data["model"]["vocab"] = drop(data["model"]["vocab"], "ÿ")  # the byte 0xff

    edit_json(fast_dir / "tokenizer.json", drop_from_model)
    assert_refused(fast_dir, "^tokenizer.json has no token for the byte 0xff$")


def test_an_extra_special_token_in_the_vocab_is_named_as_one(fast_dir, slow_dir):
    """<|pad|> after <|endoftext|> in the vocab alone (no added_tokens entry): an extra
    special token, not a 257th... BPE token that moves <|endoftext|>'s expected id."""
    data = json.loads((fast_dir / "tokenizer.json").read_text())
    n = data["model"]["vocab"][ENDOFTEXT]
    edit_json(fast_dir / "tokenizer.json", lambda d: d["model"]["vocab"].update({"<|pad|>": n + 1}))
    err = assert_refused(
        fast_dir,
        f"^tokenizer.json has the token '<\\|pad\\|>' \\(id {n + 1}\\) after <\\|endoftext\\|> "
        f"\\(id {n}\\): an extra special token, but minigpt's only special token is",
    )
    assert "remove the extra special tokens" in err.hint
    extra = {"<|pad|>": n + 1, "<|sep|>": n + 2}
    edit_json(slow_dir / "vocab.json", lambda vocab: vocab.update(extra))
    assert_refused(slow_dir, f"'<\\|pad\\|>' \\(id {n + 1}\\) and 1 more after <\\|endoftext\\|>")


def test_refuses_endoftext_elsewhere_or_missing(slow_dir):
    edit_json(slow_dir / "vocab.json", lambda vocab: vocab.update({ENDOFTEXT: 0, "!": 456}))
    assert_refused(
        slow_dir, "<\\|endoftext\\|> has id 0, but minigpt needs it right after the 456 BPE tokens"
    )
    edit_json(
        slow_dir / "vocab.json", lambda vocab: {t: i for t, i in vocab.items() if t != ENDOFTEXT}
    )
    assert_refused(slow_dir, "vocab.json has no <\\|endoftext\\|> token")


def test_refuses_a_token_no_merge_makes(slow_dir):
    edit_json(slow_dir / "vocab.json", lambda vocab: vocab.update({"xyz": 456, ENDOFTEXT: 457}))
    assert_refused(
        slow_dir, "vocab.json's token b'xyz' \\(id 456\\) is made by no merge in merges.txt"
    )


def test_refuses_merges_tiktoken_would_run_differently(tmp_path, transformers):
    """merges "b c", "a b", "ab c": HF makes [a, bc] of "abc" (no merge joins a and bc),
    tiktoken joins a + bc into the token "abc". Such a vocab is refused, not run wrong."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab.update({"bc": 256, "ab": 257, "abc": 258, ENDOFTEXT: 259})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nb c\na b\nab c\n", encoding="utf-8")
    hf = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ranks = {text.encode(): i for text, i in vocab.items() if text != ENDOFTEXT and len(text) > 1}
    ranks.update({bytes([b]): vocab[c] for b, c in bytes_to_unicode().items()})
    assert (
        hf("abc")["input_ids"]
        == [vocab["a"], 256]
        != BPETokenizer(ranks, GPT2_SPLIT_PATTERN).encode("abc")
    )
    assert_refused(
        tmp_path,
        "merges.txt's merge 3 \\(b'ab' \\+ b'c'\\) is not how tiktoken's BPE builds that token",
    )


def _rename_token(vocab: dict, token_id: int, text: str) -> None:
    (old,) = [t for t, i in vocab.items() if i == token_id]
    vocab[text] = vocab.pop(old)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
            "adds a space before the text",
        ),
        (lambda d: d.update(normalizer={"type": "NFC"}), "its normalizer 'NFC' changes the text"),
        (
            lambda d: d.update(pre_tokenizer={"type": "Whitespace"}),
            "pre-tokenizer 'Whitespace' is neither",
        ),
        (lambda d: d["pre_tokenizer"].update(use_regex=False), "has use_regex False"),
        (
            lambda d: d["model"].update(type="WordPiece"),
            "its model is 'WordPiece', not byte-level BPE",
        ),
        (lambda d: d["model"].update(byte_fallback=True), "sets byte_fallback to True"),
        (lambda d: d["model"].update(vocab=["a", "b"]), "vocab is not a map from tokens to ids"),
        (lambda d: d["model"]["merges"].append("a b c"), "is not two tokens"),
        (lambda d: _rename_token(d["model"]["vocab"], 300, ""), "holds an empty token"),
        (
            lambda d: _rename_token(d["model"]["vocab"], 300, "€uro"),
            "not written in GPT-2's byte alphabet",
        ),
        (
            lambda d: d.update(
                post_processor={
                    "type": "TemplateProcessing",
                    "single": [
                        {"SpecialToken": {"id": ENDOFTEXT, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                    ],
                }
            ),
            "post-processor 'TemplateProcessing' adds tokens",
        ),  # fmt: skip
        (
            lambda d: d.update(decoder={"type": "Metaspace"}),
            "its decoder 'Metaspace' is not ByteLevel",
        ),
        (
            lambda d: d.update(
                pre_tokenizer={
                    "type": "Sequence",
                    "pretokenizers": [
                        {
                            "type": "Split",
                            "pattern": {"Regex": "\\p{Nope}"},
                            "behavior": "Isolated",
                            "invert": False,
                        },
                        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
                    ],
                }
            ),
            "split regex does not compile in tiktoken",
        ),  # fmt: skip
        (
            lambda d: d.update(
                pre_tokenizer={
                    "type": "Sequence",
                    "pretokenizers": [
                        {
                            "type": "Split",
                            "pattern": {"String": " "},
                            "behavior": "Isolated",
                            "invert": False,
                        },
                        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
                    ],
                }
            ),
            "not an Isolated, non-inverted regex",
        ),  # fmt: skip
    ],
)
def test_refuses_a_tokenizer_json_tiktoken_cannot_run(fast_dir, change, match):
    edit_json(fast_dir / "tokenizer.json", change)
    assert_refused(fast_dir, match)


def test_refuses_config_options_that_change_the_ids(slow_dir):
    (slow_dir / "tokenizer_config.json").write_text('{"add_prefix_space": true}', encoding="utf-8")
    assert_refused(slow_dir, "tokenizer_config.json sets add_prefix_space")


def test_export_refusals(gpt4_tok, tmp_path):
    with pytest.raises(MinigptError, match="only a bpe tokenizer") as info:
        write_hf_tokenizer(CharTokenizer.from_text("abc"), tmp_path, 64)
    assert info.value.hint
    with pytest.raises(MinigptError, match="model_max_length must be") as info:
        write_hf_tokenizer(gpt4_tok, tmp_path, 0)
    assert info.value.param == "model_max_length"
    # "abc" of rank 256 with no "ab" or "bc": no single merge makes it
    ranks = {bytes([b]): b for b in range(256)} | {b"abc": 256}
    with pytest.raises(MinigptError, match="is not one merge of two tokens") as info:
        write_hf_tokenizer(BPETokenizer(ranks), tmp_path, 64)
    assert "\n" not in str(info.value) and info.value.hint
    (tmp_path / "a_file").write_text("")
    with pytest.raises(MinigptError, match="a_file is a file, not a folder"):
        write_hf_tokenizer(gpt4_tok, tmp_path / "a_file", 64)
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # nothing half-written
