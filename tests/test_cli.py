"""The command line as a user meets it: the help, and errors without tracebacks."""

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minigpt", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_three_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "generate", "inspect-heads"):
        assert command in result.stdout


def test_unknown_option_is_a_usage_error_not_a_traceback():
    result = run_cli("--no-such-option")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No such option" in result.stderr
