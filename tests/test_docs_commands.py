"""Every shell command in README.md, docs/ and data/README.md runs as written, so a
documented command cannot rot.

Each page's commands run in the order the page gives them (a later command often uses
an earlier one's run), in a work folder of their own that holds a copy of configs/, the
way a user runs them from a checkout (a page that continues another, AFTER, runs in that
page's folder). A command that trains gets a short --max-iters and nothing else: the
model is the one the docs name, no smaller. Tiny shakespeare comes from
../shared/data/tinyshakespeare beside the checkout through $MINIGPT_SHAKESPEARE_URL, so
the built-in download runs, offline. A command that cannot run offline on a CPU is in
SKIPPED with the reason; any other command runs, so a new one fails here until it runs
or is listed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "data" / "README.md"]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
"""Tests read shared data beside the checkout (CI puts ../shared there)."""

MAX_ITERS = 2
"""Steps each training command runs (a resumed run: this many beyond where it stopped)."""

COMMAND_TIMEOUT = 120

HUB = "fetches GPT-2 from the Hugging Face hub"
NEEDS_HUB_RUN = "needs checkpoints/gpt2 or its fine-tune, which come from the hub"
CORPUS = "needs a corpus downloaded from the hub and tiktoken's gpt2 file"
SERVES = "a server: it runs until stopped (tests/e2e/test_serve_process.py runs it)"
NEEDS_SERVER = "talks to a `minigpt serve` running in another terminal"
SKIPPED = {
    'pip install -e ".[dev]"': "installs packages",
    'pip install -e ".[hf]"': "installs packages",
    'pip install -e ".[bench]"': "installs packages",
    'pip install -e ".[serve]"': "installs packages",
    'pip install -e ".[bench,int8]"': "installs packages",
    "python bench/generate.py --cpu-decode-only --repeats 3": (
        "a benchmark: minutes of timing, GPT-2 small compiled and in int8"
    ),
    "python bench/quantize.py checkpoints/default [checkpoints/default ...]": "a usage synopsis",
    "minigpt serve": SERVES,
    "minigpt serve checkpoints/default --port 8001 --max-batch 16": SERVES,
    "minigpt serve checkpoints/default --host 0.0.0.0 --api-key SECRET": SERVES,
    'curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" -d '
    '\'{"prompt": "def ", "max_tokens": 40, "temperature": 0.8, "stop": ["\\n\\n"]}\'': NEEDS_SERVER,
    'curl -N http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" -d '
    '\'{"prompt": "def ", "max_tokens": 40, "stream": true}\'': NEEDS_SERVER,
    "curl http://127.0.0.1:8000/health": NEEDS_SERVER,
    "pytest": "runs the whole suite, this test included",
    "bash .ci/run": "CI itself: a fresh virtualenv and the whole suite",
    "ruff check minigpt tests bench": "lints the checkout; .ci/run runs it before pytest",
    "python bench/generate.py": "a benchmark: minutes of timing against transformers",
    "python bench/train.py --skip-quality --skip-curves --skip-compile": (
        "a benchmark: minutes of training runs"
    ),
    "python bench/generate.py --shapes shakespeare-char default --max-seconds 60 --repeats 1": (
        "a benchmark: a minute of timing per shape"
    ),
    "minigpt train configs/shakespeare-char.toml": (
        "for a GPU: torch.compile and 200 evaluation batches of 64 x 256 take minutes on a CPU"
    ),
    "minigpt generate checkpoints/default --compile --dtype bfloat16": "a GPU (CUDA graphs)",
    "minigpt import gpt2 --out checkpoints/gpt2": HUB,
    'minigpt generate checkpoints/gpt2 -p "The meaning of life is" -n 60': NEEDS_HUB_RUN,
    "minigpt inspect-heads checkpoints/gpt2 --repeated 50": NEEDS_HUB_RUN,
    "minigpt eval checkpoints/gpt2 --data shakespeare": NEEDS_HUB_RUN,
    "minigpt train configs/finetune-gpt2.toml": HUB,
    "minigpt eval checkpoints/gpt2-shakespeare": NEEDS_HUB_RUN,
    "minigpt export checkpoints/gpt2-shakespeare --out hf/gpt2-shakespeare": NEEDS_HUB_RUN,
    "python -c \"from transformers import pipeline; print(pipeline('text-generation', "
    "'hf/gpt2-shakespeare')('ROMEO:')[0]['generated_text'])\"": NEEDS_HUB_RUN,
    "torchrun --standalone --nproc_per_node 8 -m minigpt train configs/gpt2-124m.toml "
    "--data path/to/corpus": "8 GPUs and a corpus of one's own",
    "torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 "
    "--master_port 29500 -m minigpt train configs/gpt2-124m.toml --data path/to/corpus": (
        "two machines with 8 GPUs each"
    ),
    "torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1 "
    "--master_port 29500 -m minigpt train configs/gpt2-124m.toml --data path/to/corpus": (
        "two machines with 8 GPUs each"
    ),
    "minigpt prepare data/fineweb --tokenizer gpt2": CORPUS,
    "torchrun --standalone --nproc_per_node 8 -m minigpt train configs/gpt2-124m.toml "
    "--data data/fineweb": CORPUS,
    "minigpt prepare data/openwebtext --tokenizer gpt2": CORPUS,
    "minigpt prepare [SOURCE] [--tokenizer char|bpe|gpt2|r50k_base|cl100k_base|o200k_base]": (
        "a usage synopsis"
    ),
    "minigpt inspect-heads [RUN_DIR] [--prompt TEXT | --prompt-file F | --repeated N]": (
        "a usage synopsis"
    ),
    "minigpt lens [checkpoints/default] --prompt TEXT [--top K] [--position P]": "a usage synopsis",
    "minigpt attribute [checkpoints/default] --prompt TEXT --answer TOK [--versus TOK]": (
        "a usage synopsis"
    ),
    "minigpt patch [checkpoints/default] --clean TEXT --corrupt TEXT --answer TOK --versus TOK "
    "[--by head|layer-position] [--heads L1H0,L1H2]": "a usage synopsis",
    "minigpt attribute checkpoints/gpt2 --prompt \"When Mary and John went to the store, John gave "
    "a drink to\" --answer \" Mary\" --versus \" John\"": NEEDS_HUB_RUN,
    "minigpt patch checkpoints/gpt2 --clean \"When Mary and John went to the store, John gave a "
    "drink to\" --corrupt \"When Mary and John went to the store, Mary gave a drink to\" "
    "--answer \" Mary\" --versus \" John\"": NEEDS_HUB_RUN,
}
"""Commands that do not run here (as the page writes them, comments dropped and RUN
replaced), and why: the network, a GPU, installing, or the suite itself."""

PLACEHOLDERS = {"RUN": "checkpoints/default"}
"""Words the docs use for 'your run', and the run each page's commands then use."""

