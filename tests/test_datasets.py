"""datasets.py: the built-in corpora (pystdlib, induction, shakespeare downloaded on
loopback) and their registry."""

import functools
import hashlib
import http.server
import re
import sysconfig
import threading
from pathlib import Path

import pytest

from minigpt import datasets
from minigpt.datasets import (
    BUILTIN_DATASETS,
    SHAKESPEARE_SHA256,
    BuiltinDataset,
    fetch_shakespeare,
    induction_documents,
    stdlib_files,
)
from minigpt.errors import MinigptError
from minigpt.prepare import prepare

SHAKESPEARE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
)


def test_prepare_builtin_registry_and_induction(tmp_path, monkeypatch):
    monkeypatch.setitem(
        BUILTIN_DATASETS,
        "tiny",
        BuiltinDataset("two documents", lambda data_dir, progress: ["ab" * 50, "ba" * 50]),
    )
    prepared = prepare("tiny", "char", data_dir=tmp_path, progress=False)
    assert prepared.meta["source"] == "tiny" and prepared.meta["source_kind"] == "builtin"
    # char has no end-of-text token: each document ends with a newline instead
    assert prepared.tokenizer.chars == ["\n", "a", "b"]
    assert {"pystdlib", "shakespeare", "induction"} <= set(BUILTIN_DATASETS)


def test_induction_documents():
    docs = induction_documents()
    assert len(docs) == 6000
    assert docs == induction_documents()  # fixed seed
    assert docs != induction_documents(seed=1)
    lengths = set()
    for doc in docs:
        assert re.fullmatch("[a-z0-9]+\n", doc)
        line = doc.rstrip("\n")
        segment = line[: len(line) // 3]
        assert line == segment * 3 and 8 <= len(segment) <= 32
        assert len(set(segment)) == len(segment)  # distinct: one match per copy
        lengths.add(len(segment))
    assert lengths == set(range(8, 33))  # every segment length occurs
    short = induction_documents(10, min_segment=5, max_segment=5, copies=2)
    assert all(len(doc) == 11 and doc[:5] == doc[5:10] for doc in short)
    with pytest.raises(MinigptError):
        induction_documents(min_segment=10, max_segment=5)
    with pytest.raises(MinigptError):
        induction_documents(copies=1)
    with pytest.raises(MinigptError):
        induction_documents(alphabet="abcdefghijkl")  # too few for 32 distinct symbols


def test_pystdlib_is_the_standard_library_without_tests():
    files = stdlib_files()
    names = [f.as_posix() for f in files]
    assert len(files) > 300
    assert any(name.endswith("/json/decoder.py") for name in names)
    for skipped in ("/test/", "/tests/", "/idlelib/", "/site-packages/"):
        assert not any(skipped in name for name in names)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert names == sorted(names, key=lambda name: Path(name).relative_to(root).as_posix())
    documents = BUILTIN_DATASETS["pystdlib"].documents(Path("unused"), False)
    assert len(documents) == len(files)
    assert "def " in documents[len(documents) // 2]


# ------------------------------------------------------------------- shakespeare on loopback


@pytest.fixture
def serve(tmp_path):
    """Serve a folder over HTTP on 127.0.0.1; yields a function folder -> base URL."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared/data/tinyshakespeare")
def test_shakespeare_download_on_loopback(tmp_path, serve, monkeypatch, listing):
    site = tmp_path / "site"
    site.mkdir()
    (site / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
    url = serve(site) + "/input.txt"
    path = fetch_shakespeare(tmp_path / "data", url=url, progress=False)
    assert path == tmp_path / "data" / "shakespeare" / "input.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    assert listing(path.parent) == ["input.txt"]
    # once there, it is never fetched again (the URL now goes nowhere)
    monkeypatch.setenv(datasets.SHAKESPEARE_URL_ENV, "http://127.0.0.1:9/input.txt")
    prepared = prepare("shakespeare", "char", data_dir=tmp_path / "data", progress=False)
    assert prepared.meta["characters"] == 1115394 and prepared.tokenizer.vocab_size == 65


def test_shakespeare_wrong_checksum_leaves_nothing(
    tmp_path, serve, monkeypatch, assert_nothing_written
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "input.txt").write_text("To be, or not to be\n" * 100)
    monkeypatch.setenv(datasets.SHAKESPEARE_URL_ENV, serve(site) + "/input.txt")
    with pytest.raises(MinigptError, match="not tiny shakespeare \\(wrong sha256\\)") as err:
        prepare("shakespeare", "char", data_dir=tmp_path / "data", progress=False)
    assert "shakespeare/input.txt" in err.value.hint
    assert_nothing_written(tmp_path / "data")


def test_shakespeare_server_down(tmp_path, serve, assert_nothing_written):
    url = serve(tmp_path) + "/missing.txt"  # 404
    with pytest.raises(MinigptError, match="could not download tiny shakespeare"):
        fetch_shakespeare(tmp_path / "data", url=url, progress=False)
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MinigptError, match="could not download") as err:
        fetch_shakespeare(
            tmp_path / "data", url=f"http://127.0.0.1:{port}/input.txt", progress=False
        )
    assert f"put it at {tmp_path / 'data' / 'shakespeare' / 'input.txt'}" in err.value.hint
    assert_nothing_written(tmp_path / "data")


def test_shakespeare_wrong_file_in_place(tmp_path):
    path = tmp_path / "shakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text("not it")
    with pytest.raises(MinigptError, match="is not tiny shakespeare"):
        fetch_shakespeare(tmp_path, url="http://127.0.0.1:9/", progress=False)
    assert path.read_text() == "not it"
