"""atomic.py's temporary folders: named for their owner, made with ordinary modes, and
cleared once stale, whoever left them; staged folders that land whole, on a mount point
too; output paths that are empty or run through a file."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigpt import atomic
from minigpt import prepare as prepare_module
from minigpt.errors import MinigptError, os_error
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


# -------------------------------------------------------------------------- staged folders


def test_a_new_folder_is_staged_beside_it_and_renamed_whole(tmp_path):
    out = tmp_path / "exp" / "model"
    with atomic.staged_folder(out, last="config.json") as staging:
        assert staging.parent == out.parent and atomic.TEMP_NAME.fullmatch(staging.name)
        assert not out.exists()  # nothing at --out until the folder is complete
        (staging / "weights").write_text("w")
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def cross_device(monkeypatch, mount: Path) -> None:
    """Make `mount` behave as a mount point: a rename into or out of it fails with EXDEV."""
    real_rename, real_replace = os.rename, os.replace

    def inside(path) -> bool:
        return Path(path).absolute().is_relative_to(mount) and Path(path).absolute() != mount

    def guarded(real):
        def move(src, dst, *args, **kwargs):
            if inside(src) != inside(dst) or Path(dst).absolute() == mount:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", guarded(real_rename))
    monkeypatch.setattr(os, "replace", guarded(real_replace))


def test_an_existing_folder_is_staged_inside_it_so_a_mount_point_works(tmp_path, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "lost+found").mkdir()  # what a mounted disk holds: kept
    cross_device(monkeypatch, mount)
    for tokenizer in (["tokenizer.json", "tokenizer_config.json"], []):
        with atomic.staged_folder(mount, replaces=HF_NAMES, last="config.json") as staging:
            assert staging.parent == mount
            for name in ["config.json", "model.safetensors", *tokenizer]:
                (staging / name).write_text(name)
    # the second write made no tokenizer: the first one's is gone, not paired with it
    assert sorted(p.name for p in mount.iterdir()) == [
        "config.json",
        "lost+found",
        "model.safetensors",
    ]


HF_NAMES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def test_the_old_way_fails_across_a_mount_point(tmp_path, monkeypatch):
    """The simulation holds: a folder staged beside a mount point cannot move into it."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    cross_device(monkeypatch, mount)
    staging = atomic.make_temp_dir(mount)
    (staging / "config.json").write_text("{}")
    with pytest.raises(OSError, match="Invalid cross-device link"):
        os.replace(staging / "config.json", mount / "config.json")


def test_config_goes_last_and_a_failure_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError), atomic.staged_folder(out, HF_NAMES, "config.json") as staging:
        (staging / "model.safetensors").write_text("new")
        raise RuntimeError("a write that fails half way")
    assert [(out / n).read_text() for n in ("config.json", "model.safetensors")] == ["old", "old"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    moves = []
    real_replace = os.replace

    def record(src, dst):
        moves.append((Path(src).parent == out, Path(dst).parent == out, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", record)
    with atomic.staged_folder(out, HF_NAMES, "config.json") as staging:
        for name in ("config.json", "model.safetensors", "vocab.json"):
            (staging / name).write_text("new")
    # the old config.json goes first, the new one comes last: between them, no model
    assert moves[0] == (True, False, "config.json") and moves[-1] == (False, True, "config.json")
    moved_in = [name for _, into_out, name in moves if into_out]
    assert sorted(moved_in) == ["config.json", "model.safetensors", "vocab.json"]
    assert (out / "config.json").read_text() == "new"


def test_a_killed_writers_staging_folder_is_cleared_by_the_next_write(tmp_path):
    host = atomic._host_tag()
    out = tmp_path / "exp"
    beside = tmp_path / f".exp.{host}.{dead_pid()}.0a1b2c3d.tmp"  # a new --out's staging
    beside.mkdir()
    (beside / "model.safetensors").write_bytes(b"\0" * 100)
    live = tmp_path / f".exp.{host}.{os.getpid()}.0a1b2c3d.tmp"  # a writer still at work
    live.mkdir()
    with atomic.staged_folder(out) as staging:
        (staging / "config.json").write_text("{}")
    assert not beside.exists() and live.exists()
    inside = out / f".exp.{host}.{dead_pid()}.0a1b2c3d.tmp"  # an existing --out's staging
    inside.mkdir()
    with atomic.staged_folder(out, ("config.json",), "config.json") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_read_only_target_says_read_only(tmp_path, monkeypatch):
    out = tmp_path / "mnt"
    out.mkdir()
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(MinigptError, match=f"cannot write in {out}: Read-only file system"):
        with atomic.staged_folder(out):
            pass


# -------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("text", ["", "  "])
def test_an_empty_output_path_is_refused(text):
    with pytest.raises(MinigptError, match="^--data-dir must not be empty$") as err:
        atomic.out_path(text, "--data-dir", example="data")
    assert "--data-dir data" in err.value.hint
    assert atomic.out_path("runs/a", "--out") == Path("runs/a")


@pytest.mark.parametrize("error", [errno.EEXIST, errno.ENOTDIR])
def test_a_path_through_a_file_is_named_a_file(tmp_path, error):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "afile").write_text("x")
    err = os_error(OSError(error, os.strerror(error), str(tmp_path / "exp" / "afile" / "sub")))
    assert str(err) == f"{tmp_path / 'exp' / 'afile'} is a file, not a folder"
    # where no file is in the way, the machine's own words stay
    other = os_error(OSError(errno.EEXIST, "File exists", str(tmp_path / "exp")))
    assert str(other) == f"cannot use {tmp_path / 'exp'}: File exists"