GIVEN = {
    "docs/data.md": [
        "printf 'To be, or not to be, that is the question.\\n%.0s' $(seq 200) > notes.txt",
        "mkdir -p src/pkg && printf 'def f(x):\\n    return x * 2\\n%.0s' $(seq 200) > src/pkg/a.py",
        "mkdir -p shards && for i in $(seq 200); do "
        'echo \'{"content": "print(\\"hello\\")"}\'; done > shards/part.jsonl',
    ],
    "docs/training.md": [
        "cp configs/default.toml configs/my.toml",
        "mkdir -p corpus && printf 'some text of my own, line after line\\n%.0s' $(seq 300) "
        "> corpus/a.txt",
    ],
    "docs/sampling.md": ["printf 'ROMEO:' > prompt.txt"],
}
"""What a page assumes its reader already has of their own, made before the page's
commands run."""

AFTER = {"docs/sampling.md": "README.md"}
"""A page whose reader arrives with the runs another page trained runs after that page,
in its folder (sampling.md samples from the README's checkpoints/default and
checkpoints/shakespeare-char-cpu)."""

TRAINS = re.compile(r"(?:^|\s)(?:-m )?minigpt train(?:\s|$)")
MAX_ITERS_FLAG = re.compile(r"\s--max-iters[ =]\d+")
RESUME = re.compile(r"--resume[ =](\S+)")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str


