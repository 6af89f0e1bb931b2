"""prepare.py: the split, the two passes into a prepared folder, caching by content,
bad input refused before anything is written, and streaming at scale."""

import errno
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from minigpt import corpus as corpora
from minigpt import encode
from minigpt import prepare as prepare_module
from minigpt.data import load_prepared
from minigpt.datasets import BUILTIN_DATASETS, BuiltinDataset
from minigpt.encode import TRAIN, VAL, Split, split_point
from minigpt.errors import MinigptError
from minigpt.prepare import TokenFiles, prepare

# --------------------------------------------------------------------------------- splitting


def test_split_one_document_at_ninety_percent():
    split = split_point([1000])
    assert split == Split(documents=1, val_start=0, cut=900)
    assert (split.train_documents, split.val_documents) == (1, 1)


def test_split_many_documents_keeps_whole_documents_at_the_end():
    split = split_point([40] * 20)
    assert split == Split(documents=20, val_start=18)  # 2 of 20 equal documents hold 10%
    assert (split.train_documents, split.val_documents) == (18, 2)
    assert split_point([5, 100]) == Split(2, 1)  # train keeps one


# ------------------------------------------------------------------------------- preparation


def test_prepare_char_file(tmp_path, make_text):
    corpus = tmp_path / "corpus.txt"
    # "Z" occurs only in the last 10%: the vocab comes from the whole corpus, so val encodes
    text = make_text(extra="Zebra!\n")
    corpus.write_text(text)
    prepared = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert prepared.dir.parent == tmp_path / "data"
    assert prepared.dir.name.startswith("corpus-char-")
    assert sorted(p.name for p in prepared.dir.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    assert prepared.dtype == np.uint16
    train, val = prepared.train_tokens(), prepared.val_tokens()
    assert isinstance(train, np.memmap)
    tok = prepared.tokenizer
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    assert "Z" in tok.decode(val.tolist()) and "Z" not in tok.decode(train.tolist())
    meta = prepared.meta
    assert meta["characters"] == len(text) and meta["documents"] == 1
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert meta["val_tokens"] == len(text) - int(len(text) * 0.9)
    assert (
        meta["content_hash"]
        == hashlib.sha256(len(text).to_bytes(8, "little") + text.encode()).hexdigest()
    )
    assert meta["tokenizer"]["kind"] == "char" and meta["source_kind"] == "file"
    assert meta["bytes_per_token"] == pytest.approx(1.0)


def test_prepare_folder_bpe_joins_documents_with_eot(tmp_path, make_text):
    folder = tmp_path / "books"
    (folder / "b" / "deep").mkdir(parents=True)
    docs = {f"a{i}.txt": make_text(30 + i) for i in range(6)}
    docs["b/deep/z.txt"] = "The last document, in a subfolder. 🎉\n" * 20
    for name, text in docs.items():
        (folder / name).write_text(text)
    (folder / "skip.md").write_text("not matched by the glob")
    prepared = prepare(folder, "bpe", 300, tmp_path / "data", progress=False)
    meta = prepared.meta
    assert meta["documents"] == 7 and meta["source_kind"] == "folder"
    tok = prepared.tokenizer
    assert tok.vocab_size == 300 and meta["eot_id"] == 299
    ordered = [docs[name] for name in sorted(docs)]  # sorted by relative path
    train_docs = tok.decode(prepared.train_tokens().tolist()).split("<|endoftext|>")
    val_docs = tok.decode(prepared.val_tokens().tolist()).split("<|endoftext|>")
    assert train_docs + val_docs == ordered
    assert len(val_docs) == meta["val_documents"] >= 1
    assert meta["bytes_per_token"] > 1.5


def test_prepare_reuses_and_reprepares(tmp_path, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    first = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert not first.reused
    stamp = first.train_path.stat().st_mtime_ns
    again = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert again.reused and again.dir == first.dir
    assert again.train_path.stat().st_mtime_ns == stamp  # not written again
    corpus.write_text(make_text() + "one more line\n")
    changed = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert not changed.reused and changed.dir != first.dir
    other_tokenizer = prepare(corpus, "bpe", 260, tmp_path / "data", progress=False)
    assert other_tokenizer.dir not in (first.dir, changed.dir)
    assert load_prepared(changed.dir).meta == changed.meta
    assert len(list((tmp_path / "data").iterdir())) == 3  # no temporary leftovers


def test_prepare_named_encoding_writes_uint32(tmp_path, monkeypatch, make_text):
    from minigpt import tokenizer as tokenizer_module

    class FakeCl100k(tokenizer_module.BPETokenizer):
        """A bpe tokenizer that claims a 100k vocab, as cl100k_base would (no download)."""

        @property
        def vocab_size(self):
            return 100277

    small = tokenizer_module.BPETokenizer.train([make_text()], 270)
    monkeypatch.setattr(
        prepare_module,
        "train_tokenizer",
        lambda kind, texts, vocab_size: FakeCl100k(small.mergeable_ranks),
    )
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    prepared = prepare(corpus, "cl100k_base", data_dir=tmp_path / "data", progress=False)
    assert prepared.dtype == np.uint32 and prepared.meta["dtype"] == "uint32"
    assert prepared.train_path.stat().st_size == 4 * prepared.meta["train_tokens"]


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "no file, folder or built-in dataset"),
        (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "is empty"),
        (lambda d: (d / "empty").mkdir() or d / "empty", r"no \.txt, \.jsonl or \.parquet files"),
        (lambda d: (d / "latin1.txt").write_bytes("café\n".encode("latin-1")) and d / "latin1.txt", "not UTF-8 text .*0xe9 at offset 3"),
        (lambda d: (d / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary") and d / "blob.txt", "looks binary"),
        (lambda d: (d / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary") and d / "blob.txt", r"NUL byte at offset 4\)"),
        (lambda d: (d / "u16.txt").write_bytes("héllo\n".encode("utf-16")) and d / "u16.txt", r"looks like UTF-16 text \(it starts with a byte-order mark\)"),
        (lambda d: (d / "u16.txt").write_bytes("héllo\n".encode("utf-16-be")) and d / "u16.txt", r"looks like UTF-16BE text \(every other byte is NUL\)"),
        (lambda d: (d / "u16.txt").write_bytes(b"\xfe\xff" + "héllo\n".encode("utf-16-be")) and d / "u16.txt", "looks like UTF-16 text"),
        (lambda d: (d / "u32.txt").write_bytes("héllo\n".encode("utf-32")) and d / "u32.txt", "looks like UTF-32 text"),
    ],
)  # fmt: skip
def test_bad_sources(tmp_path, make, message, assert_nothing_written):
    source = make(tmp_path)
    with pytest.raises(MinigptError, match=message):
        prepare(source, "char", data_dir=tmp_path / "data", progress=False)
    assert_nothing_written(tmp_path / "data")


def test_bad_tokenizer_settings_fail_before_reading(tmp_path, make_text, assert_nothing_written):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    with pytest.raises(MinigptError, match="too small for BPE"):
        prepare(corpus, "bpe", 200, tmp_path / "data", progress=False)
    with pytest.raises(MinigptError, match="unknown tokenizer"):
        prepare(corpus, "words", data_dir=tmp_path / "data", progress=False)
    assert_nothing_written(tmp_path / "data")


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, make_text, listing):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    real_write = TokenFiles.write

    def write_then_fail(self, split, ids):
        real_write(self, split, ids)
        if split == VAL:
            raise KeyboardInterrupt  # killed half way through the folder

    monkeypatch.setattr(TokenFiles, "write", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert listing(tmp_path / "data") == []


def test_token_id_that_does_not_fit_the_dtype(tmp_path):
    files = TokenFiles(tmp_path, np.uint16)
    with pytest.raises(MinigptError, match="token id 70000 does not fit the token file's uint16"):
        files.write(TRAIN, np.array([1, 70000]))
    files.close(durable=True)
    assert (tmp_path / "train.bin").stat().st_size == 0  # nothing wrapped, nothing written
    files = TokenFiles(tmp_path, np.uint32)
    files.write(TRAIN, np.array([1, 70000]))
    files.write(TRAIN, np.array([3], dtype=np.uint32))
    files.close(durable=True)
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint32).tolist() == [1, 70000, 3]


def test_cli_prepare(tmp_path, minigpt_cli, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    code, out, _ = minigpt_cli("prepare", corpus, "--data-dir", tmp_path / "d")
    assert code == 0
    for word in (
        "characters",
        "documents",
        "train tokens",
        "val tokens",
        "vocab size",
        "bytes/token",
    ):
        assert word in out
    assert str(tmp_path / "d") in out
    code, _, err = minigpt_cli("prepare", tmp_path / "nope", "--data-dir", tmp_path / "d")
    assert code == 2 and err.startswith("error: no file, folder") and "Traceback" not in err
    code, _, err = minigpt_cli("prepare", corpus, "-t", "bpe", "--vocab-size", "100")
    assert code == 2 and "too small for BPE" in err


def test_utf16_hint_and_utf8_byte_order_mark(tmp_path, make_text):
    corpus = tmp_path / "u16.txt"
    corpus.write_bytes("hello\n".encode("utf-16"))
    with pytest.raises(MinigptError) as err:
        prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert "iconv -f utf-16 -t utf-8" in err.value.hint
    # a UTF-8 byte-order mark is UTF-8: read as a plain utf-8 decode reads it
    corpus.write_bytes(b"\xef\xbb\xbf" + make_text().encode())
    assert corpora.read_text(corpus) == "\ufeff" + make_text()


# --------------------------------------------------------------------- sources that are odd


def test_odd_sources_are_one_sentence(tmp_path, monkeypatch, make_text, assert_nothing_written):
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    with pytest.raises(MinigptError, match="neither a text file nor a folder"):
        prepare(pipe, "char", data_dir=tmp_path / "data", progress=False)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(MinigptError, match="cannot read .*loop: Too many levels of symbolic"):
        prepare(loop, "char", data_dir=tmp_path / "data", progress=False)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone.txt")
    with pytest.raises(MinigptError, match="symbolic link to .*gone.txt, which does not exist"):
        prepare(dangling, "char", data_dir=tmp_path / "data", progress=False)
    with pytest.raises(MinigptError, match="no file, folder or built-in dataset"):
        prepare("~no_such_user_xyz/c.txt", "char", data_dir=tmp_path / "data", progress=False)
    monkeypatch.chdir(tmp_path)  # "" must not mean the working directory
    (tmp_path / "c.txt").write_text(make_text())
    with pytest.raises(MinigptError, match="no file, folder or built-in dataset named ''"):
        prepare("", "char", data_dir=tmp_path / "data", progress=False)
    assert_nothing_written(tmp_path / "data")


def test_a_pipe_in_a_folder_is_skipped_not_read(tmp_path, make_text):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text(make_text())
    os.mkfifo(folder / "b.txt")  # reading it would block forever
    prepared = prepare(folder, "char", data_dir=tmp_path / "data", progress=False)
    assert prepared.meta["documents"] == 1


def test_unreadable_files_are_one_sentence(
    tmp_path, monkeypatch, make_text, assert_nothing_written
):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text(make_text())
    (folder / "secret.txt").write_text(make_text())

    def refuse_secret(path, mode="r"):
        if Path(path).name == "secret.txt":  # tests run as root, so chmod cannot refuse
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, mode)

    monkeypatch.setattr(corpora, "open", refuse_secret, raising=False)  # what corpus.py opens
    with pytest.raises(MinigptError, match="cannot read .*secret.txt: Permission denied"):
        prepare(folder, "char", data_dir=tmp_path / "data", progress=False)
    assert_nothing_written(tmp_path / "data")


def test_a_data_dir_that_is_a_file(tmp_path, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(MinigptError, match=f"{tmp_path / 'data'} is a file, not a folder"):
        prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert (tmp_path / "data").read_text() == "not a folder"


# ------------------------------------------------------------------------------------ globs


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("../*.txt", "has a '..' part"),
        ("sub/../../*.txt", "has a '..' part"),
        ("..\\*.txt", "has a '..' part"),
        ("/etc/*", "is absolute"),
        ("\\secret.txt", "is absolute"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("a**b", "is not a pattern minigpt can use"),
    ],
)
def test_globs_stay_inside_the_folder(
    tmp_path, monkeypatch, pattern, message, make_text, assert_nothing_written
):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(make_text())
    (tmp_path / "secret.txt").write_text("outside the folder\n" * 50)
    pattern = pattern.replace("/etc", str(tmp_path)) if pattern == "/etc/*" else pattern
    read = []
    monkeypatch.setattr(corpora, "_open", lambda path: read.append(path) or open(path, "rb"))
    with pytest.raises(MinigptError, match=re.escape(message)) as err:
        prepare(folder, "char", data_dir=tmp_path / "data", glob=pattern, progress=False)
    assert err.value.param == "glob"
    assert read == []  # refused before reading anything
    assert_nothing_written(tmp_path / "data")


def test_glob_error_names_the_cli_option(tmp_path, minigpt_cli):
    folder = tmp_path / "books"
    folder.mkdir()
    code, _, err = minigpt_cli("prepare", folder, "--glob", "/etc/*", "--data-dir", tmp_path / "d")
    assert code == 2 and "--glob '/etc/*' is absolute" in err and "Traceback" not in err


def test_prepared_folder_mode_follows_the_umask(tmp_path, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    previous = os.umask(0o022)
    try:
        prepared = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    finally:
        os.umask(previous)
    assert prepared.dir.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    "step",
    ["build_tokenizer", "tokenize_into", "encode_in_order", "save_tokenizer", "write_json_atomic"],
)
def test_ctrl_c_anywhere_leaves_no_folder(
    tmp_path, monkeypatch, step, make_text, assert_nothing_written
):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    assert_nothing_written(tmp_path / "data")


# --------------------------------------------------------------------------- what a resume needs


def test_a_changed_corpus_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, make_text, listing
):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    first = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    trained_on = first.meta["content_hash"]
    assert prepare(corpus, "char", data_dir=tmp_path / "data", expected_hash=trained_on).reused
    corpus.write_text(make_text() + "one more line\n")
    now = corpora.content_hash([corpus.read_text()])
    before = listing(tmp_path / "data")
    monkeypatch.setattr(
        prepare_module, "build_tokenizer", lambda *args: pytest.fail("built a tokenizer")
    )
    with pytest.raises(MinigptError) as err:
        prepare(corpus, "char", data_dir=tmp_path / "data", expected_hash=trained_on)
    assert str(err.value) == (
        f"the corpus {corpus} has changed since the run started: its content hash is "
        f"{now[:12]}, the run was trained on {trained_on[:12]}"
    )
    assert err.value.hint == "restore the original corpus, or start a new run with --out"
    assert listing(tmp_path / "data") == before


