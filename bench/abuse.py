"""Abuse harness for issue 11: does every promise of the README hold under hostile use?

Each case runs `python -m minigpt ...` as a subprocess (PYTHONPATH=<tree>, a fresh
temporary working directory per case, OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS=1,
umask 022, address space capped at 8 GiB so that absurd sizes fail fast instead of
swapping the machine), then checks what the case promises with its own check:

    bad input   exit code 2, exactly one `error:` line (at most one `hint:`), no
                `Traceback`, and nothing half-written where the case says so
    files       a previous run directory still loads afterwards
                (`minigpt generate R -n 5 --seed 0 --device cpu` exits 0)

A case *holds* when its check finds no problem. Per class it reports the cases
tried and held, as a table on stdout and as JSON with every case's command, exit
code, last 3 lines of stderr, held and why not.

Classes (issue 11): 1 concurrent trainers, 2 NaN/inf, 3 changed corpus on resume,
4 exact resume, 5 damaged prepared cache, 6 padded vocab, 7 paths from a run dir,
8 tracebacks, 9 signals, 10 smaller promises.

Cases that need a non-root user run the command with `setpriv --reuid=65534
--regid=65534 --clear-groups` (the harness must run as root); full-disk cases mount
a small tmpfs. Where either is impossible those cases are skipped and say why.

Run (about 10 minutes on 2 cores):

    git worktree add --detach /tmp/minigpt-base f4bbfeb   # the code before issue 11
    python bench/abuse.py --tree /tmp/minigpt-base --json-out bench/results/abuse-before.json
    python bench/abuse.py --tree /work/main --json-out bench/results/abuse-after.json
    python bench/abuse.py --only 8 --case safetensors   # one class, cases matching a word
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

TINY = [
    *("--set", "model.n_layer=1", "--set", "model.n_head=2"),
    *("--set", "model.n_embd=32", "--set", "model.block_size=32", "--device", "cpu"),
]
QUICK = [
    *("--set", "train.eval_interval=10", "--set", "train.eval_iters=2"),
    *("--set", "train.batch_size=4"),
]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MEMORY_LIMIT = 8 << 30  # bytes of address space per command
RUN_FILES = (
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "model-last.safetensors",
    "trainer.pt",
)
CLASSES = {
    1: "concurrent trainers",
    2: "NaN / inf",
    3: "changed corpus",
    4: "exact resume",
    5: "damaged cache",
    6: "padded vocab",
    7: "paths",
    8: "tracebacks",
    9: "signals",
    10: "smaller promises",
}
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly pack "
    "their boxes and every river runs to the sea under grey morning light"
).split()

# --------------------------------------------------------------------------- text


def words_text(n_bytes: int, seed: int = 0, words: list[str] = WORDS, per_line: int = 10) -> str:
    """Lines of random words, about n_bytes long (ASCII)."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choices(words, k=per_line)) + "\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def big_text(n_bytes: int, seed: int = 0) -> str:
    """A corpus of n_bytes: 3000 made-up words (enough variety for a BPE to work on)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(3000)]
    words = rng.choices(vocab, k=n_bytes // 6)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(lines) + "\n"


def lines_of(text: str) -> list[str]:
    """Non-blank lines, progress-bar carriage returns split too."""
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]


def sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# --------------------------------------------------------------------------- running minigpt


@dataclass
class Result:
    cmd: str
    rc: int | None  # None: killed after its timeout
    out: str
    err: str
    seconds: float
    timeout: float
    pid: int = 0

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in lines_of(self.err) if ln.startswith("error:")]

    @property
    def tail(self) -> list[str]:
        return lines_of(self.err)[-3:]


@dataclass
class Proc:
    popen: subprocess.Popen
    cmd: str
    out_path: Path
    err_path: Path
    start: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.popen.pid, signum)
        except ProcessLookupError:
            pass

    def kill9(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def running(self) -> bool:
        return self.popen.poll() is None


class Ctx:
    """One case: its working directory, the commands it ran, fixtures it copied."""

    def __init__(self, harness: Harness, case: Case):
        self.h, self.case = harness, case
        slug = re.sub(r"\W+", "-", case.name)[:40]
        self.dir = Path(tempfile.mkdtemp(dir=harness.work, prefix=f"c{case.cls}-{slug}-"))
        os.chmod(self.dir, 0o755)
        self.runs: list[Result] = []
        self.main: Result | None = None
        self.mounts: list[Path] = []
        self._n = 0

    def p(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.p(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def use(self, fixture: str) -> None:
        """Copy a fixture's files (corpus.txt, R, data/...) into this case's directory."""
        shutil.copytree(self.h.fixture(fixture), self.dir, dirs_exist_ok=True, symlinks=True)

    def corpus(self, n_bytes: int = 20_000, seed: int = 0) -> Path:
        return self.write("corpus.txt", words_text(n_bytes, seed))

    def give_to_nobody(self) -> None:
        """chown the case directory to uid/gid 65534, so the non-root user owns its files."""
        subprocess.run(["chown", "-R", "65534:65534", str(self.dir)], check=True)

    # -- commands

    def _argv(self, args: tuple, nobody: bool) -> tuple[list[str], dict, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(self.h.tree),
            "OMP_WAIT_POLICY": "PASSIVE",
            "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": str(self.dir),
            "MPLCONFIGDIR": str(self.p(".mpl")),
            "LANG": "C.UTF-8",
            "TIKTOKEN_CACHE_DIR": str(self.p(".tiktoken")),
        }
        argv = [f"--as={MEMORY_LIMIT}", "--"]
        argv = ["prlimit", *argv, *(NOBODY if nobody else []), sys.executable, "-m", "minigpt"]
        shown = ("[nobody] " if nobody else "") + "minigpt " + shlex.join(str(a) for a in args)
        return [*argv, *map(str, args)], env, shown

    def spawn(self, *args, nobody: bool = False, cwd: Path | None = None, stdin=None) -> Proc:
        argv, env, shown = self._argv(args, nobody)
        self._n += 1
        out_path, err_path = self.p(f".out{self._n}"), self.p(f".err{self._n}")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(
                argv,
                cwd=cwd or self.dir,
                env=env,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                umask=0o022,
            )
        if stdin is not None:
            popen.stdin.write(stdin.encode())
            popen.stdin.close()
        return Proc(popen, shown, out_path, err_path, time.monotonic())

    def collect(self, proc: Proc, timeout: float = 120, aux: bool = False) -> Result:
        """Wait for proc (kill its group after `timeout` s from now) and record it."""
        try:
            rc = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill9()
            proc.popen.wait()
            rc = None
        out = proc.out_path.read_text(encoding="utf-8", errors="replace")
        err = proc.err_path.read_text(encoding="utf-8", errors="replace")
        seconds = time.monotonic() - proc.start
        result = Result(proc.cmd, rc, out, err, seconds, timeout, proc.pid)
        if not aux:
            self.runs.append(result)
            self.main = result
        return result

    def mg(self, *args, nobody=False, timeout=120.0, stdin=None, cwd=None, aux=False) -> Result:
        """Run `minigpt ARGS` to completion."""
        return self.collect(self.spawn(*args, nobody=nobody, cwd=cwd, stdin=stdin), timeout, aux)

    def loads(self, run: str = "R") -> list[str]:
        """Problems if the run directory no longer loads (generate exits 0)."""
        r = self.mg("generate", run, "-n", "5", "--seed", "0", "--device", "cpu", aux=True)
        if r.rc == 0:
            return []
        return [f"{run} no longer loads (generate exit {r.rc}: {' | '.join(r.tail[-1:])})"]

    # -- helpers

    def mount_tmpfs(self, name: str, size: str) -> Path:
        path = self.p(name)
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )
        self.mounts.append(path)
        return path

    def cleanup(self, keep: bool) -> None:
        for path in self.mounts:
            subprocess.run(["umount", "-l", str(path)], check=False)
        if not keep:
            subprocess.run(["chmod", "-R", "u+rwx", str(self.dir)], check=False)
            shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --------------------------------------------------------------------------- checks
# Each returns a list of problems; a case holds when its list is empty.


def refused(r: Result) -> list[str]:
    """Exit 2, one `error:` line (one `hint:` at most), no traceback."""
    if r.timed_out:
        return [f"timed out after {r.timeout:.0f} s"]
    problems = []
    if r.rc != 2:
        problems.append(f"exit {r.rc}, not 2")
    if "Traceback" in r.err:
        problems.append(f"traceback ({lines_of(r.err)[-1][:120]})")
    n_error = len(r.error_lines)
    if n_error != 1:
        problems.append("no `error:` line" if n_error == 0 else f"{n_error} `error:` lines")
    n_hint = sum(ln.startswith("hint:") for ln in lines_of(r.err))
    if n_hint > 1:
        problems.append(f"{n_hint} `hint:` lines")
    return problems


def clean(r: Result, codes=(0, 2)) -> list[str]:
    """No traceback, not timed out, exit code in `codes` (and an error line when 2)."""
    if r.timed_out:
        return [f"timed out after {r.timeout:.0f} s"]
    problems = []
    if r.rc not in codes:
        problems.append(f"exit {r.rc}, not {' or '.join(map(str, codes))}")
    if "Traceback" in r.err:
        problems.append(f"traceback ({lines_of(r.err)[-1][:120]})")
    if r.rc == 2 and not r.error_lines:
        problems.append("exit 2 without an `error:` line")
    return problems


def ok(r: Result) -> list[str]:
    return clean(r, codes=(0,))


def absent(c: Ctx, *names: str) -> list[str]:
    return [f"{name} was written" for name in names if os.path.lexists(c.p(name))]


def empty_or_absent(path: Path) -> list[str]:
    if path.is_dir() and any(path.iterdir()):
        return [f"{path.name}/ got {sorted(p.name for p in path.iterdir())[:3]}"]
    return []


def mentions(r: Result, *words: str) -> list[str]:
    text = " ".join(r.error_lines) or r.err
    return (
        []
        if any(w.lower() in text.lower() for w in words)
        else [f"the message does not mention {' or '.join(map(repr, words))}"]
    )


def avoids(r: Result, *words: str) -> list[str]:
    text = r.err.lower()
    return [f"the message says {w!r}" for w in words if w.lower() in text]


def snapshot(c: Ctx, run: str = "R") -> dict[str, str | None]:
    """Hashes of the files a run's use depends on (config.json may record a resume's new
    train settings; it is written atomically and checked by loading the run)."""
    return {name: sha(c.p(run, name)) for name in RUN_FILES if name != "config.json"}


def unchanged(c: Ctx, before: dict, run: str = "R") -> list[str]:
    after = snapshot(c, run)
    return [f"{run}/{name} changed" for name in before if before[name] != after[name]]


def metrics_records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def loss_steps(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics_records(path) if "loss" in r]


def last_step(path: Path) -> int:
    steps = [r.get("step", 0) for r in metrics_records(path)]
    return max((s for s in steps if isinstance(s, int)), default=-1)


def steps_once(path: Path) -> list[str]:
    steps = [s for s, _ in loss_steps(path)]
    dups = sorted({s for s in steps if steps.count(s) > 1})
    return [f"metrics.jsonl has steps {dups[:5]} more than once"] if dups else []


def one_wins(results: list[Result], procs: list[Proc]) -> list[str]:
    """Exactly one exits 0; the other is refused (exit 2) in one sentence naming the holder."""
    codes = [r.rc for r in results]
    if sorted(codes, key=str) != [0, 2]:
        return [f"exit codes {codes}, not one 0 and one 2"]
    loser, winner = results[codes.index(2)], procs[codes.index(0)]
    problems = refused(loser)
    if not any(str(winner.pid) in line for line in loser.error_lines):
        problems.append(f"the refusal does not name the holder (pid {winner.pid})")
    return problems


def strict_json(text: str) -> object:
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


def prepared_numbers(r: Result) -> tuple[int | None, Path | None]:
    """(train tokens, folder) from `minigpt prepare`'s report."""
    tokens = re.search(r"train tokens\s+([\d,]+)", r.out)
    folder = re.search(r"^\s*in\s+(\S.*)$", r.out, re.M)
    return (
        int(tokens.group(1).replace(",", "")) if tokens else None,
        Path(folder.group(1).strip()) if folder else None,
    )


