"""Reading corpora: .txt, .jsonl and .parquet give the same documents, large files
stream in pieces, and every malformed input is one sentence that names the place."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from minigpt import corpus as corpora
from minigpt import encode
from minigpt import prepare as prepare_module
from minigpt.corpus import PARQUET_BATCH_ROWS, LargeDocument, load_corpus
from minigpt.errors import MinigptError
from minigpt.prepare import prepare

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DOCUMENTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "",  # an empty document adds nothing, in every format
    "caf\u00e9 \u4e2d\u6587 \U0001f600 don't\r\nno newline at the end",
    "  leading spaces\n\n\nand blank lines\t\n",
    "12345 67890 x=1; y = [a, b]\n" * 40,
    "a short one",
    "<|endoftext|> is just text in a corpus\n",
] + [f"document {i}: the cat sat on mat number {i * 7 % 13}.\n" * (i % 5 + 1) for i in range(40)]


def write_txt(folder: Path, documents=DOCUMENTS) -> Path:
    folder.mkdir(parents=True)
    for i, doc in enumerate(documents):
        (folder / f"doc{i:03d}.txt").write_bytes(doc.encode("utf-8"))
    return folder


def write_jsonl(folder: Path, documents=DOCUMENTS, field="text", shards=3) -> Path:
    folder.mkdir(parents=True)
    per = -(-len(documents) // shards)
    for shard in range(shards):
        lines = [json.dumps({"id": i, field: doc}) for i, doc in enumerate(documents)][
            shard * per : (shard + 1) * per
        ]
        (folder / f"part-{shard}.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return folder


def write_parquet(folder: Path, documents=DOCUMENTS, field="text", row_group_size=7) -> Path:
    folder.mkdir(parents=True)
    table = pa.table({"id": list(range(len(documents))), field: documents})
    pq.write_table(table, folder / "train-00000.parquet", row_group_size=row_group_size)
    return folder


def digests(prepared) -> tuple[str, str]:
    return tuple(
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (prepared.train_path, prepared.val_path)
    )


@pytest.mark.parametrize("tokenizer, vocab_size", [("char", None), ("bpe", 300)])
def test_txt_jsonl_and_parquet_prepare_to_the_same_bytes(tmp_path, tokenizer, vocab_size):
    sources = [
        write_txt(tmp_path / "txt"),
        write_jsonl(tmp_path / "jsonl"),
        write_parquet(tmp_path / "parquet"),
    ]
    prepared = [
        prepare(s, tokenizer, vocab_size, tmp_path / "data", progress=False) for s in sources
    ]
    assert len({digests(p) for p in prepared}) == 1
    assert len({p.meta["content_hash"] for p in prepared}) == 1
    assert [p.meta["source_format"] for p in prepared] == ["text", "jsonl", "parquet"]
    assert prepared[0].meta["documents"] == len(DOCUMENTS) - 1  # the empty one left out
    assert prepared[1].meta["glob"] == "*.jsonl" and prepared[1].meta["text_field"] == "text"


def test_a_single_jsonl_or_parquet_file_and_another_field(tmp_path):
    write_jsonl(tmp_path / "j", field="content", shards=1)
    write_parquet(tmp_path / "p", field="content")
    jsonl = prepare(
        tmp_path / "j/part-0.jsonl", data_dir=tmp_path / "d", text_field="content", progress=False
    )
    parquet = prepare(
        tmp_path / "p/train-00000.parquet",
        data_dir=tmp_path / "d",
        text_field="content",
        progress=False,
    )
    assert digests(jsonl) == digests(parquet)
    assert jsonl.meta["glob"] is None and jsonl.meta["source_kind"] == "file"


def test_a_missing_field_names_the_keys_and_the_option(tmp_path, minigpt_cli):
    write_jsonl(tmp_path / "j", shards=1)
    code, _, err = minigpt_cli(
        "prepare", tmp_path / "j", "--field", "body", "--data-dir", tmp_path / "d"
    )
    assert code == 2
    assert "part-0.jsonl line 1 has no 'body' field (its keys: 'id', 'text')" in err
    assert "--field" in err and "Traceback" not in err
    write_parquet(tmp_path / "p")
    code, _, err = minigpt_cli(
        "prepare", tmp_path / "p", "--field", "body", "--data-dir", tmp_path / "d"
    )
    assert code == 2 and "has no 'body' column (its columns: 'id', 'text')" in err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"text": "ok"', r"line 2 is not JSON"),
        (b'["text"]', r"line 2 has no 'text' field \(it is not an object with fields\)"),
        (b'{"text": 3}', r"line 2: its 'text' field is int, not text"),
        (b'{"text": "\\ud800 alone"}', r"line 2: its 'text' field holds an unpaired UTF-16 surrogate"),
        (b'{"text": "caf\xe9"}', r"is not UTF-8 text \(byte 0xe9 at offset 35\)"),
    ],
)  # fmt: skip
def test_bad_jsonl_lines_are_one_sentence_naming_the_line(tmp_path, line, message):
    source = tmp_path / "c.jsonl"
    source.write_bytes(b'{"text": "fine line"}\n' + line + b"\n")
    with pytest.raises(MinigptError, match=message):
        prepare(source, data_dir=tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_jsonl_escapes_of_a_surrogate_pair_are_one_character(tmp_path):
    source = tmp_path / "c.jsonl"
    source.write_text('{"text": "smile \\ud83d\\ude00\\n"}\n', encoding="utf-8")
    prepared = prepare(source, data_dir=tmp_path / "d", progress=False)
    assert "\U0001f600" in prepared.tokenizer.chars


def test_parquet_nulls_are_refused_naming_the_row_and_other_types_are_refused(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["one\n", None, "two\n"]}), folder / "a.parquet")
    with pytest.raises(
        MinigptError, match=r"a.parquet row 1 \(counting from 0\): its 'text' column is null"
    ):
        prepare(folder, data_dir=tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []
    # past the first batch, in a later row group: the row is counted through the file
    texts = ["a line\n"] * (2 * PARQUET_BATCH_ROWS + 5)
    texts[PARQUET_BATCH_ROWS + 3] = None
    pq.write_table(pa.table({"text": texts}), tmp_path / "late.parquet", row_group_size=100)
    with pytest.raises(MinigptError, match=f"row {PARQUET_BATCH_ROWS + 3:,} "):
        prepare(tmp_path / "late.parquet", data_dir=tmp_path / "d", progress=False)
    pq.write_table(pa.table({"text": ["one\n", "", "two\n"]}), folder / "a.parquet")
    assert prepare(folder, data_dir=tmp_path / "d", progress=False).meta["documents"] == 2
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(MinigptError, match="'text' column holds int64, not text"):
        prepare(tmp_path / "ints.parquet", data_dir=tmp_path / "d", progress=False)
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(MinigptError, match="fake.parquet is not a Parquet file pyarrow can read"):
        prepare(tmp_path / "fake.parquet", data_dir=tmp_path / "d", progress=False)


@pytest.mark.parametrize(
    "kind, encoded",
    [
        (pa.string(), True),
        (pa.large_string(), True),
        (pa.large_string(), False),
        (pa.string_view(), False),  # pyarrow cannot write a dictionary of string_view
    ],
)
def test_a_dictionary_encoded_or_other_string_column_is_text(tmp_path, kind, encoded):
    def column(texts):
        values = pa.array(texts, type=kind)
        return values.dictionary_encode() if encoded else values

    table = pa.table({"id": range(len(DOCUMENTS)), "text": column(DOCUMENTS)})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=7)
    stored = pq.read_schema(tmp_path / "train.parquet").field("text").type
    assert pa.types.is_dictionary(stored) == encoded  # as the reader will find it
    assert list(load_corpus(tmp_path / "train.parquet").documents()) == DOCUMENTS
    pq.write_table(pa.table({"text": column(["one\n", None])}), tmp_path / "nulls.parquet")
    with pytest.raises(MinigptError, match="row 1 .*null"):
        prepare(tmp_path / "nulls.parquet", data_dir=tmp_path / "d", progress=False)


def test_a_dictionary_of_numbers_is_not_text(tmp_path):
    ints = pa.array([1, 2]).dictionary_encode()
    pq.write_table(pa.table({"text": ints}), tmp_path / "ints.parquet")
    with pytest.raises(MinigptError, match="'text' column holds .*int64.*, not text"):
        prepare(tmp_path / "ints.parquet", data_dir=tmp_path / "d", progress=False)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    write_parquet(tmp_path / "p")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if missing
    with pytest.raises(MinigptError, match="needs pyarrow, which is not installed") as err:
        load_corpus(tmp_path / "p")
    assert "minigpt[parquet]" in err.value.hint


def test_a_folder_of_two_kinds_needs_a_glob(tmp_path, minigpt_cli):
    folder = write_txt(tmp_path / "mixed", DOCUMENTS[:3])
    (folder / "more.jsonl").write_text('{"text": "x"}\n')
    code, _, err = minigpt_cli("prepare", folder, "--data-dir", tmp_path / "d")
    assert code == 2 and "has .txt and .jsonl files; a corpus is one kind" in err
    assert "--glob '*.jsonl'" in err
    code, _, err = minigpt_cli("prepare", folder, "--glob", "*", "--data-dir", tmp_path / "d")
    assert code == 2 and "glob '*' selects jsonl and text files" in err
    assert load_corpus(folder, glob="*.jsonl").format == "jsonl"
    assert load_corpus(folder, glob="*.txt").n_bytes == sum(len(d.encode()) for d in DOCUMENTS[:3])


def test_other_files_beside_the_corpus_are_not_read_by_auto(tmp_path):
    folder = write_jsonl(tmp_path / "j", shards=1)
    (folder / "README.md").write_text("not a document")
    (folder / "notes.json").write_text("{}")
    corpus = load_corpus(folder)
    assert [p.name for p in corpus.files] == ["part-0.jsonl"]


# ---------------------------------------------------------------------------- large files


@pytest.fixture
def small_pieces(monkeypatch):
    """Files over 16 bytes are read 16 bytes at a time: every boundary case, in a small file."""
    monkeypatch.setattr(corpora, "PIECE_BYTES", 16)


def test_a_large_file_streams_in_pieces_to_the_same_tokens(tmp_path, monkeypatch):
    text = "".join(DOCUMENTS) * 20  # multi-byte characters fall on piece boundaries
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    whole = [
        prepare(tmp_path / "big.txt", t, v, tmp_path / "a", progress=False)
        for t, v in (("char", None), ("bpe", 300))
    ]
    monkeypatch.setattr(corpora, "PIECE_BYTES", 16)
    monkeypatch.setattr(encode, "CUT_CHARS", 50)  # and tokenised in pieces too
    pieces = [
        prepare(tmp_path / "big.txt", t, v, tmp_path / "b", progress=False)
        for t, v in (("char", None), ("bpe", 300))
    ]
    for a, b in zip(whole, pieces, strict=True):
        assert digests(a) == digests(b) and a.dir.name == b.dir.name
    (document,) = [  # a large document's pieces are read before the next document is asked for
        doc if isinstance(doc, str) else LargeDocument(doc.n_bytes, list(doc.pieces))
        for doc in load_corpus(tmp_path / "big.txt").documents()
    ]
    assert isinstance(document, LargeDocument) and len(document.pieces) > 100
    assert "".join(document.pieces) == text and document.n_bytes == len(text.encode())


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"a" * 40 + b"\xff" + b"b" * 10, r"not UTF-8 text \(byte 0xff at offset 40\)"),
        (b"a" * 15 + "\u4e2d".encode() + b"\xe4\xb8" + b"c" * 20, r"byte 0xe4 at offset 18\)"),
        (b"a" * 30 + b"\x00" + b"b" * 10, r"looks binary \(it has a NUL byte at offset 30\)"),
        (b"a" * 31 + "\u4e2d".encode()[:2], r"byte 0xe4 at offset 31\)"),  # ends inside a character
    ],
)  # fmt: skip
def test_bad_bytes_in_a_later_piece_are_named_at_their_offset(tmp_path, small_pieces, raw, message):
    (tmp_path / "big.txt").write_bytes(raw)
    with pytest.raises(MinigptError, match=message):
        prepare(tmp_path / "big.txt", data_dir=tmp_path / "d", progress=False)


def test_a_file_that_grows_while_read_is_refused(tmp_path, small_pieces):
    path = tmp_path / "big.txt"
    path.write_text("x" * 100)
    with open(path, "rb") as f:
        pieces = corpora._text_pieces(f, path, 64, lambda n: None)
        with pytest.raises(MinigptError, match="changed size while it was being read"):
            list(pieces)


def test_a_corpus_edited_between_the_passes_is_refused(tmp_path, monkeypatch):
    folder = write_txt(tmp_path / "c")
    real_build = prepare_module.build_tokenizer

    def edit_then_build(*args, **kwargs):
        (folder / "doc000.txt").write_text("edited while preparing\n")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "build_tokenizer", edit_then_build)
    with pytest.raises(MinigptError, match="changed while it was being prepared"):
        prepare(folder, data_dir=tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()  # nothing, not even the folder it made
