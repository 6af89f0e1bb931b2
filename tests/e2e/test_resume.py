"""`minigpt train --resume` as a process: a corpus that changed since the run started is
refused and the run stays as it was; an interrupted run (SIGINT, SIGTERM, kill -9)
resumed gives the straight run's losses exactly; an edited config.json never gets
other files tokenised or written; a run with a padded vocabulary works with every
command."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CASES: dict = {}


def case(name: str):
    return lambda fn: CASES.setdefault(name, fn)


RESUME = ("train", "--resume", "R", "--max-iters", "30")

# --------------------------------------------------------------------------- a changed corpus


def resume_changed(c, change) -> list[str]:
    c.use("base")
    before = c.sha(c.p("R", "config.json"))
    change(c)
    problems = c.refused(c.mg(*RESUME))
    if c.sha(c.p("R", "config.json")) != before:
        problems.append("config.json changed")
    return problems + c.loads()


def shuffled(c) -> None:
    lines = c.p("corpus.txt").read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    c.write("corpus.txt", "".join(lines))


def one_char(c) -> None:
    text = c.p("corpus.txt").read_text()
    i = len(text) // 2
    while text[i] in " \n":
        i += 1
    c.write("corpus.txt", text[:i] + ("a" if text[i] != "a" else "e") + text[i + 1 :])


def symlinked(c) -> None:
    c.write("other.txt", c.words_text(20_000, seed=9))
    c.p("corpus.txt").unlink()
    c.p("corpus.txt").symlink_to("other.txt")


CHANGES = {
    "replaced by other text (new characters)": lambda c: c.write(
        "corpus.txt", c.words_text(20_000, 5, [w.upper() + "7" for w in c.WORDS])
    ),
    "replaced by the same characters, lines shuffled": shuffled,
    "one line appended": lambda c: c.write(
        "corpus.txt", c.p("corpus.txt").read_text() + "the lazy dog\n"
    ),
    "truncated to its first half": lambda c: c.write(
        "corpus.txt", c.p("corpus.txt").read_text()[:10_000]
    ),
    "one character changed": one_char,
    "replaced by a symlink to another text": symlinked,
}
for _label, _change in CHANGES.items():

    @case(f"corpus {_label}, then --resume")
    def _(c, change=_change):
        return resume_changed(c, change)


def folder_run(c) -> list[str]:
    for i in range(3):
        c.write(f"docs/d{i}.txt", c.words_text(8_000, seed=i))
    r = c.mg(*c.train_args("--max-iters", "10", *c.QUICK, data="docs"))
    return [f"the folder run failed: {r.tail}"] if r.rc != 0 else []


for _label, _name, _seed in (("added", "d9", 9), ("edited", "d1", 11)):

    @case(f"folder corpus: a file {_label}, then --resume")
    def _(c, name=_name, seed=_seed):
        problems = folder_run(c)
        before = c.sha(c.p("R", "config.json"))
        c.write(f"docs/{name}.txt", c.words_text(8_000, seed=seed))
        r = c.mg(*RESUME)
        same = [] if c.sha(c.p("R", "config.json")) == before else ["config.json changed"]
        return problems + c.refused(r) + same + c.loads()


@case("control: corpus rewritten with the same bytes, --resume runs")
def _(c):
    c.use("base")
    c.write("corpus.txt", c.p("corpus.txt").read_bytes())
    return c.ok(c.mg(*RESUME))


@case("corpus deleted, then --resume (exit 0, or 2 with config.json kept)")
def _(c):
    c.use("base")
    before = c.sha(c.p("R", "config.json"))
    c.p("corpus.txt").unlink()
    r = c.mg(*RESUME)
    problems = c.clean(r)
    if r.rc == 2 and c.sha(c.p("R", "config.json")) != before:
        problems.append("config.json changed")
    return problems + c.loads()


# --------------------------------------------------------------------------- exact resume


def same_losses(c, upto: int = 30) -> list[str]:
    mine = c.loss_steps(c.p("R", "metrics.jsonl"))
    reference = c.loss_steps(c.runs.folder("straight30") / "S" / "metrics.jsonl")
    steps = [s for s, _ in mine]
    if steps != list(range(1, upto + 1)):
        return [f"metrics.jsonl has loss steps {steps[:3]}..{steps[-3:]} (len {len(steps)})"]
    for (step, loss), (_, want) in zip(mine, reference, strict=False):
        if loss != want:
            return [f"step {step}: loss {loss!r} vs {want!r} straight"]
    return []


def interrupt_at(c, proc, step: int, signum: int) -> list[str]:
    if not c.wait_for(lambda: c.last_step(c.p("R", "metrics.jsonl")) >= step, 60, 0.01):
        return [f"the run never reached step {step}"]
    if not proc.running():
        return ["the run ended before the signal"]
    proc.signal(signum)
    return []


def interrupted_then_resumed(c, signum: int, code: int, *resume_extra) -> list[str]:
    c.corpus()
    proc = c.spawn(*c.train_args(*c.EXACT, "--max-iters", "30"))
    problems = interrupt_at(c, proc, 10, signum)
    r = c.collect(proc, 60)
    if r.rc != code:
        problems.append(f"the interrupted run exited {r.rc}, not {code}")
    problems += c.ok(c.mg("train", "--resume", "R", *resume_extra))
    return problems + same_losses(c)


@case("SIGINT at step >= 10, --resume: losses equal the straight run's")
def _(c):
    return interrupted_then_resumed(c, signal.SIGINT, 130)


@case("SIGTERM at step >= 10, --resume: losses equal the straight run's")
def _(c):
    return interrupted_then_resumed(c, signal.SIGTERM, 143)


@case("interrupted, --resume with another eval_interval: train losses equal")
def _(c):
    return interrupted_then_resumed(c, signal.SIGINT, 130, "--set", "train.eval_interval=3")


@case("interrupted twice, resumed twice: losses equal the straight run's")
def _(c):
    c.corpus()
    proc = c.spawn(*c.train_args(*c.EXACT, "--max-iters", "30"))
    problems = interrupt_at(c, proc, 8, signal.SIGINT)
    c.collect(proc, 60)
    proc = c.spawn("train", "--resume", "R")
    problems += interrupt_at(c, proc, 20, signal.SIGINT)
    c.collect(proc, 60)
    problems += c.ok(c.mg("train", "--resume", "R"))
    return problems + same_losses(c)


@case("kill -9 at step >= 12, --resume: losses equal the straight run's")
def _(c):
    c.corpus()
    proc = c.spawn(*c.train_args(*c.EXACT, "--max-iters", "30"))
    problems = interrupt_at(c, proc, 12, signal.SIGKILL)
    c.collect(proc, 60)
    problems += c.ok(c.mg("train", "--resume", "R"))
    return problems + same_losses(c)


@case("half the steps with lr_decay_iters pinned, --resume to the end: losses equal")
def _(c):
    c.corpus()
    first = c.mg(*c.train_args(*c.EXACT, "--max-iters", "15", "--set", "train.lr_decay_iters=30"))
    return c.ok(first) + c.ok(c.mg(*RESUME)) + same_losses(c)


@case("half the steps, --resume with a new --max-iters: says the schedule changes")
def _(c):
    c.corpus()
    problems = c.ok(c.mg(*c.train_args(*c.EXACT, "--max-iters", "15")))
    r = c.mg(*RESUME)
    said = [ln for ln in c.lines_of(r.out + "\n" + r.err) if re.search(r"max.iters|schedule", ln)]
    if not [ln for ln in said if "reached max_iters" not in ln]:
        problems.append("nothing in the output mentions max_iters (the schedule change)")
    return problems + c.ok(r)


@case("--resume --max-iters fewer than done")
def _(c):
    c.use("base")
    return c.clean(c.mg("train", "--resume", "R", "--max-iters", "10")) + c.loads()


# --------------------------------------------------------------------------- paths in config.json


def only_the_runs_own_corpus(path: Path, run_hash: str) -> list[str]:
    """Nothing in `path`, or only prepared folders of the run's own corpus (its content
    hash): a resume may prepare the run's data again where its config says, but an
    edited config.json must not get any other file tokenised there."""
    if not path.is_dir():
        return []
    others = []
    for folder in path.iterdir():
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("content_hash") != run_hash:
            others.append(folder.name)
    return [f"{path.name}/ got {sorted(others)[:3]}"] if others else []


def elsewhere_resume(c, source: str | None, data_dir: bool):
    """Point config.json's data.source (and data.data_dir) elsewhere, then --resume."""
    c.use("base")

    def change(d):
        if source is not None:
            d["data"]["source"] = source
        if data_dir:
            d["data"]["data_dir"] = str(c.p("elsewhere", "dd"))

    run_hash = json.loads(c.p("R", "config.json").read_text())["prepared_data"]["content_hash"]
    c.edit_json(c.p("R", "config.json"), change)
    r = c.mg(*RESUME)
    return r, only_the_runs_own_corpus(c.p("elsewhere", "dd"), run_hash)