def finite_weights(c: Ctx, run: str = "R") -> list[str]:
    import torch
    from safetensors.torch import load_file

    problems = []
    try:
        state = torch.load(c.p(run, "trainer.pt"), map_location="cpu", weights_only=True)
        if not all(torch.isfinite(t).all() for t in state["model"].values()):
            problems.append("trainer.pt holds non-finite weights")
    except Exception as err:  # noqa: BLE001 (any failure to read it is the finding)
        problems.append(f"trainer.pt does not load ({type(err).__name__})")
    try:
        weights = load_file(str(c.p(run, "model-last.safetensors")))
        if not all(torch.isfinite(t).all() for t in weights.values()):
            problems.append("model-last.safetensors holds non-finite weights")
    except Exception as err:  # noqa: BLE001
        problems.append(f"model-last.safetensors does not load ({type(err).__name__})")
    return problems


def trainer_loads(c: Ctx, run: str = "R") -> list[str]:
    import torch

    try:
        torch.load(c.p(run, "trainer.pt"), map_location="cpu", weights_only=True)
        return []
    except Exception as err:  # noqa: BLE001
        return [f"trainer.pt does not load ({type(err).__name__})"]


def tmp_entries(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def partial_folders(folder: Path) -> list[str]:
    """Non-hidden folders in a data dir without meta.json."""
    if not folder.is_dir():
        return []
    return [
        p.name
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not (p / "meta.json").exists()
    ]


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    result = change(data)
    path.write_text(json.dumps(data if result is None else result), encoding="utf-8")


# --------------------------------------------------------------------------- registry


@dataclass
class Case:
    cls: int
    name: str
    fn: Callable[[Ctx], list[str]]
    needs: tuple[str, ...] = ()  # "nobody", "mount"


@dataclass
class Outcome:
    cls: int
    name: str
    command: str | None
    exit_code: int | None
    stderr_tail: list[str]
    held: bool | None  # None: skipped
    why: str
    seconds: float
    runs: list[dict] = field(default_factory=list)


CASES: list[Case] = []


def case(cls: int, name: str, needs: tuple[str, ...] = ()):
    def register(fn):
        CASES.append(Case(cls, name, fn, needs))
        return fn

    return register


def train_args(*extra, data="corpus.txt", out="R") -> list[str]:
    return ["train", "--data", data, "--out", out, *TINY, *extra]


# --------------------------------------------------------------------------- fixtures


class Harness:
    def __init__(self, tree: Path, work: Path, keep: bool):
        self.tree, self.work, self.keep = tree, work, keep
        self._fixtures: dict[str, Path | Exception] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.nobody_ok, self.nobody_why = False, ""
        self.mount_ok, self.mount_why = False, ""

    def fixture(self, name: str) -> Path:
        """A fixture directory, built once (thread-safe) by `make_<name>`."""
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._fixtures:
                self._fixtures[name] = self._make_fixture(name)
        if isinstance(self._fixtures[name], Exception):
            raise RuntimeError(f"fixture {name}: {self._fixtures[name]}")
        return self._fixtures[name]

    def _make_fixture(self, name: str) -> Path | Exception:
        folder = self.work / f"fixture-{name}"
        folder.mkdir()
        os.chmod(folder, 0o755)
        c = Ctx(self, Case(0, f"fixture {name}", lambda c: []))
        try:
            FIXTURES[name](c)
            for item in c.dir.iterdir():
                if not item.name.startswith("."):
                    shutil.move(str(item), folder / item.name)
            return folder
        except Exception as err:  # noqa: BLE001 (every case that needs it reports it)
            return err
        finally:
            c.cleanup(keep=False)

    def probe(self) -> None:
        """Can we run as a non-root user, and mount a tmpfs?"""
        if os.geteuid() != 0:
            self.nobody_why = self.mount_why = "the harness does not run as root"
            return
        c = Ctx(self, Case(0, "probe", lambda c: []))
        try:
            c.give_to_nobody()
            r = c.mg("--help", nobody=True, timeout=60, aux=True)
            code = "import torch, safetensors, minigpt.cli"
            argv, env, _ = c._argv((), nobody=True)
            argv = [*argv[: argv.index("-m")], "-c", code]
            check = subprocess.run(argv, cwd=c.dir, env=env, capture_output=True, timeout=120)
            self.nobody_ok = r.rc == 0 and check.returncode == 0
            if not self.nobody_ok:
                self.nobody_why = (
                    "uid 65534 cannot read the tree or the venv: "
                    + (lines_of(r.err + check.stderr.decode(errors="replace")) or ["?"])[-1][:160]
                )
            try:
                c.mount_tmpfs("disk", "1m")
                self.mount_ok = True
            except (subprocess.CalledProcessError, OSError) as err:
                self.mount_why = f"cannot mount a tmpfs ({err})"
        finally:
            c.cleanup(keep=False)


def make_base(c: Ctx) -> None:
    """corpus.txt (20 KB), R: a tiny run trained 20 steps, data/: its prepared corpus."""
    c.corpus()
    r = c.mg(*train_args("--max-iters", "20", *QUICK))
    if r.rc != 0:
        raise RuntimeError(f"the base run failed: {r.tail}")


def make_padded(c: Ctx) -> None:
    c.corpus()
    r = c.mg(*train_args("--max-iters", "20", *QUICK, "--set", "model.vocab_size=512"))
    if r.rc != 0:
        raise RuntimeError(f"the padded run failed: {r.tail}")


EXACT = [
    *("--seed", "1", "--set", "train.eval_interval=5", "--set", "train.log_interval=1"),
    *("--set", "train.batch_size=64", "--set", "train.eval_iters=2"),
]


def make_straight30(c: Ctx) -> None:
    """S: 30 steps straight, the reference losses of class 4."""
    c.corpus()
    r = c.mg(*train_args(*EXACT, "--max-iters", "30", out="S"))
    if r.rc != 0:
        raise RuntimeError(f"the straight run failed: {r.tail}")


def make_big(c: Ctx) -> None:
    """big.txt: a 50 MB corpus (read in place by the cases, never copied)."""
    c.write("big.txt", big_text(50_000_000))


def make_wide(c: Ctx) -> None:
    """R: a run whose files fit a small disk but whose next save does not (n_embd 80)."""
    c.corpus()
    wide = ["--set", "model.n_embd=80", "--max-iters", "20", *QUICK]
    r = c.mg(*train_args(*wide))
    if r.rc != 0:
        raise RuntimeError(f"the wide run failed: {r.tail}")


FIXTURES = {
    "base": make_base,
    "padded": make_padded,
    "straight30": make_straight30,
    "big": make_big,
    "wide": make_wide,
}


# =========================================================================== 1 concurrent trainers

LONG = ["--set", "train.log_interval=1"]
FOR_SECONDS = ["--max-iters", "1000000", "--max-time"]  # + seconds: a trainer that runs that long


@case(1, "two trainers on one --out started together")
def _(c):
    c.use("base")
    shutil.rmtree(c.p("R"))
    args = train_args("--max-iters", "300", *LONG)
    procs = [c.spawn(*args), c.spawn(*args)]
    results = [c.collect(p, 180) for p in procs]
    return one_wins(results, procs) + steps_once(c.p("R", "metrics.jsonl"))


@case(1, "second trainer starts while the first prepares its data")
def _(c):
    c.corpus()
    big = c.h.fixture("big") / "big.txt"  # about 9 s to prepare
    first = c.spawn(*train_args("--max-iters", "50", *LONG, data=str(big)))
    time.sleep(1.0)
    second = c.spawn(*train_args("--max-iters", "50", *LONG))
    results = [c.collect(first, 240), c.collect(second, 240)]
    return one_wins(results, [first, second]) + steps_once(c.p("R", "metrics.jsonl"))


@case(1, "--resume while another trainer trains")
def _(c):
    c.use("base")
    first = c.spawn("train", "--resume", "R", *FOR_SECONDS, "8", *LONG)
    wait_for(lambda: last_step(c.p("R", "metrics.jsonl")) > 25, 30)
    second = c.spawn("train", "--resume", "R", *FOR_SECONDS, "8", *LONG)
    results = [c.collect(first, 180), c.collect(second, 180)]
    return one_wins(results, [first, second]) + steps_once(c.p("R", "metrics.jsonl"))


@case(1, "two --resume of one run started together")
def _(c):
    c.use("base")
    args = ("train", "--resume", "R", *FOR_SECONDS, "4", *LONG)
    procs = [c.spawn(*args), c.spawn(*args)]
    results = [c.collect(p, 180) for p in procs]
    return one_wins(results, procs) + steps_once(c.p("R", "metrics.jsonl"))


@case(1, "--force while another trainer trains")
def _(c):
    c.use("base")
    first = c.spawn("train", "--resume", "R", *FOR_SECONDS, "8", *LONG)
    wait_for(lambda: last_step(c.p("R", "metrics.jsonl")) > 25, 30)
    second = c.spawn(*train_args("--force", "--max-iters", "100", *LONG))
    results = [c.collect(first, 180), c.collect(second, 180)]
    return one_wins(results, [first, second]) + c.loads()


def killed_trainer(c: Ctx) -> list[str]:
    """Start a long fresh train on R and kill -9 it once it has logged a step."""
    c.use("base")
    shutil.rmtree(c.p("R"))
    proc = c.spawn(*train_args("--max-iters", "100000", *LONG))
    if not wait_for(lambda: last_step(c.p("R", "metrics.jsonl")) >= 5, 60):
        proc.kill9()
        return ["the first trainer never logged a step"]
    proc.kill9()
    c.collect(proc, 30, aux=True)
    return []


@case(1, "stale lock after kill -9: --resume succeeds")
def _(c):
    problems = killed_trainer(c)
    return problems or ok(c.mg("train", "--resume", "R", "--max-iters", "30", timeout=60))


@case(1, "stale lock after kill -9: train --force succeeds")
def _(c):
    problems = killed_trainer(c)
    return problems or ok(c.mg(*train_args("--force", "--max-iters", "20", *QUICK), timeout=60))


@case(1, "two trainers, different --out, one fresh data dir, started together")
def _(c):
    c.corpus()
    procs = [c.spawn(*train_args("--max-iters", "50", out=out)) for out in ("A", "B")]
    results = [c.collect(p, 180) for p in procs]
    problems = [f"{out}: {p}" for out, r in zip("AB", results, strict=True) for p in ok(r)]
    folders = [p.name for p in c.p("data").iterdir()] if c.p("data").is_dir() else []
    if len(folders) != 1:
        problems.append(f"data/ holds {folders}, not one prepared folder")
    return problems


@case(1, "two prepares of one corpus into one data dir at once")
def _(c):
    c.write("corpus.txt", words_text(3_000_000, seed=3))
    procs = [c.spawn("prepare", "corpus.txt", "--data-dir", "D") for _ in range(2)]
    results = [c.collect(p, 180) for p in procs]
    problems = [p for r in results for p in ok(r)]
    folders = sorted(p.name for p in c.p("D").iterdir()) if c.p("D").is_dir() else []
    if len(folders) != 1:
        problems.append(f"D/ holds {folders}, not one prepared folder")
    return problems


@case(1, "generate while a trainer saves the run")
def _(c):
    c.use("base")
    trainer = c.spawn(
        "train", "--resume", "R", *FOR_SECONDS, "12", "--set", "train.eval_interval=5", *LONG
    )
    wait_for(lambda: last_step(c.p("R", "metrics.jsonl")) > 25, 30)
    problems = []
    for _ in range(3):
        problems += ok(c.mg("generate", "R", "-n", "20", "--seed", "0", "--device", "cpu"))
    c.collect(trainer, 180, aux=True)
    return problems


# =========================================================================== 2 NaN / inf


@case(2, "lr=1e6 diverges: exit 2, finite checkpoint, resume with lr=1e-3 runs")
def _(c):
    c.use("base")
    shutil.rmtree(c.p("R"))
    hot = ["--set", "train.lr=1e6", "--set", "train.warmup_iters=0", "--set", "train.grad_clip=0"]
    hot += ["--set", "train.eval_interval=1", "--set", "train.eval_iters=2"]
    r = c.mg(*train_args("--max-iters", "50", *hot))
    problems = refused(r) + finite_weights(c)
    resume = c.mg("train", "--resume", "R", "--set", "train.lr=1e-3", aux=True)
    return problems + [f"resume with lr=1e-3: {p}" for p in ok(resume)]


CONFIG_TIME = [
    "train.min_lr=nan",
    "train.weight_decay=nan",
    "train.grad_clip=nan",
    "train.max_time=nan",
    "train.lr=inf",
    "train.max_time=inf",
    "model.dropout=nan",
    "model.init_std=nan",
    "train.lr=nan",
    "train.beta2=nan",
    "train.weight_decay=inf",
    "model.init_std=inf",
    "model.init_std=-1",
]
for _setting in CONFIG_TIME:

    @case(2, f"--set {_setting} refused at config time")
    def _(c, setting=_setting):
        c.corpus()
        r = c.mg(*train_args("--max-iters", "20", *QUICK, "--set", setting))
        return refused(r) + absent(c, "R", "data")


@case(2, "--max-time nan refused at config time")
def _(c):
    c.corpus()
    r = c.mg(*train_args("--max-iters", "20", *QUICK, "--max-time", "nan"))
    return refused(r) + absent(c, "R", "data")


@case(2, "lr = nan in a TOML config refused")
def _(c):
    c.corpus()
    c.write("bad.toml", "[train]\nlr = nan\n")
    r = c.mg("train", "bad.toml", "--data", "corpus.txt", "--out", "R", *TINY, "--max-iters", "20")
    return refused(r) + absent(c, "R", "data")


@case(2, "config.json train.lr = NaN, then --resume")
def _(c):
    c.use("base")
    edit_json(c.p("R", "config.json"), lambda d: d["train"].update(lr=float("nan")))
    before = snapshot(c)
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    return refused(r) + unchanged(c, before) + c.loads()


@case(2, "NaN weights in trainer.pt, then --resume")
def _(c):
    import torch

    c.use("base")
    state = torch.load(c.p("R", "trainer.pt"), map_location="cpu", weights_only=True)
    for tensor in state["model"].values():
        tensor.fill_(float("nan"))
    torch.save(state, c.p("R", "trainer.pt"))
    before = snapshot(c)
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    return refused(r) + unchanged(c, before) + c.loads()


# =========================================================================== 3 changed corpus


def resume_changed(c: Ctx, change: Callable[[Ctx], None]) -> list[str]:
    c.use("base")
    before = sha(c.p("R", "config.json"))
    change(c)
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    problems = refused(r)
    if sha(c.p("R", "config.json")) != before:
        problems.append("config.json changed")
    return problems + c.loads()


def _shuffled(c: Ctx) -> None:
    lines = c.p("corpus.txt").read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    c.write("corpus.txt", "".join(lines))


def _one_char(c: Ctx) -> None:
    text = c.p("corpus.txt").read_text()
    i = len(text) // 2
    while text[i] in " \n":
        i += 1
    c.write("corpus.txt", text[:i] + ("a" if text[i] != "a" else "e") + text[i + 1 :])


def _symlinked(c: Ctx) -> None:
    c.write("other.txt", words_text(20_000, seed=9))
    c.p("corpus.txt").unlink()
    c.p("corpus.txt").symlink_to("other.txt")


CHANGES = {
    "replaced by other text (new characters)": lambda c: c.write(
        "corpus.txt", words_text(20_000, 5, [w.upper() + "7" for w in WORDS])
    ),
    "replaced by the same characters, lines shuffled": _shuffled,
    "one line appended": lambda c: c.write(
        "corpus.txt", c.p("corpus.txt").read_text() + "the lazy dog\n"
    ),
    "truncated to its first half": lambda c: c.write(
        "corpus.txt", c.p("corpus.txt").read_text()[:10_000]
    ),
    "one character changed": _one_char,
    "replaced by a symlink to another text": _symlinked,
}
for _label, _change in CHANGES.items():

    @case(3, f"corpus {_label}, then --resume")
    def _(c, change=_change):
        return resume_changed(c, change)


def folder_run(c: Ctx) -> None:
    for i in range(3):
        c.write(f"docs/d{i}.txt", words_text(8_000, seed=i))
    r = c.mg(*train_args("--max-iters", "10", *QUICK, data="docs"), aux=True)
    if r.rc != 0:
        raise RuntimeError(f"the folder run failed: {r.tail}")


@case(3, "folder corpus: a file added, then --resume")
def _(c):
    folder_run(c)
    before = sha(c.p("R", "config.json"))
    c.write("docs/d9.txt", words_text(8_000, seed=9))
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    same = [] if sha(c.p("R", "config.json")) == before else ["config.json changed"]
    return refused(r) + same + c.loads()


@case(3, "folder corpus: a file edited, then --resume")
def _(c):
    folder_run(c)
    before = sha(c.p("R", "config.json"))
    c.write("docs/d1.txt", words_text(8_000, seed=11))
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    same = [] if sha(c.p("R", "config.json")) == before else ["config.json changed"]
    return refused(r) + same + c.loads()


@case(3, "control: corpus rewritten with the same bytes, --resume runs")
def _(c):
    c.use("base")
    c.write("corpus.txt", c.p("corpus.txt").read_bytes())
    return ok(c.mg("train", "--resume", "R", "--max-iters", "30"))


@case(3, "corpus deleted, then --resume (exit 0, or 2 with config.json kept)")
def _(c):
    c.use("base")
    before = sha(c.p("R", "config.json"))
    c.p("corpus.txt").unlink()
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    problems = clean(r)
    if r.rc == 2 and sha(c.p("R", "config.json")) != before:
        problems.append("config.json changed")
    return problems + c.loads()


# =========================================================================== 4 exact resume


def straight_losses(c: Ctx) -> list[tuple[int, float]]:
    return loss_steps(c.h.fixture("straight30") / "S" / "metrics.jsonl")


def same_losses(c: Ctx, run: str = "R", upto: int = 30) -> list[str]:
    mine, ref = loss_steps(c.p(run, "metrics.jsonl")), straight_losses(c)
    steps = [s for s, _ in mine]
    if steps != list(range(1, upto + 1)):
        return [f"metrics.jsonl has loss steps {steps[:3]}..{steps[-3:]} (len {len(steps)})"]
    for (step, loss), (_, want) in zip(mine, ref, strict=False):
        if loss != want:
            return [f"step {step}: loss {loss!r} vs {want!r} straight"]
    return []


def interrupt_at(c: Ctx, proc: Proc, step: int, signum: int) -> list[str]:
    if not wait_for(lambda: last_step(c.p("R", "metrics.jsonl")) >= step, 60, 0.01):
        return [f"the run never reached step {step}"]
    if not proc.running():
        return ["the run ended before the signal"]
    proc.signal(signum)
    return []


def interrupted_then_resumed(c: Ctx, signum: int, code: int, *resume_extra) -> list[str]:
    c.corpus()
    proc = c.spawn(*train_args(*EXACT, "--max-iters", "30"))
    problems = interrupt_at(c, proc, 10, signum)
    r = c.collect(proc, 60)
    if r.rc != code:
        problems.append(f"the interrupted run exited {r.rc}, not {code}")
    problems += ok(c.mg("train", "--resume", "R", *resume_extra))
    return problems + same_losses(c)


@case(4, "SIGINT at step >= 10, --resume: losses equal 30 straight")
def _(c):
    return interrupted_then_resumed(c, signal.SIGINT, 130)


@case(4, "SIGTERM at step >= 10, --resume: losses equal 30 straight")
def _(c):
    return interrupted_then_resumed(c, signal.SIGTERM, 143)


@case(4, "interrupted, --resume with another eval_interval: train losses equal")
def _(c):
    return interrupted_then_resumed(c, signal.SIGINT, 130, "--set", "train.eval_interval=3")


@case(4, "interrupted twice, resumed twice: losses equal 30 straight")
def _(c):
    c.corpus()
    proc = c.spawn(*train_args(*EXACT, "--max-iters", "30"))
    problems = interrupt_at(c, proc, 8, signal.SIGINT)
    c.collect(proc, 60, aux=True)
    proc = c.spawn("train", "--resume", "R")
    problems += interrupt_at(c, proc, 20, signal.SIGINT)
    c.collect(proc, 60, aux=True)
    problems += ok(c.mg("train", "--resume", "R"))
    return problems + same_losses(c)


@case(4, "kill -9 at step >= 12, --resume: losses equal 30 straight")
def _(c):
    c.corpus()
    proc = c.spawn(*train_args(*EXACT, "--max-iters", "30"))
    problems = interrupt_at(c, proc, 12, signal.SIGKILL)
    c.collect(proc, 60, aux=True)
    problems += ok(c.mg("train", "--resume", "R"))
    return problems + same_losses(c)


@case(4, "15 steps with lr_decay_iters=30, --resume --max-iters 30: losses equal")
def _(c):
    c.corpus()
    first = c.mg(*train_args(*EXACT, "--max-iters", "15", "--set", "train.lr_decay_iters=30"))
    return ok(first) + ok(c.mg("train", "--resume", "R", "--max-iters", "30")) + same_losses(c)


@case(4, "15 steps, --resume --max-iters 30: says the schedule changes")
def _(c):
    c.corpus()
    problems = ok(c.mg(*train_args(*EXACT, "--max-iters", "15"), aux=True))
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    said = [ln for ln in lines_of(r.out + "\n" + r.err) if re.search(r"max.iters|schedule", ln)]
    if not [ln for ln in said if "reached max_iters" not in ln]:
        problems.append("nothing in the output mentions max_iters (the schedule change)")
    return problems + ok(r)


@case(4, "20 steps, --resume --max-iters 10 (fewer than done)")
def _(c):
    c.use("base")
    return clean(c.mg("train", "--resume", "R", "--max-iters", "10")) + c.loads()


# =========================================================================== 5 damaged cache


def _truncate_half(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


def _meta_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder / "meta.json", change)


def _dir_instead(folder: Path, name: str) -> None:
    (folder / name).unlink()
    (folder / name).mkdir()


DAMAGES: dict[str, Callable[[Path], None]] = {
    "train.bin truncated to half": lambda f: _truncate_half(f, "train.bin"),
    "train.bin of odd size": lambda f: (f / "train.bin").write_bytes(
        (f / "train.bin").read_bytes() + b"\0"
    ),
    "val.bin deleted": lambda f: (f / "val.bin").unlink(),
    "train.bin deleted": lambda f: (f / "train.bin").unlink(),
    "val.bin emptied": lambda f: (f / "val.bin").write_bytes(b""),
    '"dtype" removed from meta.json': _meta_edit(lambda m: m.pop("dtype")),
    'meta.json "dtype" = "float64"': _meta_edit(lambda m: m.update(dtype="float64")),
    "meta.json train_tokens wrong": _meta_edit(lambda m: m.update(train_tokens=5)),
    "meta.json not JSON": lambda f: (f / "meta.json").write_text("{not json"),
    "meta.json a JSON list": lambda f: (f / "meta.json").write_text("[]"),
    "tokenizer.json not JSON": lambda f: (f / "tokenizer.json").write_text("{"),
    "train.bin a directory": lambda f: _dir_instead(f, "train.bin"),
}


def whole_again(folder: Path | None, tokens: int) -> list[str]:
    """The prepared folder's files agree with the token counts again."""
    if folder is None:
        return ["prepare did not say which folder"]
    try:
        meta = json.loads((folder / "meta.json").read_text())
        size = {"uint16": 2, "uint32": 4}[meta["dtype"]]
        train_ok = (folder / "train.bin").stat().st_size == tokens * size
        val_ok = (folder / "val.bin").stat().st_size == meta["val_tokens"] * size
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{folder.name} is still damaged"]
    return [] if train_ok and val_ok else [f"{folder.name}: token files do not match meta.json"]


def damaged_cache(c: Ctx, damage: Callable[[Path], None], then_train_only: bool) -> list[str]:
    c.corpus()
    first = c.mg("prepare", "corpus.txt", "--data-dir", "D", aux=True)
    tokens, folder = prepared_numbers(first)
    if first.rc != 0 or tokens is None or folder is None:
        return [f"the first prepare failed: {first.tail}"]
    damage(c.dir / folder)
    problems = []
    if not then_train_only:
        r = c.mg("prepare", "corpus.txt", "--data-dir", "D")
        again, folder2 = prepared_numbers(r)
        problems += ok(r)
        if r.rc == 0 and again != tokens:
            problems.append(f"reports {again} train tokens, not {tokens}")
        problems += whole_again(c.dir / folder2 if folder2 else None, tokens) if r.rc == 0 else []
    train = c.mg(*train_args("--max-iters", "5", *QUICK, "--set", "data.data_dir=D"))
    problems += [f"train after: {p}" for p in ok(train)]
    if then_train_only:
        problems += whole_again(c.dir / folder, tokens)
    return problems


for _label, _damage in DAMAGES.items():

    @case(5, f"{_label}, prepare again")
    def _(c, damage=_damage):
        return damaged_cache(c, damage, then_train_only=False)


@case(5, "train.bin truncated to half, then train directly")
def _(c):
    return damaged_cache(c, DAMAGES["train.bin truncated to half"], then_train_only=True)


@case(5, "val.bin deleted, then train directly")
def _(c):
    return damaged_cache(c, DAMAGES["val.bin deleted"], then_train_only=True)


# =========================================================================== 6 padded vocab

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

    @case(6, _label)
    def _(c, extra=_extra):
        c.use("padded")
        r = c.mg("generate", "R", "-n", "200", "--seed", "1", "--device", "cpu", *extra)
        return ok(r)


@case(6, "inspect-heads")
def _(c):
    c.use("padded")
    return ok(c.mg("inspect-heads", "R", "--device", "cpu"))


@case(6, "inspect-heads --repeated 16 --layer 0")
def _(c):
    c.use("padded")
    return ok(c.mg("inspect-heads", "R", "--repeated", "16", "--layer", "0", "--device", "cpu"))


@case(6, "train --resume")
def _(c):
    c.use("padded")
    return ok(c.mg("train", "--resume", "R", "--max-iters", "30"))


@case(6, "bpe 300 padded to 512: generate --temperature 2")
def _(c):
    c.corpus(30_000)
    bpe = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"]
    first = c.mg(*train_args("--max-iters", "10", *QUICK, *bpe, "--set", "model.vocab_size=512"))
    if first.rc != 0:
        return [f"training failed: {first.tail}"]
    return ok(c.mg("generate", "R", "-n", "200", "--seed", "1", "--temperature", "2"))


# =========================================================================== 7 paths


def elsewhere_resume(c: Ctx, source: str | None, data_dir: bool) -> tuple[Result, list[str]]:
    """Point config.json's data.source (and data.data_dir) elsewhere, then --resume."""
    c.use("base")

    def change(d):
        if source is not None:
            d["data"]["source"] = source
        if data_dir:
            d["data"]["data_dir"] = str(c.p("elsewhere", "dd"))

    run_hash = json.loads(c.p("R", "config.json").read_text())["prepared_data"]["content_hash"]
    edit_json(c.p("R", "config.json"), change)
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    return r, only_the_runs_own_corpus(c.p("elsewhere", "dd"), run_hash)


def only_the_runs_own_corpus(path: Path, run_hash: str) -> list[str]:
    """Nothing in `path`, or only prepared folders of the run's own corpus (its
    content hash): a resume may prepare the run's data again where its config says,
    but an edited config.json must not get any other file tokenised there."""
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


@case(7, "config.json data.source -> another file outside, data_dir elsewhere")
def _(c):
    c.write("outside/notes.txt", words_text(20_000, 4, [w.upper() for w in WORDS]))
    r, problems = elsewhere_resume(c, str(c.p("outside", "notes.txt")), True)
    return refused(r) + problems


@case(7, "config.json data.source -> /etc/hostname, data_dir elsewhere")
def _(c):
    r, problems = elsewhere_resume(c, "/etc/hostname", True)
    return refused(r) + problems


@case(7, "config.json data.source -> a same-charset file outside")
def _(c):
    c.write("outside/notes.txt", words_text(20_000, 8))
    r, problems = elsewhere_resume(c, str(c.p("outside", "notes.txt")), True)
    return refused(r) + problems


@case(7, "config.json data.data_dir -> elsewhere only (nothing but the run's own corpus there)")
def _(c):
    r, problems = elsewhere_resume(c, None, True)
    return clean(r) + problems


@case(7, "config.json data.source -> pystdlib (nothing prepared)")
def _(c):
    c.use("base")
    before = sorted(p.name for p in c.p("data").iterdir())
    edit_json(c.p("R", "config.json"), lambda d: d["data"].update(source="pystdlib"))
    r = c.mg("train", "--resume", "R", "--max-iters", "30")
    after = sorted(p.name for p in c.p("data").iterdir())
    new = [f"data/ got {sorted(set(after) - set(before))}"] if after != before else []
    return refused(r) + new


@case(7, "config.json train.out_dir -> elsewhere (resume writes only R)")
def _(c):
    c.use("base")
    edit_json(c.p("R", "config.json"), lambda d: d["train"].update(out_dir=str(c.p("other"))))
    return clean(c.mg("train", "--resume", "R", "--max-iters", "30")) + absent(c, "other")


def fake_prepared(c: Ctx) -> Path:
    """A valid-looking prepared folder outside the project: meta.json and a val.bin."""
    real = next(c.p("data").iterdir())
    fake = c.p("outside", "fake")
    shutil.copytree(real, fake)
    (fake / "val.bin").write_bytes(bytes(4000))  # token 0 only
    return fake


@case(7, "config.json prepared_data.dir -> a fake folder: inspect-heads")
def _(c):
    c.use("base")
    fake = fake_prepared(c)
    edit_json(c.p("R", "config.json"), lambda d: d["prepared_data"].update(dir=str(fake)))
    r = c.mg("inspect-heads", "R", "--device", "cpu")
    if r.rc == 2:
        return refused(r)
    used = [] if str(fake) not in r.out + r.err else [f"says it used {fake}/val.bin"]
    return ok(r) + used


@case(7, "config.json prepared_data.dir -> '/' : inspect-heads")
def _(c):
    c.use("base")
    edit_json(c.p("R", "config.json"), lambda d: d["prepared_data"].update(dir="/"))
    return clean(c.mg("inspect-heads", "R", "--device", "cpu"))


def glob_case(c: Ctx, glob: str) -> list[str]:
    c.write("secret.txt", words_text(5_000, 2))
    c.write("folder/a.txt", words_text(5_000, 3))
    r = c.mg("prepare", "folder", "--glob", glob, "--data-dir", "D")
    return refused(r) + absent(c, "D")


for _glob in ("../*.txt", "/etc/*", "**/../../*.txt", "../**/*.txt", ""):

    @case(7, f"prepare FOLDER --glob {_glob!r}")
    def _(c, glob=_glob):
        return glob_case(c, glob)


@case(7, "resume from another working directory (relative corpus)")
def _(c):
    c.use("base")
    c.p("sub").mkdir()
    return ok(c.mg("train", "--resume", "../R", "--max-iters", "30", cwd=c.p("sub")))


@case(7, "symlink loop as source folder")
def _(c):
    c.write("loop/a.txt", words_text(5_000, 3))
    c.p("loop", "self").symlink_to(".")
    return clean(c.mg("prepare", "loop", "--data-dir", "D", timeout=60))


@case(7, "--out equal to the data file")
def _(c):
    c.corpus()
    before = sha(c.p("corpus.txt"))
    r = c.mg(*train_args("--max-iters", "5", *QUICK, out="corpus.txt"))
    same = [] if sha(c.p("corpus.txt")) == before else ["corpus.txt changed"]
    return refused(r) + same


# =========================================================================== 8 tracebacks


def edited_run(c: Ctx, edit: Callable[[Ctx], None], *command) -> list[str]:
    c.use("base")
    edit(c)
    return refused(c.mg(*command))


GEN = ("generate", "R", "-n", "20", "--seed", "0", "--device", "cpu")
HEADS = ("inspect-heads", "R", "--device", "cpu")


def _config(change: Callable[[dict], object]) -> Callable[[Ctx], None]:
    return lambda c: edit_json(c.p("R", "config.json"), change)


def _tokenizer(change: Callable[[dict], object]) -> Callable[[Ctx], None]:
    return lambda c: edit_json(c.p("R", "tokenizer.json"), change)


def _dup_chars(d: dict) -> None:
    d["chars"] = d["chars"][:-1] + [d["chars"][0]]


CONFIG_EDITS: dict[str, tuple[Callable[[Ctx], None], tuple]] = {
    "config.json n_embd=64 (weights do not match): generate": (
        _config(lambda d: d["model"].update(n_embd=64)),
        GEN,
    ),
    "config.json n_embd=64: inspect-heads": (
        _config(lambda d: d["model"].update(n_embd=64)),
        HEADS,
    ),
    "config.json block_size=64: generate": (
        _config(lambda d: d["model"].update(block_size=64)),
        GEN,
    ),
    "config.json block_size=64: inspect-heads": (
        _config(lambda d: d["model"].update(block_size=64)),
        HEADS,
    ),
    'config.json without "model": generate': (_config(lambda d: d.pop("model")), GEN),
    'config.json without "model": inspect-heads': (_config(lambda d: d.pop("model")), HEADS),
    'config.json "model": 5': (_config(lambda d: d.update(model=5)), GEN),
    'config.json model.dropout "x"': (_config(lambda d: d["model"].update(dropout="x")), GEN),
    "config.json model.vocab_size=-1": (_config(lambda d: d["model"].update(vocab_size=-1)), GEN),
    "config.json a JSON list": (_config(lambda d: [1, 2]), GEN),
    "config.json empty": (lambda c: c.write("R/config.json", ""), GEN),
    "tokenizer.json without chars": (_tokenizer(lambda d: d.pop("chars")), GEN),
    'tokenizer.json "chars": 5': (_tokenizer(lambda d: d.update(chars=5)), GEN),
    "tokenizer.json duplicate chars": (_tokenizer(_dup_chars), GEN),
    "tokenizer.json not JSON": (lambda c: c.write("R/tokenizer.json", "{"), GEN),
    "model.safetensors empty": (lambda c: c.write("R/model.safetensors", b""), GEN),
    "model.safetensors truncated": (
        lambda c: _truncate_half(c.p("R"), "model.safetensors"),
        GEN,
    ),
    "run dir is an empty folder": (lambda c: [shutil.rmtree(c.p("R")), c.p("R").mkdir()], GEN),
    "config.json train: [] on --resume": (
        _config(lambda d: d.update(train=[])),
        ("train", "--resume", "R", "--max-iters", "30"),
    ),
    "config.json without data on --resume": (
        _config(lambda d: d.pop("data")),
        ("train", "--resume", "R", "--max-iters", "30"),
    ),
}
for _label, (_edit, _command) in CONFIG_EDITS.items():

    @case(8, _label)
    def _(c, edit=_edit, command=_command):
        return edited_run(c, edit, *command)


def _nan_weights(c: Ctx) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(c.p("R", "model.safetensors")))
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()},
        str(c.p("R", "model.safetensors")),
    )