def test_meta_records_the_absolute_source_path(tmp_path, monkeypatch, make_text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(make_text())
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text(make_text())
    from_file = prepare("c.txt", "char", data_dir=tmp_path / "data", progress=False)
    assert from_file.meta["source_path"] == str(tmp_path.resolve() / "c.txt")
    assert load_prepared(from_file.dir).meta["source_path"] == str(tmp_path.resolve() / "c.txt")
    from_folder = prepare("books", "char", data_dir=tmp_path / "data", progress=False)
    assert from_folder.meta["source_path"] == str(tmp_path.resolve() / "books")
    monkeypatch.setitem(
        BUILTIN_DATASETS,
        "tiny",
        BuiltinDataset("one", lambda data_dir, progress: ["ab" * 50]),
    )
    assert prepare("tiny", "char", data_dir=tmp_path / "data").meta["source_path"] is None
    # the same content elsewhere reuses the folder, and is told its own path
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "c.txt").write_text(make_text())
    monkeypatch.chdir(tmp_path / "copy")
    again = prepare("c.txt", "char", data_dir=tmp_path / "data", progress=False)
    assert again.reused and again.dir == from_file.dir
    assert again.meta["source_path"] == str(tmp_path.resolve() / "copy" / "c.txt")


def test_folder_names_are_unchanged(tmp_path, make_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text())
    # the names prepared folders already carry on disk: a folder is found again only by its name
    assert prepare(corpus, "char", data_dir=tmp_path, progress=False).dir.name == (
        "corpus-char-24ce2b5b16f2"
    )
    assert prepare(corpus, "bpe", 300, tmp_path, progress=False).dir.name == (
        "corpus-bpe300-31f18eee2b32"
    )


