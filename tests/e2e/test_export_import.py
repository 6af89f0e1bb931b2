"""`minigpt import` and `export` as a user runs them: no command destroys its source or
a folder of the other kind (with --force too), each writes its folder completely or
not at all (a kill -9 at any moment leaves the old folder or the new one, and nothing
hidden after the next run), stale files of an earlier export do not survive --force,
and output paths that are empty or run through a file are refused in one sentence."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CASES: dict = {}
HF_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def case(name: str):
    return lambda fn: CASES.setdefault(name, fn)


def hf_folder(folder: Path, n_embd: int = 32, n_layer: int = 1, block_size: int = 32) -> Path:
    """A GPT-2 checkpoint in Hugging Face format (random weights, a byte-level vocabulary),
    as save_pretrained lays it out."""
    import torch
    from safetensors.torch import save_file

    from minigpt.atomic import write_json_atomic
    from minigpt.hf import hf_config_from_gpt, state_to_hf
    from minigpt.hf_tokenizer import write_hf_tokenizer
    from minigpt.model import GPT, GPTConfig
    from minigpt.tokenizer import GPT2_SPLIT_PATTERN, BPETokenizer

    tokenizer = BPETokenizer({bytes([i]): i for i in range(256)}, GPT2_SPLIT_PATTERN)
    config = GPTConfig(
        vocab_size=257, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd,
        bias=True, activation="gelu_tanh",
    )  # fmt: skip
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_file(state_to_hf(GPT(config).state_dict(), config), str(folder / "model.safetensors"))
    write_json_atomic(folder / "config.json", hf_config_from_gpt(config, 256))
    write_hf_tokenizer(tokenizer, folder, model_max_length=block_size)
    return folder


def hashes(c, folder: str) -> dict[str, str | None]:
    return {p.name: c.sha(p) for p in sorted(c.p(folder).iterdir())}


def hidden_leftovers(*folders: Path) -> list[str]:
    """Temporary files or folders left in `folders`."""
    return [f"{f.name}/{name} was left" for f in folders for name in _tmp_names(f)]


def _tmp_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def says(r, words: str) -> list[str]:
    return [] if words in " ".join(r.error_lines) else [f"not {words!r}: {r.error_lines}"]


def hf_loads(folder: Path) -> list[str]:
    """Problems if `folder` is not a whole Hugging Face model: a config.json that names a
    model_type, and weights that load."""
    import json

    from safetensors.torch import load_file

    try:
        assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
        load_file(str(folder / "model.safetensors"))
        return []
    except Exception as err:  # noqa: BLE001 (any failure to load it is the finding)
        return [f"{folder.name} is no whole model ({type(err).__name__}: {str(err)[:120]})"]


# --------------------------------------------------------------------------- no command destroys its source


@case("export R --out R --force")
def _(c):
    c.use("base")
    before = c.snapshot()
    r = c.mg("export", "R", "--out", "R", "--force")
    problems = c.refused(r) + says(r, "R is a minigpt run, the source of this export")
    return problems + c.unchanged(before) + c.loads() + c.absent("R/generation_config.json")


@case("export R --out a link to R --force")
def _(c):
    c.use("base")
    c.p("link").symlink_to("R")
    before = c.snapshot()
    r = c.mg("export", "R", "--out", "link", "--force")
    return c.refused(r) + says(r, "the source of this export") + c.unchanged(before) + c.loads()


@case("export R --out R2 --force, R2 another run")
def _(c):
    c.use("base")
    shutil.copytree(c.p("R"), c.p("R2"))
    before = c.snapshot("R2")
    r = c.mg("export", "R", "--out", "R2", "--force")
    problems = c.refused(r) + says(r, "R2 is a minigpt run; export writes a Hugging Face folder")
    return problems + c.unchanged(before, "R2") + c.loads("R2")


@case("import hf0 --out hf0 --force")
def _(c):
    hf_folder(c.p("hf0"))
    before = hashes(c, "hf0")
    r = c.mg("import", "hf0", "--out", "hf0", "--force")
    problems = c.refused(r) + says(r, "hf0 is a Hugging Face checkpoint, the source of this import")
    return problems + c.avoids(r, "--resume") + ([] if hashes(c, "hf0") == before else ["changed"])


@case("import hf0 --out hf1 --force, hf1 another Hugging Face checkpoint")
def _(c):
    hf_folder(c.p("hf0"))
    hf_folder(c.p("hf1"))
    before = hashes(c, "hf1")
    r = c.mg("import", "hf0", "--out", "hf1", "--force")
    problems = c.refused(r) + says(
        r, "hf1 is a Hugging Face checkpoint; import writes a minigpt run"
    )
    return problems + c.avoids(r, "--resume") + ([] if hashes(c, "hf1") == before else ["changed"])


@case("train --out hf0 --force")
def _(c):
    c.corpus()
    hf_folder(c.p("hf0"))
    before = hashes(c, "hf0")
    r = c.mg(*c.train_args("--max-iters", "2", "--force", out="hf0"))
    problems = c.refused(r) + says(
        r, "hf0 is a Hugging Face checkpoint; train writes a minigpt run"
    )
    return problems + c.avoids(r, "--resume") + ([] if hashes(c, "hf0") == before else ["changed"])


@case("train --init-from R --out R --force")
def _(c):
    c.use("base")
    before = c.snapshot()
    r = c.mg(*c.train_args("--max-iters", "2", "--init-from", "R", "--force"))
    problems = c.refused(r) + says(r, "R is a minigpt run, the source of this fine-tune")
    return problems + c.unchanged(before) + c.loads()


@case("import over an imported run: refused without --force, replaced with it")
def _(c):
    hf_folder(c.p("hf0"))
    problems = c.ok(c.mg("import", "hf0", "--out", "imp"))
    again = c.mg("import", "hf0", "--out", "imp")
    problems += (
        c.refused(again) + says(again, "imp already holds a run") + c.avoids(again, "--resume")
    )
    return problems + c.ok(c.mg("import", "hf0", "--out", "imp", "--force")) + run_loads(c.p("imp"))


# --------------------------------------------------------------------------- whole or not at all


@case("export --force of a char run over an earlier BPE export: no stale tokenizer")
def _(c):
    c.use("base")
    hf_folder(c.p("hf0"))
    problems = c.ok(c.mg("import", "hf0", "--out", "bpe"))
    problems += c.ok(c.mg("export", "bpe", "--out", "exp/stale"))
    problems += [
        f"{n} was not exported" for n in TOKENIZER_FILES if not c.p("exp/stale", n).exists()
    ]
    problems += c.ok(c.mg("export", "R", "--out", "exp/stale", "--force"))
    problems += c.absent(*(f"exp/stale/{name}" for name in TOKENIZER_FILES))
    return problems + hf_loads(c.p("exp/stale")) + hidden_leftovers(c.p("exp"), c.p("exp/stale"))


@case("a half-run left by an older import: named, replaced with --force")
def _(c):
    hf_folder(c.p("hf0"))
    c.write("half/tokenizer.json", '{"kind": "bpe", "ranks": []}')
    c.write("half/.lock", "pid 1 on elsewhere")
    c.write("half/.model.safetensors.k2j4_xyz.tmp", b"\0" * 1000)
    r = c.mg("import", "hf0", "--out", "half")
    problems = (
        c.refused(r) + says(r, "half holds an incomplete minigpt run") + c.avoids(r, "--resume")
    )
    problems += c.ok(c.mg("import", "hf0", "--out", "half", "--force"))
    return problems + run_loads(c.p("half")) + hidden_leftovers(c.p("half"))


def run_loads(run: Path) -> list[str]:
    """Problems if `run` is not a whole run that loads."""
    from minigpt.checkpoint import load_run

    try:
        load_run(run)
        return []
    except Exception as err:  # noqa: BLE001 (any failure to load it is the finding)
        return [f"{run.name} does not load ({type(err).__name__}: {str(err)[:120]})"]


def kill_when_staging(c, args: tuple, watch: Path, delay: float) -> str:
    """Start `minigpt ARGS` and kill -9 it `delay` s after a staging folder appears in
    `watch`; returns what happened ("killed" or "finished")."""
    proc = c.spawn(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.running():
        if _tmp_names(watch):
            time.sleep(delay)
            proc.kill9()
            c.collect(proc)
            return "killed"
        time.sleep(0.001)
    c.collect(proc)
    return "finished"


def kill_loop(c, command: str, source: str, out: str, whole) -> list[str]:
    """kill -9 `minigpt COMMAND SOURCE --out OUT` at a few moments while it writes, into a
    new OUT and over an existing one (--force); each time OUT must be absent, whole, or
    without config.json, the next run must succeed, and nothing hidden may stay."""
    rng = random.Random(f"{command}{out}")
    problems, killed = [], 0
    for existing in (False, False, True, True):  # into a new OUT, then over one with --force
        if not existing:
            shutil.rmtree(c.p(out), ignore_errors=True)
        delay = rng.choice([0.0, rng.uniform(0, 0.1)])
        args = (command, source, "--out", out, *(["--force"] if existing else []))
        watch = c.p(out) if existing else c.p(out).parent
        killed += kill_when_staging(c, args, watch, delay) == "killed"
        # over an existing OUT (a mount point, say) the files are swapped one rename at a
        # time, config.json last: killed in that instant, OUT reads as incomplete, never
        # as a model made of two
        cut_short = existing and not c.p(out, "config.json").exists()
        if c.p(out).exists() and not cut_short:
            problems += [f"after a kill at +{delay:.3f} s: {p}" for p in whole(c.p(out))]
        rerun = c.mg(*args) if existing or not c.p(out).exists() else c.mg(*args, "--force")
        problems += c.ok(rerun) + whole(c.p(out))
        problems += hidden_leftovers(c.p(out), c.p(out).parent)
    return problems + ([] if killed >= 2 else [f"only {killed} of 4 runs were killed writing"])


def big_hf(c) -> None:
    """hf0 large enough (about 45 MB) that writing it takes a while to kill into."""
    hf_folder(c.p("hf0"), n_embd=384, n_layer=6, block_size=64)


@case("kill -9 during import, then import again")
def _(c):
    big_hf(c)

    return kill_loop(c, "import", "hf0", "runs/big", run_loads)


@case("kill -9 during export, then export again")
def _(c):
    big_hf(c)
    problems = c.ok(c.mg("import", "hf0", "--out", "big"))
    return problems + kill_loop(c, "export", "big", "exp/big", hf_loads)


# --------------------------------------------------------------------------- output paths


EMPTY = {
    "export --out ''": lambda c: ("export", "R", "--out", ""),
    "import --out ''": lambda c: ("import", "hf0", "--out", ""),
    "prepare --data-dir ''": lambda c: ("prepare", "corpus.txt", "--data-dir", ""),
    "train --out ''": lambda c: c.train_args("--max-iters", "2", out=""),
}
for _label, _command in EMPTY.items():

    @case(_label)
    def _(c, command=_command):
        c.use("base")
        hf_folder(c.p("hf0"))
        before = sorted(p.name for p in c.dir.iterdir() if not p.name.startswith("."))
        r = c.mg(*command(c))
        after = sorted(p.name for p in c.dir.iterdir() if not p.name.startswith("."))
        written = [f"{name} was written" for name in after if name not in before]
        return c.refused(r) + says(r, "must not be empty") + written


THROUGH_A_FILE = {
    "export --out exp/afile/sub": lambda c: ("export", "R", "--out", "exp/afile/sub"),
    "import --out exp/afile/sub": lambda c: ("import", "hf0", "--out", "exp/afile/sub"),
    "train --out exp/afile/sub": lambda c: c.train_args("--max-iters", "2", out="exp/afile/sub"),
    "prepare --data-dir exp/afile": lambda c: ("prepare", "corpus.txt", "--data-dir", "exp/afile"),
    "export --out exp/afile": lambda c: ("export", "R", "--out", "exp/afile"),
}
for _label, _command in THROUGH_A_FILE.items():

    @case(_label)
    def _(c, command=_command):
        c.use("base")
        hf_folder(c.p("hf0"))
        c.write("exp/afile", "x")
        r = c.mg(*command(c))
        problems = c.refused(r) + says(r, "exp/afile is a file, not a folder")
        unchanged = c.p("exp/afile").read_text() == "x"
        return problems + c.avoids(r, "File exists") + ([] if unchanged else ["afile changed"])


# --------------------------------------------------------------------------- the tests


def test_export_and_import_write_whole_and_destroy_nothing(problems, name):
    assert problems[name] == []


def _mount(folder: Path, *options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["size=64m", *options]), "tmpfs", str(folder)],
        capture_output=True,
    )
    return done.returncode == 0


def test_a_mount_point_as_out(new_case):
    """--out a mount point (a folder on another filesystem than its parent): export and
    import write into it, --force too; a read-only one is refused as read-only."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a filesystem needs root")
    c = new_case("mount point")
    mounts = [c.p("exp"), c.p("run")]
    if not all(_mount(folder) for folder in mounts):
        pytest.skip("mount is not allowed here")
    try:
        c.use("base")
        hf_folder(c.p("hf0"))
        assert c.ok(c.mg("export", "R", "--out", "exp")) == []
        assert c.ok(c.mg("export", "R", "--out", "exp", "--force")) == []
        assert hf_loads(c.p("exp")) == []
        assert c.ok(c.mg("import", "hf0", "--out", "run")) == []
        assert run_loads(c.p("run")) == []
        assert hidden_leftovers(c.p("exp"), c.p("run")) == []
        for folder in mounts:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        for command in (
            ("export", "R", "--out", "exp", "--force"),
            ("import", "hf0", "--out", "run", "--force"),
        ):
            r = c.mg(*command)
            assert c.refused(r) == [] and says(r, "Read-only file system") == [], r.err
    finally:
        for folder in mounts:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        c.cleanup()
