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