def test_absurd_bpe_vocab_size_fails_before_reading(tmp_path, make_text, assert_nothing_written):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    with pytest.raises(MinigptError, match="too large for BPE") as err:
        prepare(corpus, "bpe", 10_000_000_000, tmp_path / "data", progress=False)
    assert err.value.param == "vocab_size"
    assert_nothing_written(tmp_path / "data")


# ---------------------------------------------------------------------------- streaming, at scale


def corpus_folder(tmp_path: Path, make_text, n_docs: int = 30) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(n_docs):
        (folder / f"{i:02d}.txt").write_text(make_text(20 + i * 7, extra=f"end {i} \u00e9\u4e2d"))
    (folder / "zz-long.txt").write_text(make_text(3000))  # one document cut into pieces
    return folder


@pytest.mark.parametrize("tokenizer, vocab_size", [("char", None), ("bpe", 400)])
def test_workers_tasks_and_pieces_do_not_change_the_tokens(
    tmp_path, monkeypatch, tokenizer, vocab_size, make_text
):
    folder = corpus_folder(tmp_path, make_text)
    one = prepare(folder, tokenizer, vocab_size, tmp_path / "a", progress=False, workers=1)
    monkeypatch.setattr(encode, "TASK_CHARS", 333)  # many small tasks, in flight at once
    monkeypatch.setattr(encode, "CUT_CHARS", 100)  # long documents in many pieces
    many = prepare(folder, tokenizer, vocab_size, tmp_path / "b", progress=False, workers=3)
    assert one.dir.name == many.dir.name and one.workers == 1 and many.workers == 3
    for split in ("train_path", "val_path"):
        assert getattr(one, split).read_bytes() == getattr(many, split).read_bytes()
    ids = np.fromfile(one.train_path, dtype=one.dtype)
    expected = one.tokenizer.encode((folder / "00.txt").read_text())
    assert ids[: len(expected)].tolist() == expected  # the first document, whole


