"""Process-level helpers: `python -m minigpt ...` as a user runs it, under hostile use.

Each case runs in its own folder (under one world-readable folder, so that commands
run as a non-root user can reach it) with OMP_NUM_THREADS=1, umask 022 and the
address space capped (absurd sizes then fail fast instead of swapping the machine).
A case is a function of a `Case` (its folder, its commands, and the settings and
checks below as attributes) that returns the promises it found broken, as
sentences; its test asserts that list is empty, so a failure says what broke:

    refused   exit code 2, exactly one `error:` line (at most one `hint:`), no `Traceback`
    ok        exit code 0, no `Traceback`
    loads     a previous run directory still loads afterwards

A module lists its cases in CASES (name -> function) and has one test taking `name`
and `problems`: the test runs once per case. Process start-up (importing torch)
dominates these tests, so `problems` runs the module's cases two or more at a time
(`run_cases`) before its first test; the trained runs the cases start from are built
once per session (`Case.use`).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *("--set", "model.n_layer=1", "--set", "model.n_head=2"),
    *("--set", "model.n_embd=32", "--set", "model.block_size=32", "--device", "cpu"),
]
QUICK = [
    *("--set", "train.eval_interval=10", "--set", "train.eval_iters=2"),
    *("--set", "train.batch_size=4"),
]
# the exact-resume runs: every step logged, evaluated often, a batch big enough to matter
EXACT = [
    *("--seed", "1", "--set", "train.eval_interval=5", "--set", "train.log_interval=1"),
    *("--set", "train.batch_size=64", "--set", "train.eval_iters=2"),
]
LONG = ["--set", "train.log_interval=1"]
FOR_SECONDS = ["--max-iters", "1000000", "--max-time"]  # + seconds: a trainer that runs that long
NOBODY_UID = 65534
NOBODY = ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups"]
MEMORY_LIMIT = 8 << 30  # bytes of address space per command
RUN_FILES = (
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "model-last.safetensors",
    "trainer.pt",
)
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly pack "
    "their boxes and every river runs to the sea under grey morning light"
).split()
GEN = ("generate", "R", "-n", "20", "--seed", "0", "--device", "cpu")
HEADS = ("inspect-heads", "R", "--device", "cpu")


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


def big_text(n_lines: int) -> str:
    """A corpus long enough that preparing it (BPE above all) takes a while."""
    return "".join(
        f"line {i} of a corpus, word{i % 977} and word{i % 131}\n" for i in range(n_lines)
    )


def lines_of(text: str) -> list[str]:
    """Non-blank lines, progress-bar carriage returns split too."""
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    result = change(data)
    path.write_text(json.dumps(data if result is None else result), encoding="utf-8")


def strict_json(text: str) -> object:
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


def train_args(*extra, data="corpus.txt", out="R") -> list[str]:
    return ["train", "--data", data, "--out", out, *TINY, *extra]


# --------------------------------------------------------------------------- one command


@dataclass
class Result:
    cmd: str
    rc: int | None  # None: killed after its timeout
    out: str
    err: str
    timeout: float
    pid: int = 0

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in lines_of(self.err) if line.startswith("error:")]

    @property
    def tail(self) -> list[str]:
        return lines_of(self.err)[-3:]


@dataclass
class Proc:
    popen: subprocess.Popen
    cmd: str
    out_path: Path
    err_path: Path

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


# --------------------------------------------------------------------------- checks
# Each returns a list of problems; a case holds when its list is empty.


def refused(r: Result) -> list[str]:
    """Exit 2, one `error:` line (one `hint:` at most), no traceback."""
    if r.timed_out:
        return [f"{r.cmd}: timed out after {r.timeout:.0f} s"]
    problems = []
    if r.rc != 2:
        problems.append(f"exit {r.rc}, not 2 ({' | '.join(r.tail)})")
    if "Traceback" in r.err:
        problems.append(f"traceback ({lines_of(r.err)[-1][:160]})")
    n_error = len(r.error_lines)
    if n_error != 1:
        problems.append("no `error:` line" if n_error == 0 else f"{n_error} `error:` lines")
    n_hint = sum(line.startswith("hint:") for line in lines_of(r.err))
    if n_hint > 1:
        problems.append(f"{n_hint} `hint:` lines")
    return problems


def clean(r: Result, codes=(0, 2)) -> list[str]:
    """No traceback, not timed out, exit code in `codes` (and an error line when 2)."""
    if r.timed_out:
        return [f"{r.cmd}: timed out after {r.timeout:.0f} s"]
    problems = []
    if r.rc not in codes:
        wanted = " or ".join(map(str, codes))
        problems.append(f"{r.cmd}: exit {r.rc}, not {wanted} ({' | '.join(r.tail)})")
    if "Traceback" in r.err:
        problems.append(f"traceback ({lines_of(r.err)[-1][:160]})")
    if r.rc == 2 and not r.error_lines:
        problems.append("exit 2 without an `error:` line")
    return problems


def ok(r: Result) -> list[str]:
    return clean(r, codes=(0,))


def mentions(r: Result, *words: str) -> list[str]:
    text = " ".join(r.error_lines) or r.err
    if any(word.lower() in text.lower() for word in words):
        return []
    return [f"the message does not mention {' or '.join(map(repr, words))}: {text[:160]}"]


def avoids(r: Result, *words: str) -> list[str]:
    return [f"the message says {word!r}" for word in words if word.lower() in r.err.lower()]


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
    duplicated = sorted({s for s in steps if steps.count(s) > 1})
    return [f"metrics.jsonl has steps {duplicated[:5]} more than once"] if duplicated else []


def one_wins(results: list[Result], procs: list[Proc]) -> list[str]:
    """Exactly one exits 0; the other is refused (exit 2) in one sentence naming the holder."""
    codes = [r.rc for r in results]
    if sorted(codes, key=str) != [0, 2]:
        return [f"exit codes {codes}, not one 0 and one 2 ({[r.tail for r in results]})"]
    loser, winner = results[codes.index(2)], procs[codes.index(0)]
    problems = refused(loser)
    if not any(str(winner.pid) in line for line in loser.error_lines):
        problems.append(f"the refusal does not name the holder (pid {winner.pid})")
    return problems


def prepared_numbers(r: Result) -> tuple[int | None, Path | None]:
    """(train tokens, folder) from `minigpt prepare`'s report."""
    tokens = re.search(r"train tokens\s+([\d,]+)", r.out)
    folder = re.search(r"^\s*in\s+(\S.*)$", r.out, re.M)
    return (
        int(tokens.group(1).replace(",", "")) if tokens else None,
        Path(folder.group(1).strip()) if folder else None,
    )


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