@case("config.json data.source -> another file outside, data_dir elsewhere")
def _(c):
    c.write("outside/notes.txt", c.words_text(20_000, 4, [w.upper() for w in c.WORDS]))
    r, problems = elsewhere_resume(c, str(c.p("outside", "notes.txt")), True)
    return c.refused(r) + problems


@case("config.json data.source -> /etc/hostname, data_dir elsewhere")
def _(c):
    r, problems = elsewhere_resume(c, "/etc/hostname", True)
    return c.refused(r) + problems


@case("config.json data.source -> a same-charset file outside")
def _(c):
    c.write("outside/notes.txt", c.words_text(20_000, 8))
    r, problems = elsewhere_resume(c, str(c.p("outside", "notes.txt")), True)
    return c.refused(r) + problems


@case("config.json data.data_dir -> elsewhere only (nothing but the run's own corpus there)")
def _(c):
    r, problems = elsewhere_resume(c, None, True)
    return c.clean(r) + problems


@case("config.json data.source -> pystdlib (nothing prepared)")
def _(c):
    c.use("base")
    before = sorted(p.name for p in c.p("data").iterdir())
    c.edit_json(c.p("R", "config.json"), lambda d: d["data"].update(source="pystdlib"))
    r = c.mg(*RESUME)
    after = sorted(p.name for p in c.p("data").iterdir())
    new = [f"data/ got {sorted(set(after) - set(before))}"] if after != before else []
    return c.refused(r) + new