def test_bpe_learns_from_a_bounded_sample_of_train(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n" * 400 + "zebra quagga okapi\n" * 400)
    full = prepare(corpus, "bpe", 300, tmp_path / "d", progress=False)
    big_sample = prepare(corpus, "bpe", 300, tmp_path / "d", progress=False, bpe_sample_chars=10**9)
    assert big_sample.dir == full.dir and big_sample.reused  # a sample of it all is no sample
    assert "bpe_sample_chars" not in full.meta["settings"]
    sampled = prepare(corpus, "bpe", 300, tmp_path / "d", progress=False, bpe_sample_chars=4000)
    assert sampled.dir != full.dir and sampled.meta["settings"]["bpe_sample_chars"] == 4000
    # the sample is the first 4000 characters: cats and mats, never a zebra
    assert len(sampled.tokenizer.encode(" zebra")) > len(full.tokenizer.encode(" zebra"))
    assert len(sampled.tokenizer.encode(" the cat")) == len(full.tokenizer.encode(" the cat"))


def test_the_summary_says_how_fast_and_on_how_many_workers(tmp_path, minigpt_cli, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    code, out, _ = minigpt_cli("prepare", corpus, "--workers", "2", "--data-dir", tmp_path / "d")
    assert code == 0 and re.search(r"took +\d+\.\d\d s \([\d.e+-]+ MB/s, 2 workers\)", out)
    code, out, _ = minigpt_cli("prepare", corpus, "--workers", "2", "--data-dir", tmp_path / "d")
    assert code == 0 and out.startswith("reused") and "took" not in out


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--workers", "-1", "--workers must be a whole number, at least 1"),
        ("--bpe-sample-chars", "0", "--bpe-sample-chars must be a whole number of characters"),
        ("--field", "", "--field '' is empty"),
    ],
)
def test_bad_streaming_options_are_one_sentence(
    tmp_path, minigpt_cli, option, value, message, make_text
):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    code, _, err = minigpt_cli("prepare", corpus, option, value, "--data-dir", tmp_path / "d")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_train_and_eval_read_jsonl(tmp_path, minigpt_cli, make_text):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"body": make_text(30, extra=str(i))}) for i in range(20)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code, _, err = minigpt_cli(
        "train", "--data", corpus, "--out", out, "--max-iters", "2", "--set", "data.text_field=body",
        "--set", "model.n_layer=1", "--set", "model.n_embd=16", "--set", "model.n_head=2",
        "--set", "model.block_size=16", "--set", f"data.data_dir={tmp_path / 'd'}",
    )  # fmt: skip
    assert code == 0, err
    code, text, err = minigpt_cli("eval", out, "--data", corpus, "--field", "body", "--json")
    assert code == 0, err
    assert json.loads(text)["tokens"] > 1000


