"""Signals and more than one process at a time: Ctrl-C and SIGTERM stop every command
within seconds with their exit codes (130, 143) and no traceback, leaving no half-made
prepared folder and a run that loads; two trainers (or two prepares) never share a run
or a prepared folder: one runs, the other is refused naming the holder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CASES: dict = {}


def case(name: str):
    return lambda fn: CASES.setdefault(name, fn)


BIG_LINES = 400_000  # long enough that preparing it outlasts the wait for its phases


def big(c) -> str:
    c.write("big.txt", c.big_text(BIG_LINES))
    return "big.txt"


def preparing(c, proc, folder: str = "data") -> bool:
    """Wait until the prepare in `proc` has made its hidden temporary folder."""
    return c.wait_for(lambda: c.tmp_entries(c.p(folder)) or not proc.running(), 120, 0.005)


# --------------------------------------------------------------------------- signals


@case("SIGINT during a long evaluation")
def _(c):
    c.corpus()
    slow = ["--set", "train.eval_iters=100000", "--set", "train.eval_interval=5", *c.LONG]
    proc = c.spawn(*c.train_args("--max-iters", "1000", *slow))
    if not c.wait_for(lambda: c.last_step(c.p("R", "metrics.jsonl")) >= 5, 60):
        proc.kill9()
        return ["the run never reached step 5"]
    time.sleep(1.0)  # inside the evaluation at step 5
    proc.signal(signal.SIGINT)
    r = c.collect(proc, 10)
    if r.timed_out:
        return ["still running 10 s after the signal"]
    problems = [f"exit {r.rc}, not 130"] if r.rc != 130 else []
    return problems + said(r, "interrupted") + c.trainer_loads(c.p("R", "trainer.pt"))


def said(r, word: str) -> list[str]:
    """The one word a stopped command ends with."""
    lines = r.err.strip().splitlines()
    last = lines[-1] if lines else ""
    return [] if last == word else [f"the last line is {last[:80]!r}, not {word!r}"]


def signal_prepare(c, signum: int, code: int) -> list[str]:
    proc = c.spawn("prepare", big(c), "-t", "bpe", "--data-dir", "data")
    preparing(c, proc)
    if not proc.running():
        return ["the command ended before the signal"] + c.clean(c.collect(proc, 1))
    proc.signal(signum)
    r = c.collect(proc, 10)
    problems = ["still running 10 s after the signal"] if r.timed_out else []
    if not r.timed_out and r.rc != code:
        problems.append(f"exit {r.rc}, not {code}")
    problems += said(r, "interrupted" if signum == signal.SIGINT else "terminated")
    if "Traceback" in r.err:
        problems.append("traceback")
    partial = c.partial_folders(c.p("data"))
    return problems + ([f"partial folders in data/: {partial}"] if partial else [])


@case("SIGTERM during prepare of a big corpus (bpe)")
def _(c):
    return signal_prepare(c, signal.SIGTERM, 143)


@case("SIGINT during prepare of a big corpus (bpe)")
def _(c):
    return signal_prepare(c, signal.SIGINT, 130)


@case("SIGTERM while prepare writes, then prepare: no .tmp left")
def _(c):
    proc = c.spawn("prepare", big(c), "--data-dir", "data")
    if not c.wait_for(lambda: c.tmp_entries(c.p("data")), 120, 0.005):
        c.collect(proc, 60)
        return ["never caught the write phase (no .tmp folder seen)"]
    proc.signal(signal.SIGTERM)
    first = c.collect(proc, 10)
    problems = ["still running 10 s after the signal"] if first.timed_out else []
    problems += c.clean(first, codes=(143,)) + said(first, "terminated")
    partial = c.partial_folders(c.p("data"))
    problems += [f"partial folders in data/: {partial}"] if partial else []
    c.corpus()
    r = c.mg("prepare", "corpus.txt", "--data-dir", "data")
    left = c.tmp_entries(c.p("data"))
    return problems + c.ok(r) + ([f"stale {left} left after a later prepare"] if left else [])


@case("SIGTERM to generate: no traceback")
def _(c):
    c.use("base")
    proc = c.spawn("generate", "R", "-n", "100000", "--seed", "0", "--device", "cpu")
    c.wait_for(lambda: proc.out_path.stat().st_size > 0, 30)
    time.sleep(0.5)
    proc.signal(signal.SIGTERM)
    r = c.collect(proc, 10)
    return c.clean(r, codes=(143,)) + said(r, "terminated")


@case("SIGINT twice during training")
def _(c):
    c.use("base")
    proc = c.spawn("train", "--resume", "R", "--max-iters", "100000", *c.LONG)
    if not c.wait_for(lambda: c.last_step(c.p("R", "metrics.jsonl")) > 25, 60):
        proc.kill9()
        return ["the run never got going"]
    proc.signal(signal.SIGINT)
    time.sleep(0.05)
    proc.signal(signal.SIGINT)
    r = c.collect(proc, 10)
    return c.clean(r, codes=(130,)) + c.trainer_loads(c.p("R", "trainer.pt")) + c.loads()


@case("SIGINT one second after train starts")
def _(c):
    c.corpus()
    proc = c.spawn(*c.train_args("--max-iters", "100000", *c.QUICK))
    time.sleep(1.0)
    proc.signal(signal.SIGINT)
    problems = c.clean(c.collect(proc, 10), codes=(130,))
    if c.p("R", "config.json").exists():
        problems += c.loads()
    return problems


# --------------------------------------------------------------------------- two at a time


def trained_for(c, seconds: int) -> tuple:
    return ("train", "--resume", "R", *c.FOR_SECONDS, str(seconds), *c.LONG)


def going(c) -> bool:
    return c.wait_for(lambda: c.last_step(c.p("R", "metrics.jsonl")) > 25, 30)


@case("second trainer starts while the first prepares its data")
def _(c):
    c.corpus()
    first = c.spawn(*c.train_args("--max-iters", "50", *c.LONG, data=big(c)))
    preparing(c, first)
    second = c.spawn(*c.train_args("--max-iters", "50", *c.LONG))
    results = [c.collect(first, 240), c.collect(second, 240)]
    return c.one_wins(results, [first, second]) + c.steps_once(c.p("R", "metrics.jsonl"))


@case("--resume while another trainer trains")
def _(c):
    c.use("base")
    first = c.spawn(*trained_for(c, 5))
    going(c)
    second = c.spawn(*trained_for(c, 5))
    results = [c.collect(first, 180), c.collect(second, 180)]
    return c.one_wins(results, [first, second]) + c.steps_once(c.p("R", "metrics.jsonl"))


@case("two --resume of one run started together")
def _(c):
    c.use("base")
    procs = [c.spawn(*trained_for(c, 3)), c.spawn(*trained_for(c, 3))]
    results = [c.collect(p, 180) for p in procs]
    return c.one_wins(results, procs) + c.steps_once(c.p("R", "metrics.jsonl"))


@case("--force while another trainer trains")
def _(c):
    c.use("base")
    first = c.spawn(*trained_for(c, 5))
    going(c)
    second = c.spawn(*c.train_args("--force", "--max-iters", "100", *c.LONG))
    results = [c.collect(first, 180), c.collect(second, 180)]
    return c.one_wins(results, [first, second]) + c.loads()


@case("stale lock after kill -9: train --force succeeds")
def _(c):
    c.use("base")
    shutil.rmtree(c.p("R"))
    proc = c.spawn(*c.train_args("--max-iters", "100000", *c.LONG))
    if not c.wait_for(lambda: c.last_step(c.p("R", "metrics.jsonl")) >= 5, 60):
        proc.kill9()
        return ["the first trainer never logged a step"]
    proc.kill9()
    c.collect(proc, 30)
    return c.ok(c.mg(*c.train_args("--force", "--max-iters", "20", *c.QUICK), timeout=60))


@case("two trainers, different --out, one fresh data dir, started together")
def _(c):
    c.corpus()
    procs = [c.spawn(*c.train_args("--max-iters", "50", out=out)) for out in ("A", "B")]
    results = [c.collect(p, 180) for p in procs]
    problems = [f"{out}: {p}" for out, r in zip("AB", results, strict=True) for p in c.ok(r)]
    folders = [p.name for p in c.p("data").iterdir()] if c.p("data").is_dir() else []
    if len(folders) != 1:
        problems.append(f"data/ holds {folders}, not one prepared folder")
    return problems


@case("two prepares of one corpus into one data dir at once")
def _(c):
    c.write("corpus.txt", c.words_text(3_000_000, seed=3))
    procs = [c.spawn("prepare", "corpus.txt", "--data-dir", "D") for _ in range(2)]
    results = [c.collect(p, 180) for p in procs]
    problems = [p for r in results for p in c.ok(r)]
    folders = sorted(p.name for p in c.p("D").iterdir()) if c.p("D").is_dir() else []
    if len(folders) != 1:
        problems.append(f"D/ holds {folders}, not one prepared folder")
    return problems


@case("generate while a trainer saves the run")
def _(c):
    c.use("base")
    saving = ["--set", "train.eval_interval=5"]
    trainer = c.spawn("train", "--resume", "R", *c.FOR_SECONDS, "6", *saving, *c.LONG)
    going(c)
    problems = []
    for _ in range(3):
        problems += c.ok(c.mg("generate", "R", "-n", "20", "--seed", "0", "--device", "cpu"))
    c.collect(trainer, 180)
    return problems


# --------------------------------------------------------------------------- a signal inside each command's work
# Each command runs in a launcher that sends the process the signal as a chosen
# function is called for the nth time: the moment is exact, however fast the machine.
# Every command then stops with the shell's code and one word, and leaves nothing
# half-written.

LAUNCHER = """
import importlib, os, signal, sys
name, target, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
module_name, attr = target.split(":")
module = importlib.import_module(module_name)
original, calls = getattr(module, attr), []