@case(8, "NaN weights in model.safetensors: generate")
def _(c):
    return edited_run(c, _nan_weights, *GEN)


TRAINER_DAMAGE = {
    "trainer.pt empty": lambda c: c.write("R/trainer.pt", b""),
    "trainer.pt truncated to half": lambda c: _truncate_half(c.p("R"), "trainer.pt"),
    "trainer.pt a directory": lambda c: _dir_instead(c.p("R"), "trainer.pt"),
    "trainer.pt holds a list": lambda c: __import__("torch").save([1, 2], c.p("R", "trainer.pt")),
}
for _label, _damage in TRAINER_DAMAGE.items():

    @case(8, f"{_label}, then --resume")
    def _(c, damage=_damage):
        c.use("base")
        damage(c)
        return refused(c.mg("train", "--resume", "R", "--max-iters", "30")) + c.loads()


METRICS = {
    "[1,2]": b"[1,2]\n",
    '{"step":"x"}': b'{"step":"x"}\n',
    "non-UTF-8 bytes": b"\xff\xfe{\n",
}
for _label, _bytes in METRICS.items():

    @case(8, f"metrics.jsonl with {_label}, then --resume")
    def _(c, raw=_bytes):
        c.use("base")
        path = c.p("R", "metrics.jsonl")
        path.write_bytes(path.read_bytes() + raw)
        return clean(c.mg("train", "--resume", "R", "--max-iters", "30")) + c.loads()