@case("config.json train.out_dir -> elsewhere (resume writes only R)")
def _(c):
    c.use("base")
    c.edit_json(c.p("R", "config.json"), lambda d: d["train"].update(out_dir=str(c.p("other"))))
    return c.clean(c.mg(*RESUME)) + c.absent("other")


@case("config.json prepared_data.dir -> a fake folder: inspect-heads")
def _(c):
    c.use("base")
    real = next(c.p("data").iterdir())  # a valid-looking folder outside, val.bin all token 0
    fake = c.p("outside", "fake")
    shutil.copytree(real, fake)
    (fake / "val.bin").write_bytes(bytes(4000))
    c.edit_json(c.p("R", "config.json"), lambda d: d["prepared_data"].update(dir=str(fake)))
    r = c.mg(*c.HEADS)
    if r.rc == 2:
        return c.refused(r)
    used = [] if str(fake) not in r.out + r.err else [f"says it used {fake}/val.bin"]
    return c.ok(r) + used


@case("config.json prepared_data.dir -> '/' : inspect-heads")
def _(c):
    c.use("base")
    c.edit_json(c.p("R", "config.json"), lambda d: d["prepared_data"].update(dir="/"))
    return c.clean(c.mg(*c.HEADS))


@case("resume from another working directory (relative corpus)")
def _(c):
    c.use("base")
    c.p("sub").mkdir()
    return c.ok(c.mg("train", "--resume", "../R", "--max-iters", "30", cwd=c.p("sub")))