def strip_comment(line: str) -> str:
    """line without a trailing shell comment (a # that starts a word outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands_in(text: str, page: str) -> list[Command]:
    """The shell commands in a page's code blocks, in order: every line of a bash/sh
    block, the `$ ` lines of a console block, and in any other block the lines that start
    with `minigpt `, `torchrun` or `python -m minigpt`. Lines ending in a backslash are
    joined; `a && b` is two commands."""
    found: list[Command] = []
    lang = None
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", raw)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            continue
        if lang is None:
            continue
        line = raw.strip()
        if not pending:
            start = number
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            elif lang not in ("bash", "sh", "shell"):
                if not re.match(r"(minigpt |torchrun|python -m minigpt)", line):
                    continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = strip_comment(pending + line)
        pending = ""
        for part in line.split(" && "):
            part = " ".join(part.split())
            if part and not part.startswith("#"):
                found.append(Command(page, start, part))
    return found


def with_placeholders(command: str) -> str:
    for word, value in PLACEHOLDERS.items():
        command = re.sub(rf"(?<![\w/.-]){word}(?![\w/.-])", value, command)
    return command


def page_commands(page: Path) -> list[Command]:
    name = page.relative_to(REPO).as_posix()
    return [
        Command(c.page, c.line, with_placeholders(c.text))
        for c in commands_in(page.read_text(encoding="utf-8"), name)
    ]


def short_training(command: str, work: Path) -> str:
    """command, training MAX_ITERS steps (beyond the step a resumed run reached)."""
    if not TRAINS.search(command):
        return command
    steps = MAX_ITERS
    resumed = RESUME.search(command)
    if resumed and (work / resumed.group(1) / "trainer.pt").exists():
        from minigpt.checkpoint import load_trainer_state

        steps += load_trainer_state(work / resumed.group(1) / "trainer.pt").step
    command = MAX_ITERS_FLAG.sub("", command)
    return f"{command} --max-iters {steps}"


def shims(folder: Path) -> Path:
    """A bin folder whose minigpt, torchrun and python are this interpreter's."""
    folder.mkdir()
    targets = {
        "minigpt": f'exec "{sys.executable}" -m minigpt "$@"',
        "torchrun": f'exec "{sys.executable}" -m torch.distributed.run "$@"',
        "python": f'exec "{sys.executable}" "$@"',
    }
    for name, line in targets.items():
        path = folder / name
        path.write_text(f"#!/usr/bin/env bash\n{line}\n", encoding="utf-8")
        path.chmod(0o755)
    return folder


def runnable(page: Path) -> list[Command]:
    """What the page assumes its reader has, then the page's commands that run here."""
    name = page.relative_to(REPO).as_posix()
    given = [Command(name, 0, text) for text in GIVEN.get(name, [])]
    return given + [c for c in page_commands(page) if c.text not in SKIPPED]