def as_nobody(c: Ctx, lock: Callable[[Ctx], None], *command) -> Result:
    c.use("base")
    c.give_to_nobody()
    lock(c)
    return c.mg(*command, nobody=True)


UNREADABLE = {
    "unreadable config.json: generate": ("R/config.json", GEN),
    "unreadable tokenizer.json: generate": ("R/tokenizer.json", GEN),
    "unreadable run dir: generate": ("R", GEN),
    "unreadable config.json: --resume": ("R/config.json", ("train", "--resume", "R")),
    "unreadable corpus: train": ("corpus.txt", train_args("--max-iters", "5", out="R2")),
    "unreadable inspect-heads --prompt-file": ("p.txt", (*HEADS, "--prompt-file", "p.txt")),
}
for _label, (_target, _command) in UNREADABLE.items():

    @case(8, f"{_label} (non-root)", needs=("nobody",))
    def _(c, target=_target, command=_command):
        c.write("p.txt", "the dog")
        r = as_nobody(c, lambda c: os.chmod(c.p(target), 0), *command)
        return refused(r)


@case(8, "read-only run dir on --resume (non-root)", needs=("nobody",))
def _(c):
    r = as_nobody(
        c, lambda c: os.chmod(c.p("R"), 0o555), "train", "--resume", "R", "--max-iters", "30"
    )
    os.chmod(c.p("R"), 0o755)
    return refused(r) + c.loads()


