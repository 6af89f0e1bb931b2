"""Signals and more than one process at a time: Ctrl-C and SIGTERM stop every command
within seconds with their exit codes (130, 143) and no traceback, leaving no half-made
prepared folder and a run that loads; two trainers (or two prepares) never share a run
or a prepared folder: one runs, the other is refused naming the holder."""

from __future__ import annotations

import shutil
import signal
import time

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
    return problems + c.trainer_loads(c.p("R", "trainer.pt"))


def signal_prepare(c, signum: int, code: int | None) -> list[str]:
    proc = c.spawn("prepare", big(c), "-t", "bpe", "--data-dir", "data")
    preparing(c, proc)
    if not proc.running():
        return ["the command ended before the signal"] + c.clean(c.collect(proc, 1))
    proc.signal(signum)
    r = c.collect(proc, 10)
    problems = ["still running 10 s after the signal"] if r.timed_out else []
    if code is not None and not r.timed_out and r.rc != code:
        problems.append(f"exit {r.rc}, not {code}")
    if "Traceback" in r.err:
        problems.append("traceback")
    partial = c.partial_folders(c.p("data"))
    return problems + ([f"partial folders in data/: {partial}"] if partial else [])


@case("SIGTERM during prepare of a big corpus (bpe)")
def _(c):
    return signal_prepare(c, signal.SIGTERM, None)


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
    return c.clean(c.collect(proc, 10), codes=(143, -15))


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


# --------------------------------------------------------------------------- the tests


def test_signals_and_concurrent_commands_keep_their_promises(problems, name):
    assert problems[name] == []