def command_env(root: Path) -> dict[str, str]:
    """The environment the commands run in: this checkout's minigpt, and no network (an
    HTTP download goes to a closed local port and fails at once)."""
    nowhere = "http://127.0.0.1:9"
    return {
        **{k: v for k, v in os.environ.items() if k.lower() != "no_proxy"},
        **{name: nowhere for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
        "PATH": f"{shims(root / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MINIGPT_SHAKESPEARE_URL": SHAKESPEARE.as_uri(),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def run_page(name: str, commands: list[Command], work: Path, env: dict[str, str]) -> list[str]:
    """Run a page's commands in order in work; the first failure, described."""
    for command in commands:
        text = short_training(command.text, work)
        try:
            proc = subprocess.run(  # a prompt on stdin for `generate -i`, then end of input
                ["bash", "-c", text], cwd=work, env=env, input="def \n", text=True,
                capture_output=True, timeout=COMMAND_TIMEOUT,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return [f"{name}:{command.line}: `{text}` ran past {COMMAND_TIMEOUT} s"]
        if proc.returncode != 0:
            tail = (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()
            where = f"{name}:{command.line}" if command.line else f"{name} (given)"
            return [f"{where}: `{text}` exited {proc.returncode}\n{tail}"]
    return []


def run_pages(pages: list[Path], root: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """Run pages one after another in one work folder that holds a copy of configs/, as
    a checkout does; each page's failures."""
    work = root / pages[0].relative_to(REPO).as_posix().replace("/", "_").removesuffix(".md")
    shutil.copytree(REPO / "configs", work / "configs")
    failures = {}
    for page in pages:
        name = page.relative_to(REPO).as_posix()
        failures[name] = run_page(name, runnable(page), work, env)
    return failures


def reading_paths() -> list[list[Path]]:
    """The pages in independent groups: a page and the pages that follow it (AFTER)."""
    by_name = {page.relative_to(REPO).as_posix(): page for page in PAGES}
    paths = [[page] for name, page in by_name.items() if name not in AFTER]
    for name, before in AFTER.items():
        next(path for path in paths if by_name[before] in path).append(by_name[name])
    return paths


@pytest.fixture(scope="module")
def page_failures(tmp_path_factory) -> dict[str, list[str]]:
    """Each page's failures; independent groups of pages run two at a time."""
    assert SHAKESPEARE.exists(), (
        f"the docs' commands need {SHAKESPEARE} (../shared beside the checkout)"
    )
    root = tmp_path_factory.mktemp("docs")
    pages_root = root / "pages"
    shared = pages_root / "shared" / "data" / "tinyshakespeare"  # as ../shared/... in a page
    shared.mkdir(parents=True)
    (shared / "input.txt").symlink_to(SHAKESPEARE)
    env = command_env(root)
    paths = sorted(reading_paths(), key=lambda pages: -sum(len(runnable(p)) for p in pages))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda pages: run_pages(pages, pages_root, env), paths))
    return {name: failures for result in results for name, failures in result.items()}


@pytest.mark.parametrize("page", [p.relative_to(REPO).as_posix() for p in PAGES])
def test_every_documented_command_runs_as_written(page, page_failures):
    failures = page_failures[page]
    assert not failures, "\n\n".join(failures)


def test_every_skipped_command_is_still_in_the_docs():
    documented = {c.text for page in PAGES for c in page_commands(page)}
    assert set(SKIPPED) <= documented, sorted(set(SKIPPED) - documented)


def test_the_command_finder_reads_bash_console_and_plain_blocks():
    page = (
        "```bash\nminigpt train --out a   # a comment\n# only a comment\n"
        "torchrun --nproc_per_node 2 \\\n    -m minigpt train\npip install x && pytest -k 'a #b'\n```\n"
        "```console\n$ minigpt eval a\nloss 1.0\n```\n"
        "```\nminigpt generate a\nsome output\n```\n"
        "```python\nimport minigpt\n```\nminigpt prose\n"
    )
    found = [(c.line, c.text) for c in commands_in(page, "p.md")]
    assert found == [
        (2, "minigpt train --out a"),
        (4, "torchrun --nproc_per_node 2 -m minigpt train"),
        (6, "pip install x"),
        (6, "pytest -k 'a #b'"),
        (9, "minigpt eval a"),
        (13, "minigpt generate a"),
    ]


def test_training_commands_get_a_short_run(tmp_path):
    assert short_training("minigpt train configs/x.toml", tmp_path).endswith("--max-iters 2")
    assert short_training("minigpt train --max-iters 3000 --out a", tmp_path) == (
        "minigpt train --out a --max-iters 2"
    )
    assert short_training("minigpt generate", tmp_path) == "minigpt generate"
    assert with_placeholders("minigpt generate RUN -p RUNS") == (
        "minigpt generate checkpoints/default -p RUNS"
    )


def test_a_failing_command_is_reported_with_its_page_and_line_and_stops_the_page(tmp_path):
    commands = [
        Command("p.md", 3, "minigpt generate checkpoints/nope"),
        Command("p.md", 4, "touch never-run"),
    ]
    work = tmp_path / "work"
    work.mkdir()
    failures = run_page("p.md", commands, work, command_env(tmp_path))
    assert len(failures) == 1
    assert failures[0].startswith("p.md:3: `minigpt generate checkpoints/nope` exited 2")
    assert "error: " in failures[0] and not (work / "never-run").exists()
