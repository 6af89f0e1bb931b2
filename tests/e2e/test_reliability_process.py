"""Reliability as processes: two trainers on one run directory, a stale lock
after kill -9, SIGTERM during a long evaluation, Ctrl-C in generate, a full disk (a
2 MB tmpfs, mounted where the tests run as root), and files the user cannot read or
write (run as an unprivileged user, since root ignores file modes).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from minigpt import checkpoint
from minigpt.checkpoint import CONFIG_FILE, LAST_WEIGHTS, METRICS_FILE, TRAINER_STATE, load_run
from minigpt.errors import MinigptError
from minigpt.prepare import TokenFiles, prepare

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


def tiny_args(folder: Path, text: str, *extra: str) -> list[str]:
    corpus = folder / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(text)
    sets = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16"]
    sets += ["train.batch_size=4", "train.eval_iters=1", "train.log_interval=1"]
    sets += ["train.threads=1", f"data.data_dir={folder / 'data'}", *extra]
    args = ["--data", str(corpus), "--device", "cpu"]
    for item in sets:
        args += ["--set", item]
    return args


def start(args: list[str], cwd: Path, user: int | None = None) -> subprocess.Popen:
    prefix = _as_user(user)
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "minigpt", *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(args: list[str], cwd: Path, user: int | None = None, timeout: float = 120):
    return subprocess.run(
        [*_as_user(user), sys.executable, "-m", "minigpt", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _as_user(user: int | None) -> list[str]:
    if user is None:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]


def one_error(stderr: str) -> bool:
    """The promise for bad input: an `error:` line, at most a hint, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return "Traceback" not in stderr and any(line.startswith("error: ") for line in lines)


# --------------------------------------------------------------------------- two processes


