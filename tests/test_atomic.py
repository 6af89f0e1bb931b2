"""atomic.py's temporary folders: named for their owner, made with ordinary modes, and
cleared once stale, whoever left them."""

import os
import subprocess
import sys
import time
from pathlib import Path

from minigpt import atomic
from minigpt import prepare as prepare_module
from minigpt.prepare import prepare

# -------------------------------------------------------------------------- temporary folders


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def test_temporary_folder_names_its_owner_and_has_ordinary_modes(tmp_path, monkeypatch, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    seen = {}
    real_tokenize = prepare_module.tokenize_into

    def look(folder, *args, **kwargs):
        seen["name"], seen["mode"] = folder.name, folder.stat().st_mode & 0o777
        return real_tokenize(folder, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "tokenize_into", look)
    previous = os.umask(0o027)
    try:
        prepared = prepare(corpus, "char", data_dir=tmp_path / "data", progress=False)
    finally:
        os.umask(previous)
    match = atomic.TEMP_NAME.fullmatch(seen["name"])
    assert match and match["name"] == prepared.dir.name and int(match["pid"]) == os.getpid()
    assert seen["mode"] == 0o750
    assert prepared.dir.stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0o700
    assert (prepared.dir / "train.bin").stat().st_mode & 0o777 == 0o640


def test_stale_temporary_folders_are_cleared(tmp_path, make_text):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    host = atomic._host_tag()
    day_ago = time.time() - 2 * 24 * 3600

    def folder(name: str, old: bool = False) -> Path:
        path = data_dir / name
        path.mkdir()
        (path / "train.bin").write_bytes(b"\0" * 10)
        if old:
            os.utime(path, (day_ago, day_ago))
        return path

    dead = folder(f".c-char-0123456789ab.{host}.{dead_pid()}.0a1b2c3d.tmp")
    alive = folder(f".c-char-0123456789ab.{host}.{os.getpid()}.0a1b2c3d.tmp")
    old_style = folder(".c-char-0123456789ab.k2j4_xyz.tmp", old=True)
    old_style_recent = folder(".c-char-0123456789ab.q9w8_abc.tmp")
    other_host = folder(".c-char-0123456789ab.elsewhere.12.0a1b2c3d.tmp")
    other_host_old = folder(".c-char-0123456789ab.elsewhere.13.0a1b2c3d.tmp", old=True)
    prepared_folder = folder("c-char-0123456789ab", old=True)
    someone_elses = folder(".notes.tmp", old=True)  # not a name prepare makes: never touched
    link = data_dir / ".c-char-0123456789ab.k2j4_lnk.tmp"
    link.symlink_to(tmp_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text())
    prepare(corpus, "char", data_dir=data_dir, progress=False)
    for gone in (dead, old_style, other_host_old):
        assert not gone.exists()
    for kept in (alive, old_style_recent, other_host, prepared_folder, someone_elses, link):
        assert kept.exists()
    assert (tmp_path / "c.txt").exists()  # the link was not followed