def wrapped(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        print(f"sent {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, name))  # the handler runs before the next line
    return original(*args, **kwargs)

setattr(module, attr, wrapped)
sys.argv = ["minigpt", *sys.argv[4:]]
from minigpt.cli import main
main()
"""
WORDS = {"SIGINT": ("interrupted", 130), "SIGTERM": ("terminated", 143)}
TINY_RUN = [
    *("--device", "cpu", "--max-iters", "4", "--set", "model.n_layer=1"),
    *("--set", "model.n_head=2", "--set", "model.n_embd=16", "--set", "model.block_size=16"),
    *("--set", "train.batch_size=4", "--set", "train.eval_iters=1"),
]


def launched(folder: Path, signum: str, target: str, nth: int, *args: str):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.update(OMP_NUM_THREADS="1", MPLCONFIGDIR=str(folder / ".mpl"))
    argv = [sys.executable, "-c", LAUNCHER, signum, target, str(nth), *args]
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def signal_work(tmp_path_factory, code_text) -> Path:
    """R: a tiny run (bpe, so that its export has tokenizer files); hf0: R exported."""
    folder = tmp_path_factory.mktemp("signal-work")
    (folder / "corpus.txt").write_text(code_text)
    train = ["train", "--data", "corpus.txt", "--out", "R", *TINY_RUN]
    done = launched(
        folder,
        "SIGTERM",
        "minigpt.cli:main",
        0,
        *train,
        "--set",
        "data.tokenizer=bpe",
        "--set",
        "data.vocab_size=300",
    )
    assert done.returncode == 0, done.stderr
    done = launched(folder, "SIGTERM", "minigpt.cli:main", 0, "export", "R", "--out", "hf0")
    assert done.returncode == 0, done.stderr
    return folder


def listing(folder: Path) -> list[str]:
    """Everything under folder, hidden entries and empty folders too, but matplotlib's
    cache."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".mpl" not in p.parts)


COMMANDS = {
    # name: (the function whose nth call brings the signal, nth, the command, what must not exist)
    "import, while it writes the run": ("minigpt.checkpoint:write_run", 1, ["import", "hf0", "--out", "I"], "I"),
    "import, after reading the checkpoint": ("minigpt.hf:load_hf_checkpoint", 1, ["import", "hf0", "--out", "I"], "I"),
    "export, while it writes the weights": ("minigpt.hf:save_file", 1, ["export", "R", "--out", "E"], "E"),
    "export, while it writes the tokenizer": ("minigpt.hf:write_hf_tokenizer", 1, ["export", "R", "--out", "E"], "E"),
    "eval, between batches": ("minigpt.evaluate:_batch_nll", 1, ["eval", "R", "--device", "cpu", "--stride", "1"], None),
    "generate, between tokens": ("minigpt.generate:_draw", 5, ["generate", "R", "-n", "50", "--device", "cpu"], None),
    "inspect-heads, while it ablates heads": ("minigpt.heads:ablation_importance", 1, ["inspect-heads", "R", "--device", "cpu"], None),
    "prepare, while it tokenises": ("minigpt.prepare:tokenize_into", 1, ["prepare", "corpus.txt", "--data-dir", "D"], "D/*"),
    "prepare, while the bpe learns": ("minigpt.bpe_training:line_chunks", 2, ["prepare", "corpus.txt", "-t", "bpe", "--vocab-size", "300", "--data-dir", "D"], "D/*"),
    "train, while it prepares its data": ("minigpt.prepare:tokenize_into", 1, ["train", "--data", "corpus.txt", "--out", "T", "--set", "data.data_dir=D", *TINY_RUN], "T"),
}  # fmt: skip
COMMAND_CASES = [(name, signum) for name in COMMANDS for signum in WORDS]


@pytest.mark.parametrize(
    ("command", "signum"), COMMAND_CASES, ids=[f"{n} ({s})" for n, s in COMMAND_CASES]
)
def test_a_signal_inside_a_command_stops_it_with_its_word_and_leaves_nothing(
    signal_work, tmp_path, command, signum
):
    target, nth, args, absent = COMMANDS[command]
    folder = tmp_path / "work"
    shutil.copytree(signal_work, folder)
    before = listing(folder)
    done = launched(folder, signum, target, nth, *args)
    word, code = WORDS[signum]
    assert f"sent {signum}" in done.stderr, f"{target} was never called: {done.stderr}"
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines()[-1] == word and "Traceback" not in done.stderr, done.stderr
    if absent is not None:
        assert not list(folder.glob(absent)), f"{absent} was left behind"
    assert listing(folder) == before, "the command left something behind"


def test_a_signal_while_generate_waits_for_a_prompt_stops_it_at_once(signal_work, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigpt", "generate", "R", "-i", "--device", "cpu"],
        cwd=signal_work,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        prompt = proc.stdout.read(2)  # "> ": the loop now waits on its input
        assert prompt == "> ", prompt
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "terminated" and "Traceback" not in err, err


# --------------------------------------------------------------------------- the tests


def test_signals_and_concurrent_commands_keep_their_promises(problems, name):
    assert problems[name] == []