# --------------------------------------------------------------------------- a padded vocabulary

PADDED_GENERATE = {
    "generate --temperature 2": ["--temperature", "2"],
    "generate --top-k 500": ["--temperature", "2", "--top-k", "500"],
    "generate --top-p 1.0": ["--temperature", "2", "--top-p", "1.0"],
    "generate --no-kv-cache": ["--temperature", "2", "--no-kv-cache"],
    "generate --num-samples 3": ["--temperature", "2", "--num-samples", "3"],
    "generate --temperature 0": ["--temperature", "0"],
    "generate --top-k 100000": ["--temperature", "2", "--top-k", "100000"],
    "generate --temperature 5 --top-p 0.99": ["--temperature", "5", "--top-p", "0.99"],
    "generate --overflow-stride 0": ["--temperature", "2", "--overflow-stride", "0"],
    "generate --json": ["--temperature", "2", "--json"],
}
for _label, _extra in PADDED_GENERATE.items():

    @case(f"padded vocabulary: {_label}")
    def _(c, extra=_extra):
        c.use("padded")
        return c.ok(c.mg("generate", "R", "-n", "200", "--seed", "1", "--device", "cpu", *extra))


@case("padded vocabulary: inspect-heads")
def _(c):
    c.use("padded")
    return c.ok(c.mg(*c.HEADS))


@case("padded vocabulary: inspect-heads --repeated 16 --layer 0")
def _(c):
    c.use("padded")
    return c.ok(c.mg(*c.HEADS, "--repeated", "16", "--layer", "0"))


@case("padded vocabulary: train --resume")
def _(c):
    c.use("padded")
    return c.ok(c.mg(*RESUME))


@case("padded vocabulary: bpe 300 padded to 512, generate --temperature 2")
def _(c):
    c.corpus(30_000)
    bpe = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"]
    padded = ["--set", "model.vocab_size=512"]
    first = c.mg(*c.train_args("--max-iters", "10", *c.QUICK, *bpe, *padded))
    if first.rc != 0:
        return [f"training failed: {first.tail}"]
    return c.ok(c.mg("generate", "R", "-n", "200", "--seed", "1", "--temperature", "2"))


# --------------------------------------------------------------------------- the tests


def test_resume_keeps_its_promises(problems, name):
    assert problems[name] == []


# --------------------------------------------------------------------------- a signal at each kind of step boundary
# The trainer is run by a launcher that makes it send itself the signal at one chosen
# moment (a wrapper around one of train.py's functions), then by `train --resume`; the
# run must end as the straight run does: the same weights, byte for byte, and the
# same metrics.jsonl records but for their timings.

EVERY = 4  # eval_interval
LAST = 10  # max_iters: the last step is not a multiple of EVERY
EXACT_TINY = [
    *("--seed", "3", "--device", "cpu", "--max-iters", str(LAST)),
    *("--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=16"),
    *("--set", "model.block_size=16", "--set", "train.batch_size=4"),
    *("--set", f"train.eval_interval={EVERY}", "--set", "train.eval_iters=2"),
    *("--set", "train.log_interval=1", "--set", "train.threads=1"),
]
LAUNCHER = """
import os, signal, sys
from minigpt import checkpoint, optim, train

name, phase, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
signum = getattr(signal, name)
sent = []

def send(when=True):
    if when and not sent:
        sent.append(1)
        print(f"sent {name} at {phase} {at}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signum)  # the handler runs before the next line

def before(module, name, hook):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        hook(*args, **kwargs)
        return original(*args, **kwargs)
    setattr(module, name, wrapped)

class OnImport:  # sends the signal while matplotlib's import is under way
    def find_spec(self, name, path=None, target=None):
        send(name.startswith("matplotlib."))

if phase == "step":  # while step `at` runs (its lr is looked up as it starts)
    before(optim, "lr_at", lambda step, *a: send(step == at - 1))
elif phase == "eval":  # once the evaluation after step `at` has begun
    before(train, "evaluate", lambda trainer, stoppable=False: send(stoppable and sent_at(at)))
elif phase == "save":  # as the state of step `at`, evaluated, is saved
    before(train, "save", lambda t, state, loss_checked=False: send(loss_checked and state.step == at))
elif phase == "plot":  # as the finished run imports matplotlib for loss.png
    before(checkpoint, "plot_losses", lambda *a: sys.meta_path.insert(0, OnImport()))

steps = []
def sent_at(step):
    return steps[-1] == step
before(train, "_record_step", lambda trainer, state, *a: steps.append(state.step))

sys.argv = ["minigpt", *sys.argv[4:]]
from minigpt.cli import main
main()
"""
TIMINGS = ("time", "tokens_per_s")