@case(8, "read-only --data-dir (non-root)", needs=("nobody",))
def _(c):
    def lock(c):
        c.p("ro").mkdir()
        os.chown(c.p("ro"), 65534, 65534)
        os.chmod(c.p("ro"), 0o555)

    return refused(as_nobody(c, lock, "prepare", "corpus.txt", "--data-dir", "ro"))


@case(8, "inspect-heads --html into a read-only folder (non-root)", needs=("nobody",))
def _(c):
    def lock(c):
        c.p("ro").mkdir()
        os.chown(c.p("ro"), 65534, 65534)
        os.chmod(c.p("ro"), 0o555)

    return refused(as_nobody(c, lock, *HEADS, "--html", "ro/v.html"))


@case(8, "prepare --data-dir that is a file")
def _(c):
    c.corpus()
    c.write("afile", "x")
    return refused(c.mg("prepare", "corpus.txt", "--data-dir", "afile"))


@case(8, "prepare --data-dir under a file")
def _(c):
    c.corpus()
    c.write("afile", "x")
    return refused(c.mg("prepare", "corpus.txt", "--data-dir", "afile/sub"))


@case(8, "train with data.data_dir a file")
def _(c):
    c.corpus()
    c.write("afile", "x")
    r = c.mg(*train_args("--max-iters", "5", "--set", "data.data_dir=afile"))
    return refused(r) + absent(c, "R")


