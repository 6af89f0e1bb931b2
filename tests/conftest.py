"""Shared test helpers: the command line in-process and as a subprocess, and a tiny GPT."""

import subprocess
import sys

import pytest


@pytest.fixture
def minigpt_cli(monkeypatch, capsys):
    """Run `minigpt ARGS` in-process through cli.main: (exit code, stdout, stderr)."""
    from minigpt import cli

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["minigpt", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def run_minigpt():
    """Run `python -m minigpt ARGS` in a subprocess, capturing its output as text."""

    def run(*args, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "minigpt", *map(str, args)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


# --------------------------------------------------------------------------- corpora for the data tests


@pytest.fixture(scope="session")
def make_text():
    """make_text(n_lines=400, extra=""): a small corpus of numbered lines, `extra` at its end."""

    def make(n_lines: int = 400, extra: str = "") -> str:
        lines = [f"line {i}: the cat sat on mat number {i * 7 % 13}.\n" for i in range(n_lines)]
        return "".join(lines) + extra

    return make


@pytest.fixture(scope="session")
def listing():
    """listing(folder): every path under `folder`, relative to it, sorted."""

    def paths(folder) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))

    return paths


@pytest.fixture(scope="session")
def assert_nothing_written(listing):
    """assert_nothing_written(data_dir): nothing in data_dir, hidden or not (or no data_dir)."""

    def check(data_dir) -> None:
        assert not data_dir.exists() or listing(data_dir) == []

    return check


@pytest.fixture(scope="session")
def tiny_gpt():
    """Build a small GPT in eval mode from torch.manual_seed(seed): the same weights every time."""
    import torch

    from minigpt.model import GPT, GPTConfig

    def build(
        vocab_size, block_size=16, *, seed=0, n_layer=2, n_head=2, n_embd=32, **overrides
    ) -> GPT:
        torch.manual_seed(seed)
        config = dict(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            bias=True,
        )
        return GPT(GPTConfig(**{**config, **overrides})).eval()

    return build