def launched(folder: Path, signum: str, phase: str, at: int, *args: str):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.update(OMP_NUM_THREADS="1", MPLCONFIGDIR=str(folder / ".mpl"))
    argv = [sys.executable, "-c", LAUNCHER, signum, phase, str(at), *args]
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=180)


def run_files(run: Path) -> dict:
    """The weights as bytes, tensor by tensor (safetensors writes its header's metadata in
    a random order, so the files' bytes differ between two processes), and the metrics
    without their timings."""
    from safetensors.torch import load_file

    files = {
        name: {k: t.numpy().tobytes() for k, t in load_file(run / name).items()}
        for name in ("model.safetensors", "model-last.safetensors")
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timeless = [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]
    return {**files, "metrics.jsonl": timeless}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, code_text) -> dict:
    folder = tmp_path_factory.mktemp("straight")
    (folder / "corpus.txt").write_text(code_text)
    done = launched(
        folder, "SIGTERM", "none", 0, "train", "--data", "corpus.txt", "--out", "S", *EXACT_TINY
    )
    assert done.returncode == 0, done.stderr
    return run_files(folder / "S")


BOUNDARIES = [
    ("SIGTERM", "step", 3),  # a step with no evaluation
    ("SIGTERM", "step", EVERY),  # a step that ends in an evaluation
    ("SIGINT", "step", 2 * EVERY),
    ("SIGTERM", "eval", EVERY),  # during that evaluation
    ("SIGTERM", "save", EVERY),  # while its evaluated state is saved
    ("SIGTERM", "step", LAST),  # the last step
    ("SIGINT", "eval", LAST),  # during the final evaluation
    ("SIGTERM", "save", LAST),  # during the final save
    ("SIGTERM", "plot", LAST),  # while the final loss plot imports matplotlib
]


@pytest.mark.parametrize(
    ("signum", "phase", "at"), BOUNDARIES, ids=[f"{s}-{p}-{a}" for s, p, a in BOUNDARIES]
)
def test_a_signal_at_any_step_boundary_then_resume_ends_as_the_straight_run(
    tmp_path, code_text, straight_run, signum, phase, at
):
    (tmp_path / "corpus.txt").write_text(code_text)
    stopped = launched(
        tmp_path, signum, phase, at, "train", "--data", "corpus.txt", "--out", "R", *EXACT_TINY
    )
    word, code = ("interrupted", 130) if signum == "SIGINT" else ("terminated", 143)
    assert f"sent {signum}" in stopped.stderr, "the launcher never sent the signal"
    assert stopped.returncode == code, stopped.stderr
    assert word in stopped.stderr.splitlines() and "Traceback" not in stopped.stderr, stopped.stderr
    if phase == "plot":  # the import the signal landed in went on: the plot is drawn
        assert (tmp_path / "R" / "loss.png").exists(), "loss.png was not drawn"
    resumed = launched(tmp_path, signum, "none", 0, "train", "--resume", "R")
    assert resumed.returncode == 0, resumed.stderr
    mine = run_files(tmp_path / "R")
    assert mine["metrics.jsonl"] == straight_run["metrics.jsonl"]
    for name in ("model.safetensors", "model-last.safetensors"):
        assert mine[name] == straight_run[name], f"{name} differs from the straight run's"