@case(8, "train --out afile/run")
def _(c):
    c.use("base")
    c.write("afile", "x")
    r = c.mg(*train_args("--max-iters", "5", *QUICK, out="afile/run"))
    return refused(r) + ([] if c.p("afile").read_text() == "x" else ["afile changed"])


@case(8, "train --force --out afile")
def _(c):
    c.use("base")
    c.write("afile", "x")
    r = c.mg(*train_args("--force", "--max-iters", "5", *QUICK, out="afile"))
    return refused(r) + ([] if c.p("afile").read_text() == "x" else ["afile changed"])


@case(8, "a directory named model.safetensors in --out, train --force")
def _(c):
    c.use("base")
    _dir_instead(c.p("R"), "model.safetensors")
    return refused(c.mg(*train_args("--force", "--max-iters", "5", *QUICK)))


@case(8, "inspect-heads --json to a folder")
def _(c):
    c.use("base")
    c.p("outdir").mkdir()
    return refused(c.mg(*HEADS, "--json", "outdir"))


def disk_files(disk: Path) -> list[str]:
    return [str(p.relative_to(disk)) for p in disk.rglob("*")]


@case(8, "full disk: prepare a 3 MB corpus onto a 2 MB tmpfs", needs=("mount",))
def _(c):
    c.write("corpus.txt", words_text(3_000_000, 1))
    disk = c.mount_tmpfs("disk", "2m")
    r = c.mg("prepare", "corpus.txt", "--data-dir", "disk/data")
    left = [p for p in disk_files(disk) if p != "data"]
    return refused(r) + ([f"left on the disk: {left[:3]}"] if left else [])


@case(8, "full disk: train a 12 MB model with --out on a 2 MB tmpfs", needs=("mount",))
def _(c):
    c.use("base")
    disk = c.mount_tmpfs("disk", "2m")
    big = ["--set", "model.n_embd=256", "--set", "model.n_layer=4", "--set", "model.n_head=4"]
    r = c.mg(*train_args("--max-iters", "5", *QUICK, *big, out="disk/R"))
    problems = refused(r)
    tmp = [p for p in disk_files(disk) if p.endswith(".tmp")]
    problems += [f"temporary files left: {tmp[:3]}"] if tmp else []
    if any(c.p("disk", "R", name).exists() for name in RUN_FILES):
        problems += [f"half-written run: {p}" for p in c.loads("disk/R")]
    return problems


@case(8, "full disk: --resume of a run whose next save does not fit", needs=("mount",))
def _(c):
    c.use("wide")
    size = sum(p.stat().st_size for p in c.p("R").iterdir()) + 96 * 1024
    disk = c.mount_tmpfs("disk", str(size))
    shutil.copytree(c.p("R"), disk / "R")
    before = snapshot(c, "disk/R")
    r = c.mg("train", "--resume", "disk/R", "--max-iters", "40")
    return refused(r) + unchanged(c, before, "disk/R") + c.loads("disk/R")


GENERATE_ARGS = {
    "generate --max-new-tokens -1": ["--max-new-tokens", "-1"],
    "generate --top-p 2": ["--top-p", "2"],
    "generate --top-k 0": ["--top-k", "0"],
    "generate --temperature -1": ["--temperature", "-1"],
    "generate --temperature nan": ["--temperature", "nan"],
    "generate --num-samples 1000000000": ["--num-samples", "1000000000"],
    "generate --overflow-stride -1": ["--overflow-stride", "-1"],
    "generate --seed 99999999999999999999999": ["--seed", "99999999999999999999999"],
    "generate --prompt-file a folder": ["--prompt-file", "R"],
}
for _label, _extra in GENERATE_ARGS.items():

    @case(8, _label)
    def _(c, extra=_extra):
        c.use("base")
        return refused(c.mg("generate", "R", "-n", "20", *extra, timeout=60))


@case(8, "generate --temperature 1e-40 (exit 0 with the greedy text, or 2)")
def _(c):
    c.use("base")
    r = c.mg(*GEN, "--temperature", "1e-40")
    problems = clean(r)
    # a tiny temperature is greedy decoding; the greedy text of an undertrained model
    # may be only newlines or spaces, so compare with --temperature 0, not with ""
    if r.rc == 0 and r.out != c.mg(*GEN, "--temperature", "0").out:
        problems.append("exit 0 but not the greedy text")
    return problems


@case(8, "generate -p with characters the model never saw")
def _(c):
    c.use("base")
    return clean(c.mg(*GEN, "-p", "ζ€"))


@case(8, "inspect-heads --layer 99")
def _(c):
    c.use("base")
    return refused(c.mg(*HEADS, "--layer", "99"))


FRESH_TRAIN = {
    "train --seed 99999999999999999999999": ["--seed", "99999999999999999999999"],
    "train --max-time inf": ["--max-time", "inf"],
}
for _label, _extra in FRESH_TRAIN.items():

    @case(8, _label)
    def _(c, extra=_extra):
        c.corpus()
        r = c.mg(*train_args(*QUICK, "--max-iters", "20", *extra), timeout=60)
        return refused(r) + absent(c, "R")


ABSURD = {  # setting: the numbers an error naming it may show
    "model.n_embd=1000000000": (1e9,),
    "model.vocab_size=10000000000": (1e10,),
    "train.batch_size=1000000000": (1e9,),
    "model.n_layer=1e23": (1e23,),
    "model.block_size=100000000": (1e8, 1e8 + 1),  # "block_size + 1 = 100000001" names it too
}