def test_a_long_prepare_keeps_its_temporary_folder_fresh(tmp_path, monkeypatch, make_text):
    """Another host clears a temporary folder untouched for a day: a prepare that runs
    for longer must not look killed."""
    monkeypatch.setattr(prepare_module, "KEEP_FRESH_S", 0.0)
    monkeypatch.setattr(encode, "TASK_CHARS", 1000)
    seen = []
    real_write = TokenFiles.write

    def write_then_age(self, split, ids):
        real_write(self, split, ids)
        seen.append(self.folder.stat().st_mtime)
        os.utime(self.folder, (0, 0))  # as if last touched in 1970

    monkeypatch.setattr(TokenFiles, "write", write_then_age)
    prepare(corpus_folder(tmp_path, make_text), data_dir=tmp_path / "d", progress=False)
    assert len(seen) > 5 and min(seen[1:]) > time.time() - 600


def test_learning_bpe_from_a_huge_document_holds_a_piece_not_the_document(tmp_path, monkeypatch):
    import tracemalloc

    from minigpt import corpus as corpora

    monkeypatch.setattr(corpora, "PIECE_BYTES", 1 << 20)
    big = tmp_path / "big.txt"
    big.write_text("the cat sat on the mat, line after line\n" * 300_000)  # 12 MB, one document
    corpus = corpora.load_corpus(big)
    split = split_point([big.stat().st_size])
    tracemalloc.start()
    try:
        n_chars = sum(len(chunk) for chunk in encode.bpe_sample(corpus, split, 10**9))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n_chars == split.cut  # all of train, in ~64K chunks
    assert peak < 10_000_000  # a few 1 MB pieces and their copies; the document is 12 MB