def test_two_trainers_on_one_run_dir_one_runs_and_the_other_is_refused(code_text, tmp_path):
    out = tmp_path / "run"
    args = ["train", *tiny_args(tmp_path, code_text), "--out", str(out), "--max-iters", "200"]
    first, second = start(args, tmp_path), start(args, tmp_path)
    results = [(p.wait(timeout=240), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    winner = (first, second)[[code for code, _, _ in results].index(0)]
    assert f"in use by another training run (pid {winner.pid}" in refused, refused
    assert one_error(refused)
    steps = [step for step, _ in checkpoint.iter_losses(out)]
    assert steps == list(range(1, 201))  # every step once


def test_a_killed_trainers_lock_does_not_block_the_next_one(code_text, wait_for_steps, tmp_path):
    out = tmp_path / "run"
    args = ["train", *tiny_args(tmp_path, code_text), "--out", str(out), "--max-iters", "100000"]
    proc = start([*args, "--set", "train.eval_interval=5"], tmp_path)
    wait_for_steps(out, proc, 6)
    proc.kill()
    proc.communicate()
    resumed = run(["train", "--resume", str(out), "--max-iters", "12"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr


# --------------------------------------------------------------------------- signals


def test_sigterm_during_a_long_evaluation_stops_within_seconds(code_text, wait_for_steps, tmp_path):
    out = tmp_path / "run"
    sets = ["train.eval_interval=3", "train.eval_iters=10000000"]
    args = [
        "train",
        *tiny_args(tmp_path, code_text, *sets),
        "--out",
        str(out),
        "--max-iters",
        "1000",
    ]
    proc = start(args, tmp_path)
    wait_for_steps(out, proc, 3)
    time.sleep(1.0)  # well inside the evaluation at step 3
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 143, stderr
    assert checkpoint.load_trainer_state(out / TRAINER_STATE).step == 3


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_train_prepares_its_data_stops_it_and_leaves_nothing(tmp_path, signum, code):
    corpus = tmp_path / "big.txt"
    corpus.write_text("".join(f"line {i} of a corpus, word{i % 977}\n" for i in range(400_000)))
    out = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(out), "--device", "cpu"]
    args += ["--set", "data.tokenizer=bpe", "--set", f"data.data_dir={tmp_path / 'data'}"]
    data = tmp_path / "data"
    proc = start(args, tmp_path)
    # Signal once the hidden folder of the second pass exists: learning the BPE and
    # tokenizing are still ahead. (A fixed sleep would race a fast machine, which
    # could have finished preparing by then.)
    deadline = time.monotonic() + 60
    while not (data.exists() and any(p.name.endswith(".tmp") for p in data.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "prepare never made its temporary folder"
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15
    assert proc.returncode == code and "Traceback" not in stderr, stderr
    assert not out.exists()  # the run directory it had locked is gone again
    assert not (data.exists() and list(data.iterdir()))  # no folder, hidden or not


def test_ctrl_c_in_generate_prints_interrupted_and_exits_130(code_text, tmp_path):
    out = tmp_path / "run"
    done = run(
        ["train", *tiny_args(tmp_path, code_text), "--out", str(out), "--max-iters", "2"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    proc = start(["generate", str(out), "-n", "1000000", "--device", "cpu"], tmp_path)
    time.sleep(4.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(("raised", "code", "word"),
                         [("Interrupted", 130, "interrupted"), ("Terminated", 143, "terminated")])  # fmt: skip
def test_a_signal_inside_a_half_built_object_exits_without_its_traceback(raised, code, word):
    """A signal raises wherever Python is, inside a library's constructor too (SIGINT
    inside tqdm's, say: its __del__ then fails on a missing attribute, and Python would
    print that traceback at exit). The exit says one word and nothing else."""
    script = f"""
import minigpt.cli as cli
from minigpt.signals import Interrupted, Terminated

class HalfBuilt:
    def __init__(self):
        raise {raised}()  # the signal, mid-constructor
    def __del__(self):
        self.pos  # never set: what tqdm's close read

cli.app = HalfBuilt
cli.main()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env(), timeout=60)  # fmt: skip
    assert done.returncode == code
    assert done.stderr.strip() == word, done.stderr


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs; tests needing it are skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_prepare_on_a_full_disk_is_one_sentence_and_leaves_no_folder(
    code_text, tmp_path, small_disk
):
    corpus = tmp_path / "big.txt"
    corpus.write_text(code_text * 300)  # 2.3 MB of text: twice that as uint16 tokens
    done = run(["prepare", str(corpus), "--data-dir", str(small_disk / "data")], tmp_path)
    assert done.returncode == 2 and one_error(done.stderr), done.stderr
    # checked before the first token is written: char's token count is known exactly
    assert re.search(r"need about 4\.\d MB more, and the disk .* has 2\.\d MB free", done.stderr)
    assert not (small_disk / "data").exists()  # no folder, hidden or not, nor the one it made


def test_a_disk_that_fills_while_tokens_are_written_is_one_sentence(
    code_text, tmp_path, small_disk, monkeypatch
):
    corpus = tmp_path / "big.txt"
    corpus.write_text(code_text * 300)
    monkeypatch.setattr(TokenFiles, "check_room", lambda self, tokens: None)  # misjudged
    with pytest.raises(MinigptError, match="No space left on device") as err:
        prepare(corpus, "char", data_dir=small_disk / "data", progress=False)
    assert "\n" not in str(err.value) and "free some space" in err.value.hint
    assert not (small_disk / "data").exists()


def test_a_save_that_fills_the_disk_stops_the_run_and_keeps_the_last_state(
    code_text, tmp_path, small_disk
):
    out = small_disk / "run"
    args = [
        "train",
        *tiny_args(tmp_path, code_text),
        "--out",
        str(out),
        "--set",
        "train.eval_interval=2",
    ]
    done = run([*args, "--max-iters", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # leave 16 KB
    resumed = run(["train", "--resume", str(out), "--max-iters", "6"], tmp_path)
    assert resumed.returncode == 2 and one_error(resumed.stderr), resumed.stderr
    assert "No space left on device" in resumed.stderr
    assert checkpoint.load_trainer_state(out / TRAINER_STATE).step == 2  # the last good state
    load_run(out)
    load_run(out, weights_file=LAST_WEIGHTS)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_run_too_big_for_the_disk_is_one_sentence(code_text, tmp_path, small_disk):
    out = small_disk / "run"
    args = ["train", *tiny_args(tmp_path, code_text, "model.n_embd=256", "model.n_layer=2")]
    done = run([*args, "--out", str(out), "--max-iters", "2"], tmp_path)
    assert done.returncode == 2 and one_error(done.stderr), done.stderr
    assert not out.exists()  # no run without weights left to pass for a run


# --------------------------------------------------------------------------- permissions


@pytest.fixture
def shared_dir():
    """A folder an unprivileged user can use (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to run commands as another user")
    folder = Path(tempfile.mkdtemp(prefix="minigpt-perm-"))
    folder.chmod(0o777)
    probe = subprocess.run(
        [*_as_user(NOBODY), sys.executable, "-c", "import minigpt.checkpoint"],
        env=env(),
        cwd=folder,
        capture_output=True,
    )
    if probe.returncode != 0:
        shutil.rmtree(folder)
        pytest.skip("the unprivileged user cannot import minigpt here")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def nobodys_run(code_text, shared_dir) -> Path:
    out = shared_dir / "run"
    done = run(
        ["train", *tiny_args(shared_dir, code_text), "--out", str(out), "--max-iters", "2"],
        shared_dir,
        user=NOBODY,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("name", [CONFIG_FILE, "tokenizer.json", "model.safetensors", "."])
def test_an_unreadable_run_file_is_one_sentence_naming_the_permission(nobodys_run, name):
    path = nobodys_run / name
    path.chmod(0)
    done = run(["generate", str(nobodys_run), "-n", "3"], nobodys_run.parent, user=NOBODY)
    path.chmod(0o755 if path.is_dir() else 0o644)
    assert done.returncode == 2 and one_error(done.stderr), done.stderr
    assert "Permission denied" in done.stderr
    assert "no weights" not in done.stderr and "does not exist" not in done.stderr


def test_an_unreadable_trainer_state_is_not_called_damaged(nobodys_run):
    (nobodys_run / TRAINER_STATE).chmod(0)
    args = ["train", "--resume", str(nobodys_run), "--max-iters", "4"]
    done = run(args, nobodys_run.parent, user=NOBODY)
    assert done.returncode == 2 and one_error(done.stderr), done.stderr
    assert "Permission denied" in done.stderr
    assert "damaged" not in done.stderr and "--force" not in done.stderr


def test_a_read_only_run_dir_refuses_resume_before_writing(nobodys_run):
    metrics = (nobodys_run / METRICS_FILE).read_text()
    nobodys_run.chmod(0o555)
    args = ["train", "--resume", str(nobodys_run), "--max-iters", "4"]
    done = run(args, nobodys_run.parent, user=NOBODY)
    nobodys_run.chmod(0o755)
    assert done.returncode == 2 and one_error(done.stderr), done.stderr
    assert (nobodys_run / METRICS_FILE).read_text() == metrics
    load_run(nobodys_run)  # and the run still loads
    load_run(nobodys_run, weights_file=LAST_WEIGHTS)


def test_a_read_only_data_dir_is_one_sentence(code_text, shared_dir):
    data = shared_dir / "data"
    data.mkdir()
    data.chmod(0o555)
    corpus = shared_dir / "corpus.txt"
    corpus.write_text(code_text)
    done = run(["prepare", str(corpus), "--data-dir", str(data)], shared_dir, user=NOBODY)
    assert done.returncode == 2 and one_error(done.stderr), done.stderr
    assert "Permission denied" in done.stderr


def test_kill9_while_prepare_streams_leaves_nothing_the_next_prepare_trusts(code_text, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):  # enough that learning the BPE and tokenising take a while
        (corpus / f"{i:02d}.txt").write_text(f"# file {i}\n" + code_text * 10)
    data_dir = tmp_path / "data"
    args = ["prepare", str(corpus), "--data-dir", str(data_dir), "-t", "bpe", "--vocab-size", "400"]
    child = subprocess.Popen(
        [sys.executable, "-m", "minigpt", *args, "--workers", "1"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(data_dir.glob(".*.tmp")) and child.poll() is None:  # mid-way: building
        assert time.monotonic() < deadline
        time.sleep(0.005)
    child.kill()
    child.wait()
    assert child.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert [p.name for p in data_dir.iterdir() if not p.name.startswith(".")] == []
    again = run(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert list(data_dir.glob(".*.tmp")) == []  # the killed one's leftovers are cleared
    clean = run([*args[:3], str(tmp_path / "clean"), *args[4:]], tmp_path)
    assert clean.returncode == 0, clean.stderr
    (made,) = [p for p in data_dir.iterdir()]
    (reference,) = [p for p in (tmp_path / "clean").iterdir()]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (made / name).read_bytes() == (reference / name).read_bytes()