def _number_named(r: Result, numbers: tuple[float, ...]) -> list[str]:
    text = " ".join(r.error_lines).replace(",", "").replace("_", "")
    forms = set()
    for number in numbers:
        forms |= {str(int(number)), f"{number:g}", f"{number:g}".replace("e+", "e")}
        if number >= 1e9 and int(number) % 10**9 == 0:
            forms.add(f"{int(number) // 10**9} billion")
    return [] if any(f in text for f in forms) else [f"the error does not name {numbers[0]:g}"]


for _setting, _numbers in ABSURD.items():

    @case(8, f"absurd size --set {_setting}")
    def _(c, setting=_setting, numbers=_numbers):
        c.use("base")
        shutil.rmtree(c.p("R"))
        r = c.mg(*train_args(*QUICK, "--max-iters", "5", "--set", setting), timeout=60)
        return refused(r) + (_number_named(r, numbers) if r.rc == 2 else []) + absent(c, "R")


# =========================================================================== 9 signals


def long_eval(c: Ctx, signum: int, code: int) -> list[str]:
    c.corpus()
    slow = ["--set", "train.eval_iters=100000", "--set", "train.eval_interval=5", *LONG]
    proc = c.spawn(*train_args("--max-iters", "1000", *slow))
    if not wait_for(lambda: last_step(c.p("R", "metrics.jsonl")) >= 5, 60):
        proc.kill9()
        return ["the run never reached step 5"]
    time.sleep(2)
    proc.signal(signum)
    r = c.collect(proc, 10)
    problems = [f"exit {r.rc}, not {code}"] if r.rc != code else []
    if r.timed_out:
        problems = ["still running 10 s after the signal"]
    return problems + trainer_loads(c)


@case(9, "SIGTERM during a long evaluation")
def _(c):
    return long_eval(c, signal.SIGTERM, 143)


@case(9, "SIGINT during a long evaluation")
def _(c):
    return long_eval(c, signal.SIGINT, 130)


def during_prepare(c: Ctx, signum: int, *command, code: int | None = None) -> list[str]:
    proc = c.spawn(*command)
    time.sleep(5)
    if not proc.running():
        return ["the command ended before the signal"] + clean(c.collect(proc, 1))
    proc.signal(signum)
    r = c.collect(proc, 10)
    problems = ["still running 10 s after the signal"] if r.timed_out else []
    if code is not None and not r.timed_out and r.rc != code:
        problems.append(f"exit {r.rc}, not {code}")
    if "Traceback" in r.err:
        problems.append("traceback")
    partial = partial_folders(c.p("data"))
    return problems + ([f"partial folders in data/: {partial}"] if partial else [])


def big(c: Ctx) -> str:
    return str(c.h.fixture("big") / "big.txt")


@case(9, "SIGTERM during prepare of a 50 MB corpus (bpe)")
def _(c):
    return during_prepare(c, signal.SIGTERM, "prepare", big(c), "-t", "bpe", "--data-dir", "data")


@case(9, "SIGINT during prepare of a 50 MB corpus (bpe)")
def _(c):
    command = ("prepare", big(c), "-t", "bpe", "--data-dir", "data")
    return during_prepare(c, signal.SIGINT, *command, code=130)


@case(9, "SIGTERM during train's data preparation (bpe)")
def _(c):
    command = train_args("--max-iters", "5", "--set", "data.tokenizer=bpe", data=big(c))
    return during_prepare(c, signal.SIGTERM, *command) + absent(c, "R")


@case(9, "SIGINT during train's data preparation (bpe)")
def _(c):
    command = train_args("--max-iters", "5", "--set", "data.tokenizer=bpe", data=big(c))
    return during_prepare(c, signal.SIGINT, *command, code=130) + absent(c, "R")


def killed_while_writing(c: Ctx, signum: int) -> list[str]:
    """Signal a prepare while its hidden .tmp folder exists, then prepare something else."""
    proc = c.spawn("prepare", big(c), "--data-dir", "data")
    caught = wait_for(lambda: tmp_entries(c.p("data")), 120, 0.005)
    if not caught:
        c.collect(proc, 60, aux=True)
        return ["never caught the write phase (no .tmp folder seen)"]
    proc.signal(signum)
    first = c.collect(proc, 10)
    problems = ["still running 10 s after the signal"] if first.timed_out else []
    partial = partial_folders(c.p("data"))
    problems += [f"partial folders in data/: {partial}"] if partial else []
    c.corpus()
    r = c.mg("prepare", "corpus.txt", "--data-dir", "data")
    left = tmp_entries(c.p("data"))
    return problems + ok(r) + ([f"stale {left} left after a later prepare"] if left else [])


@case(9, "kill -9 while prepare writes, then prepare: no .tmp left")
def _(c):
    return killed_while_writing(c, signal.SIGKILL)


@case(9, "SIGTERM while prepare writes, then prepare: no .tmp left")
def _(c):
    return killed_while_writing(c, signal.SIGTERM)


def generating(c: Ctx) -> Proc:
    c.use("base")
    proc = c.spawn("generate", "R", "-n", "100000", "--seed", "0", "--device", "cpu")
    wait_for(lambda: proc.out_path.stat().st_size > 0, 30)
    time.sleep(0.5)
    return proc


@case(9, "SIGINT to generate -n 100000: exit 130")
def _(c):
    proc = generating(c)
    proc.signal(signal.SIGINT)
    r = c.collect(proc, 10)
    return clean(r, codes=(130,))


@case(9, "SIGTERM to generate: no traceback")
def _(c):
    proc = generating(c)
    proc.signal(signal.SIGTERM)
    r = c.collect(proc, 10)
    return clean(r, codes=(143, -15))


@case(9, "SIGINT twice during training")
def _(c):
    c.use("base")
    proc = c.spawn("train", "--resume", "R", "--max-iters", "100000", *LONG)
    if not wait_for(lambda: last_step(c.p("R", "metrics.jsonl")) > 25, 60):
        proc.kill9()
        return ["the run never got going"]
    proc.signal(signal.SIGINT)
    time.sleep(0.05)
    proc.signal(signal.SIGINT)
    r = c.collect(proc, 10)
    return clean(r, codes=(130,)) + trainer_loads(c) + c.loads()


@case(9, "SIGINT one second after train starts")
def _(c):
    c.corpus()
    proc = c.spawn(*train_args("--max-iters", "100000", *QUICK))
    time.sleep(1.0)
    proc.signal(signal.SIGINT)
    r = c.collect(proc, 10)
    problems = clean(r, codes=(130,))
    if c.p("R", "config.json").exists():
        problems += c.loads()
    return problems


# =========================================================================== 10 smaller promises


@case(10, "NUL bytes in a file: message names the offset")
def _(c):
    c.write("bin.txt", b"hello world\n" * 50 + b"\x00abc")
    r = c.mg("prepare", "bin.txt", "--data-dir", "D")
    return refused(r) + mentions(r, "offset") + absent(c, "D")


@case(10, "UTF-16 file: message names the offset or UTF-16")
def _(c):
    c.write("u16.txt", ("hello world\n" * 50).encode("utf-16"))
    r = c.mg("prepare", "u16.txt", "--data-dir", "D")
    return refused(r) + mentions(r, "offset", "UTF-16") + absent(c, "D")


@case(10, "Latin-1 file: message names the offset")
def _(c):
    c.write("l1.txt", ("caf\u00e9 au lait\n" * 50).encode("latin-1"))
    r = c.mg("prepare", "l1.txt", "--data-dir", "D")
    return refused(r) + mentions(r, "offset") + absent(c, "D")


@case(10, "NUL bytes in one file of a folder: message names the file")
def _(c):
    c.write("docs/a.txt", words_text(5_000))
    c.write("docs/b.txt", b"abc\x00def")
    r = c.mg("prepare", "docs", "--data-dir", "D")
    return refused(r) + mentions(r, "b.txt") + absent(c, "D")


for _flag in ("--html", "--png", "--json"):

    @case(10, f"inspect-heads {_flag} ''")
    def _(c, flag=_flag):
        c.use("base")
        return refused(c.mg(*HEADS, flag, ""))


def json_lines(r: Result) -> list[str]:
    bad = []
    for line in lines_of(r.out):
        try:
            strict_json(line)
        except ValueError:
            bad.append(line[:60])
    return [f"stdout lines that are not JSON: {bad[:2]}"] if bad else []


@case(10, "generate --json --interactive: every stdout line is JSON")
def _(c):
    c.use("base")
    r = c.mg(*GEN, "--json", "--interactive", stdin="hello\n\n")
    return ok(r) + json_lines(r)


@case(10, "generate --json --interactive with an unseen character, then a prompt")
def _(c):
    c.use("base")
    r = c.mg(*GEN, "--json", "--interactive", stdin="\u03b6\nhello\n\n")
    return ok(r) + json_lines(r)


@case(10, "generate --interactive with no input")
def _(c):
    c.use("base")
    return ok(c.mg(*GEN, "--interactive", stdin=""))


@case(10, "generate --json --num-samples 2: stdout is strict JSON")
def _(c):
    c.use("base")
    r = c.mg(*GEN, "--json", "--num-samples", "2")
    try:
        strict_json(r.out)
        return ok(r)
    except ValueError as err:
        return ok(r) + [f"stdout is not strict JSON ({err})"]