def trainer_loads(path: Path) -> list[str]:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return []
    except Exception as err:  # noqa: BLE001 (any failure to read it is the finding)
        return [f"{path.name} does not load ({type(err).__name__})"]


def finite_weights(run: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    problems = []
    try:
        state = torch.load(run / "trainer.pt", map_location="cpu", weights_only=True)
        if not all(torch.isfinite(t).all() for t in state["model"].values()):
            problems.append("trainer.pt holds non-finite weights")
    except Exception as err:  # noqa: BLE001 (any failure to read it is the finding)
        problems.append(f"trainer.pt does not load ({type(err).__name__})")
    try:
        weights = load_file(str(run / "model-last.safetensors"))
        if not all(torch.isfinite(t).all() for t in weights.values()):
            problems.append("model-last.safetensors holds non-finite weights")
    except Exception as err:  # noqa: BLE001
        problems.append(f"model-last.safetensors does not load ({type(err).__name__})")
    return problems


def truncate_half(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


def dir_instead(folder: Path, name: str) -> None:
    (folder / name).unlink()
    (folder / name).mkdir()


# --------------------------------------------------------------------------- a case's folder


class Case:
    """One case: its folder, the commands it ran, and the checks that need its folder."""

    def __init__(self, folder: Path, runs: TrainedRuns | None = None):
        self.dir = folder
        self.runs = runs
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

    def use(self, name: str) -> None:
        """Copy a trained run's files (corpus.txt, R, data/...) into this case's folder."""
        shutil.copytree(self.runs.folder(name), self.dir, dirs_exist_ok=True, symlinks=True)

    def corpus(self, n_bytes: int = 20_000, seed: int = 0) -> Path:
        return self.write("corpus.txt", words_text(n_bytes, seed))

    def give_to_nobody(self) -> None:
        """chown the case folder to the non-root user, so that it owns its files."""
        subprocess.run(["chown", "-R", f"{NOBODY_UID}:{NOBODY_UID}", str(self.dir)], check=True)

    # -- commands

    def _argv(self, args: tuple, nobody: bool) -> tuple[list[str], dict, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            "OMP_WAIT_POLICY": "PASSIVE",
            "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": str(self.dir),
            "MPLCONFIGDIR": str(self.p(".mpl")),
            "LANG": "C.UTF-8",
            "TIKTOKEN_CACHE_DIR": str(self.p(".tiktoken")),
        }
        prefix = ["prlimit", f"--as={MEMORY_LIMIT}", "--", *(NOBODY if nobody else [])]
        shown = ("[nobody] " if nobody else "") + "minigpt " + shlex.join(str(a) for a in args)
        return [*prefix, sys.executable, "-m", "minigpt", *map(str, args)], env, shown

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
        return Proc(popen, shown, out_path, err_path)

    def collect(self, proc: Proc, timeout: float = 120) -> Result:
        """Wait for proc (kill its group after `timeout` s from now) and read its output."""
        try:
            rc = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill9()
            proc.popen.wait()
            rc = None
        out = proc.out_path.read_text(encoding="utf-8", errors="replace")
        err = proc.err_path.read_text(encoding="utf-8", errors="replace")
        return Result(proc.cmd, rc, out, err, timeout, proc.pid)

    def mg(self, *args, nobody=False, timeout=120.0, stdin=None, cwd=None) -> Result:
        """Run `minigpt ARGS` to completion."""
        return self.collect(self.spawn(*args, nobody=nobody, cwd=cwd, stdin=stdin), timeout)

    # -- checks on this folder

    def loads(self, run: str = "R") -> list[str]:
        """Problems if the run directory no longer loads (both its weights files)."""
        from minigpt.checkpoint import LAST_WEIGHTS, load_run

        try:
            load_run(self.p(run))
            load_run(self.p(run), weights_file=LAST_WEIGHTS)
            return []
        except Exception as err:  # noqa: BLE001 (any failure to load it is the finding)
            return [f"{run} no longer loads ({type(err).__name__}: {str(err)[:160]})"]

    def absent(self, *names: str) -> list[str]:
        return [f"{name} was written" for name in names if os.path.lexists(self.p(name))]

    def snapshot(self, run: str = "R") -> dict[str, str | None]:
        """Hashes of the files a run's use depends on (config.json may record a resume's
        new train settings; it is written atomically and checked by loading the run)."""
        return {name: sha(self.p(run, name)) for name in RUN_FILES if name != "config.json"}

    def unchanged(self, before: dict, run: str = "R") -> list[str]:
        after = self.snapshot(run)
        return [f"{run}/{name} changed" for name in before if before[name] != after[name]]

    def modes(self, names: list[str], want: int) -> list[str]:
        wrong = []
        for name in names:
            mode = self.p(name).stat().st_mode & 0o777
            if mode != want:
                wrong.append(f"{name} is {mode:o}, not {want:o}")
        return wrong

    def cleanup(self) -> None:
        subprocess.run(["chmod", "-R", "u+rwx", str(self.dir)], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


SHARED = [
    "TINY", "QUICK", "EXACT", "LONG", "FOR_SECONDS", "WORDS", "RUN_FILES", "GEN", "HEADS",
    "words_text", "big_text", "lines_of", "sha", "wait_for", "edit_json", "strict_json",
    "train_args", "refused", "clean", "ok", "mentions", "avoids", "loss_steps", "last_step",
    "steps_once", "one_wins", "prepared_numbers", "tmp_entries", "partial_folders", "trainer_loads", "finite_weights",
    "truncate_half", "dir_instead",
]  # fmt: skip
# the test modules reach the settings and checks above through the case they are given
for _name in SHARED:
    _value = globals()[_name]
    setattr(Case, _name, staticmethod(_value) if callable(_value) else _value)


# --------------------------------------------------------------------------- trained runs


def _base(c: Case) -> list[str]:
    """corpus.txt (20 KB), R: a tiny run trained 20 steps, data/: its prepared corpus."""
    c.corpus()
    return train_args("--max-iters", "20", *QUICK)


def _padded(c: Case) -> list[str]:
    """R with its vocabulary padded to 512 rows (the corpus has far fewer characters)."""
    c.corpus()
    return train_args("--max-iters", "20", *QUICK, "--set", "model.vocab_size=512")


def _straight30(c: Case) -> list[str]:
    """S: 30 steps straight, the reference losses of the exact-resume cases."""
    c.corpus()
    return train_args(*EXACT, "--max-iters", "30", out="S")


def _prepared(c: Case) -> list[str]:
    """corpus.txt and D/: its prepared folder, and nothing else."""
    c.corpus()
    return ["prepare", "corpus.txt", "--data-dir", "D"]


BUILDERS = {"base": _base, "padded": _padded, "straight30": _straight30, "prepared": _prepared}


class TrainedRuns:
    """The trained runs the cases start from, each built once (thread-safe) on first use."""

    def __init__(self, work: Path):
        self.work = work
        self._built: dict[str, Path | str] = {}
        self._locks = {name: threading.Lock() for name in BUILDERS}

    def folder(self, name: str) -> Path:
        with self._locks[name]:
            if name not in self._built:
                self._built[name] = self._build(name)
        built = self._built[name]
        if isinstance(built, str):
            raise RuntimeError(f"the {name} run failed: {built}")
        return built

    def _build(self, name: str) -> Path | str:
        c = Case(Path(tempfile.mkdtemp(dir=self.work, prefix=f"build-{name}-")))
        r = c.mg(*BUILDERS[name](c))
        if r.rc != 0:
            return " | ".join(r.tail)
        folder = self.work / f"run-{name}"
        folder.mkdir()
        os.chmod(folder, 0o755)
        for item in c.dir.iterdir():
            if not item.name.startswith("."):
                shutil.move(str(item), folder / item.name)
        c.cleanup()
        return folder


# --------------------------------------------------------------------------- fixtures

CODE_TEXT = (
    "for item in items:\n    if item is None:\n        continue\n    total += item\n"
    "while queue:\n    node = queue.pop()\n    seen.add(node)\n"
) * 60


@pytest.fixture(scope="session")
def code_text() -> str:
    """A small corpus of code-like lines, for the process tests that train on their own."""
    return CODE_TEXT


@pytest.fixture(scope="session")
def wait_for_steps():
    """`wait_for_steps(run_dir, proc, n)`: poll until the training in `proc` has logged n
    steps; fail if it ends first or does not get there in time."""
    from minigpt import checkpoint

    def wait(out: Path, proc: subprocess.Popen, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(list(checkpoint.iter_losses(out))) >= n:
                return
            if proc.poll() is not None:
                raise AssertionError(f"training ended early: {proc.communicate()}")
            time.sleep(0.05)
        proc.kill()
        raise AssertionError("training did not start in time")

    return wait


@pytest.fixture(scope="session")
def e2e_work():
    """One world-readable folder for every case (pytest's tmp_path is private to root)."""
    work = Path(tempfile.mkdtemp(prefix="minigpt-e2e-"))
    os.chmod(work, 0o755)
    yield work
    subprocess.run(["chmod", "-R", "u+rwx", str(work)], check=False)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_runs(e2e_work) -> TrainedRuns:
    return TrainedRuns(e2e_work)


@pytest.fixture(scope="session")
def new_case(e2e_work, trained_runs) -> Callable[[str], Case]:
    """A Case in a fresh folder, named after the case."""

    def make(name: str) -> Case:
        slug = re.sub(r"\W+", "-", name)[:40]
        folder = Path(tempfile.mkdtemp(dir=e2e_work, prefix=f"{slug}-"))
        os.chmod(folder, 0o755)
        return Case(folder, trained_runs)

    return make


def pytest_generate_tests(metafunc):
    """A test of a module with CASES that takes `name` runs once per case."""
    cases = getattr(metafunc.module, "CASES", None)
    if cases is not None and "name" in metafunc.fixturenames:
        metafunc.parametrize("name", list(cases))


@pytest.fixture(scope="module")
def problems(request, run_cases) -> dict[str, list[str]]:
    """{case name: the promises it found broken} for the module's CASES."""
    return run_cases(request, request.module.CASES)


@pytest.fixture(scope="session")
def run_cases(new_case):
    """Run the cases of a module that pytest selected, a few at a time, once:
    `run_cases(request, {name: case function})` -> {name: problems}."""
    workers = max(2, min(4, os.cpu_count() or 2))

    def run_one(name: str, fn: Callable[[Case], list[str]]) -> list[str]:
        c = new_case(name)
        try:
            return list(fn(c))
        except Exception:  # noqa: BLE001 (a case that cannot run fails its test with why)
            return [f"the case raised: {traceback.format_exc()[-1500:]}"]
        finally:
            c.cleanup()

    def run(request, cases: dict[str, Callable[[Case], list[str]]]) -> dict[str, list[str]]:
        selected = {
            item.callspec.params.get("name")
            for item in request.session.items
            if item.module is request.module and hasattr(item, "callspec")
        }
        names = [name for name in cases if name in selected] or list(cases)
        with ThreadPoolExecutor(workers) as pool:
            futures = {name: pool.submit(run_one, name, cases[name]) for name in names}
            return {name: future.result() for name, future in futures.items()}

    return run


def _probe_nobody() -> str | None:
    """Why commands cannot run as the non-root user here, or None when they can."""
    if os.geteuid() != 0:
        return "running commands as another user needs root"
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        return "setpriv is not installed"
    folder = Path(tempfile.mkdtemp(prefix="minigpt-probe-"))
    try:
        os.chmod(folder, 0o755)
        code = "import torch, safetensors, minigpt.cli"
        done = subprocess.run(
            [*NOBODY, sys.executable, "-c", code],
            cwd=folder,
            env={**os.environ, "PYTHONPATH": str(REPO), "HOME": str(folder)},
            capture_output=True,
            timeout=120,
        )
        if done.returncode != 0:
            last = (lines_of(done.stderr.decode(errors="replace")) or ["?"])[-1]
            return f"uid {NOBODY_UID} cannot import minigpt here: {last[:160]}"
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def nobody_ok() -> None:
    """Skip unless commands can run as a non-root user (root ignores file modes)."""
    why = _probe_nobody()
    if why:
        pytest.skip(why)


# --------------------------------------------------------------------------- minigpt serve

SERVE_START_S = 60
"""How long `minigpt serve` may take to say it serves (importing torch is most of it)."""


class Serving:
    """`python -m minigpt serve ... --port 0` in the background, as a user starts it."""

    def __init__(self, *args: str):
        env = {k: v for k, v in os.environ.items() if k != "MINIGPT_API_KEY"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "minigpt", "serve", *map(str, args), "--port", "0"]
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._url: str | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # it ended

    def url(self) -> str:
        """Its base URL, from the line it prints once it serves."""
        if self._url is None:
            line = self.lines.get(timeout=SERVE_START_S)
            match = re.fullmatch(r"serving \S+ at (http://\S+)\n", line)
            if match is None:
                self.proc.kill()
                pytest.fail(f"minigpt serve printed {line!r}: {self.proc.stderr.read()[-2000:]}")
            self._url = match.group(1)
        return self._url

    def stop(self, signum: int = signal.SIGTERM, within: float = 15) -> tuple[int, str]:
        """Send signum; (exit code, stderr) once it exited (within `within` seconds)."""
        self.proc.send_signal(signum)
        code = self.proc.wait(within)
        return code, self.proc.stderr.read()


@pytest.fixture(scope="module")
def serving():
    """`serving(RUN, *options)` starts `minigpt serve` (a `Serving`); whatever still runs
    when the module ends is killed."""
    started: list[Serving] = []

    def start(*args) -> Serving:
        started.append(Serving(*args))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
