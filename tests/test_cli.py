"""The command line as a user meets it: the help, and errors without tracebacks."""

import os
import signal
import subprocess
import sys

import pytest
import typer.main

from minigpt import cli, console
from minigpt.errors import MinigptError


def test_help_lists_the_three_commands(run_minigpt):
    result = run_minigpt("--help")
    assert result.returncode == 0
    for command in ("train", "generate", "inspect-heads"):
        assert command in result.stdout


def test_unknown_option_is_a_usage_error_not_a_traceback(run_minigpt):
    result = run_minigpt("--no-such-option")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No such option" in result.stderr


def test_help_does_not_load_torch():
    code = "import sys, minigpt.cli; assert 'torch' not in sys.modules, 'torch loaded'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_option_names_name_real_options():
    group = typer.main.get_command(cli.app)
    options = {
        name for command in group.commands.values() for p in command.params for name in p.opts
    }
    assert set(cli.OPTION_NAMES.values()) <= options


def test_errors_name_the_option_not_the_argument(capsys):
    err = MinigptError("top_k must be at least 1, got 0", hint="top_k 1 is greedy", param="top_k")
    console.print_error(err, cli.OPTION_NAMES)
    assert capsys.readouterr().err == (
        "error: --top-k must be at least 1, got 0\nhint: --top-k 1 is greedy\n"
    )


def test_the_interactive_loop_renames_errors_and_goes_on(monkeypatch, capsys):
    lines = iter(["bad", "good", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    answered = []

    def answer(line):
        if line == "bad":
            raise MinigptError("num_samples must be between 1 and 1024", param="num_samples")
        answered.append(line)

    console.interactive_loop(answer, cli.OPTION_NAMES)
    assert answered == ["good"]
    assert "error: --num-samples must be between 1 and 1024\n" in capsys.readouterr().err


def _command_that(behaves):
    """A stand-in for the typer app: it receives SIGTERM (its flag is set), then behaves."""

    def app() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # only sets the flag while main runs
        behaves()

    return app


@pytest.mark.parametrize(
    "behaves",
    [
        lambda: sys.exit(0),  # finished as the signal came: a plot drawn, a result printed
        lambda: (_ for _ in ()).throw(MinigptError("something else went wrong")),
        lambda: (_ for _ in ()).throw(ImportError("initialization failed")),  # a library's
    ],
    ids=["finished", "an error", "a library's error"],
)
def test_a_signal_that_no_poll_saw_still_stops_the_command_with_its_word(
    monkeypatch, capsys, behaves
):
    monkeypatch.setattr(cli, "app", _command_that(behaves))
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # exit_quietly sets it
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 143
    assert capsys.readouterr().err.splitlines() == ["terminated"]
    assert signal.getsignal(signal.SIGTERM) is before  # in-process, main restores the handlers