@case(10, "inspect-heads --json: strict JSON (no NaN/Infinity)")
def _(c):
    c.use("base")
    r = c.mg(*HEADS, "--json", "out.json")
    try:
        strict_json(c.p("out.json").read_text(encoding="utf-8"))
        return ok(r)
    except (ValueError, OSError) as err:
        return ok(r) + [f"out.json is not strict JSON ({str(err)[:80]})"]


@case(10, "metrics.jsonl stays strict JSON after a diverging run")
def _(c):
    c.corpus()
    hot = ["--set", "train.lr=1e6", "--set", "train.warmup_iters=0", "--set", "train.grad_clip=0"]
    r = c.mg(
        *train_args(
            "--max-iters",
            "30",
            *hot,
            "--set",
            "train.eval_interval=1",
            "--set",
            "train.eval_iters=2",
        )
    )
    bad = []
    for line in c.p("R", "metrics.jsonl").read_text().splitlines():
        try:
            strict_json(line)
        except ValueError:
            bad.append(line[:80])
    return clean(r) + ([f"non-strict lines: {bad[:2]}"] if bad else [])


def modes(c: Ctx, names: list[str], want: int) -> list[str]:
    wrong = []
    for name in names:
        mode = c.p(name).stat().st_mode & 0o777
        if mode != want:
            wrong.append(f"{name} is {mode:o}, not {want:o}")
    return wrong


@case(10, "model*.safetensors are 0644 under umask 022")
def _(c):
    c.use("base")  # trained by this harness under umask 022; copies keep the modes
    return modes(c, ["R/model.safetensors", "R/model-last.safetensors"], 0o644)


@case(10, "every run file is 0644, the run dir 0755, under umask 022")
def _(c):
    c.use("base")
    names = [f"R/{n}" for n in (*RUN_FILES, "metrics.jsonl", "loss.png")]
    return modes(c, names, 0o644) + modes(c, ["R"], 0o755)


@case(10, "prepared data folder is 0755, its files 0644")
def _(c):
    c.corpus()
    r = c.mg("prepare", "corpus.txt", "--data-dir", "D")
    _, folder = prepared_numbers(r)
    if folder is None:
        return ok(r) + ["no folder reported"]
    files = [str(folder / n) for n in ("train.bin", "val.bin", "meta.json", "tokenizer.json")]
    return ok(r) + modes(c, [str(folder)], 0o755) + modes(c, files, 0o644)


@case(10, "Ctrl-C to generate: exit 130, says interrupted")
def _(c):
    proc = generating(c)
    proc.signal(signal.SIGINT)
    r = c.collect(proc, 10)
    return clean(r, codes=(130,)) + ([] if "interrupted" in r.err else ["no 'interrupted' message"])


@case(
    10, "unreadable trainer.pt on --resume: not 'damaged', no --force (non-root)", needs=("nobody",)
)
def _(c):
    r = as_nobody(c, lambda c: os.chmod(c.p("R", "trainer.pt"), 0), "train", "--resume", "R")
    return refused(r) + avoids(r, "damaged", "--force")


@case(10, "unreadable model.safetensors: not 'no weights' (non-root)", needs=("nobody",))
def _(c):
    r = as_nobody(c, lambda c: os.chmod(c.p("R", "model.safetensors"), 0), *GEN)
    return refused(r) + avoids(r, "no weights")


@case(10, "a file as the run dir: not 'does not exist'")
def _(c):
    c.use("base")
    c.write("afile", "x")
    r = c.mg("generate", "afile", "-n", "5")
    return refused(r) + avoids(r, "does not exist")


def html_injection(c: Ctx, *tokenizer: str) -> list[str]:
    """Train on a corpus full of `<!--` and `<script>`, then view a prompt made of them."""
    tags = ["<!--", "<script>", "</script>", "-->"] * 6  # frequent enough for BPE merges
    text = words_text(15_000, 6, [*WORDS, *tags])
    c.write("corpus.txt", text)
    first = c.mg(*train_args("--max-iters", "10", *QUICK, *tokenizer), aux=True)
    if first.rc != 0:
        return [f"training failed: {first.tail}"]
    control = c.mg(*HEADS, "--prompt", "the dog", "--html", "control.html", aux=True)
    r = c.mg(*HEADS, "--prompt", "<!--<script>", "--html", "v.html")
    problems = ok(control) + ok(r)
    if problems:
        return problems
    page = c.p("v.html").read_text(encoding="utf-8").lower()
    template = c.p("control.html").read_text(encoding="utf-8").lower()
    for needle in ("<script", "</script", "<!--"):
        if page.count(needle) != template.count(needle):
            problems.append(
                f"{needle!r} appears {page.count(needle)} times, template {template.count(needle)}"
            )
    return problems


@case(10, "HTML injection through a char vocabulary and the prompt")
def _(c):
    return html_injection(c)


@case(10, "HTML injection through BPE tokens (<!-- as one token)")
def _(c):
    return html_injection(c, "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=400")


# --------------------------------------------------------------------------- running


def run_case(h: Harness, case: Case) -> Outcome:
    start = time.monotonic()
    missing = [n for n in case.needs if not getattr(h, f"{n}_ok")]
    if missing:
        why = "; ".join(getattr(h, f"{n}_why") for n in missing)
        return Outcome(case.cls, case.name, None, None, [], None, f"skipped: {why}", 0.0)
    c = Ctx(h, case)
    try:
        problems = case.fn(c)
        held, why = not problems, "; ".join(problems)
    except Exception as err:  # noqa: BLE001 (a harness failure is reported, not raised)
        held, why = False, f"harness error: {type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        c.cleanup(h.keep)
    main = c.main
    return Outcome(
        cls=case.cls,
        name=case.name,
        command=main.cmd if main else None,
        exit_code=main.rc if main else None,
        stderr_tail=main.tail if main else [],
        held=held,
        why=why,
        seconds=round(time.monotonic() - start, 1),
        runs=[
            {"command": r.cmd, "exit_code": r.rc, "seconds": round(r.seconds, 1)} for r in c.runs
        ],
    )


def pick_classes(only: str | None) -> set[int]:
    if only is None:
        return set(CLASSES)
    if only.isdigit() and int(only) in CLASSES:
        return {int(only)}
    hits = {k for k, v in CLASSES.items() if only.lower() in v.lower()}
    if not hits:
        raise SystemExit(f"--only {only!r}: no such class; classes are {CLASSES}")
    return hits


def table(outcomes: list[Outcome]) -> str:
    rows = ["| class | tried | held | skipped |", "|---|---:|---:|---:|"]
    total = [0, 0, 0]
    for cls, label in CLASSES.items():
        mine = [o for o in outcomes if o.cls == cls]
        if not mine:
            continue
        tried = sum(o.held is not None for o in mine)
        held = sum(o.held is True for o in mine)
        skipped = sum(o.held is None for o in mine)
        total = [total[0] + tried, total[1] + held, total[2] + skipped]
        rows.append(f"| {cls} {label} | {tried} | {held} | {skipped} |")
    rows.append(f"| **total** | {total[0]} | {total[1]} | {total[2]} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--json-out", type=Path, default=Path("bench/results/abuse.json"))
    parser.add_argument("--only", help="run one class (number or a word of its name)")
    parser.add_argument("--case", help="run only cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the case directories")
    args = parser.parse_args()

    # children must see SIGINT and SIGTERM at their defaults, even if this runs in the background
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tree = args.tree.resolve()
    if not (tree / "minigpt" / "__main__.py").exists():
        raise SystemExit(f"{tree} is not a minigpt source tree")
    classes = pick_classes(args.only)
    cases = [k for k in CASES if k.cls in classes and (not args.case or args.case in k.name)]
    work = Path(tempfile.mkdtemp(prefix="minigpt-abuse-"))
    os.chmod(work, 0o755)
    harness = Harness(tree, work, args.keep)
    start = time.monotonic()
    harness.probe()
    print(f"tree {tree}; {len(cases)} cases, {args.jobs} jobs; work dir {work}", flush=True)
    if not harness.nobody_ok:
        print(f"non-root cases skipped: {harness.nobody_why}", flush=True)
    if not harness.mount_ok:
        print(f"full-disk cases skipped: {harness.mount_why}", flush=True)

    # the slow cases first, so the pool ends evenly
    order = sorted(cases, key=lambda k: k.cls not in (1, 4, 9) and "1e23" not in k.name)
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_case, harness, k) for k in order]
        for future in as_completed(futures):
            outcome = future.result()
            mark = {True: "held", False: "FAILS", None: "skip"}[outcome.held]
            why = f"  ({outcome.why[:150]})" if outcome.why else ""
            print(
                f"[{outcome.cls:>2}] {mark:5} {outcome.seconds:5.1f}s {outcome.name}{why}",
                flush=True,
            )
            outcomes.append(outcome)
    outcomes.sort(key=lambda o: (o.cls, [k.name for k in CASES].index(o.name)))
    seconds = time.monotonic() - start
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(outcomes))
    print(f"\n{seconds / 60:.1f} min")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    summary = {}
    for cls, label in CLASSES.items():
        mine = [o for o in outcomes if o.cls == cls]
        if mine:
            summary[f"{cls} {label}"] = {
                "tried": sum(o.held is not None for o in mine),
                "held": sum(o.held is True for o in mine),
                "skipped": sum(o.held is None for o in mine),
            }
    report = {
        "tree": str(tree),
        "commit": head or None,
        "seconds": round(seconds, 1),
        "jobs": args.jobs,
        "nobody": harness.nobody_ok or harness.nobody_why,
        "mount": harness.mount_ok or harness.mount_why,
        "classes": summary,
        "cases": [o.__dict__ for o in outcomes],
    }
    args.json_out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
