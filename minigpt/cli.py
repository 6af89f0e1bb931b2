"""The `minigpt` command line: thin typer commands over the modules.

Each command parses its options, calls the module that owns the work, and prints.
Bad input raises `MinigptError` anywhere below; `main` turns it into one line
and a hint on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from minigpt.errors import MinigptError

app = typer.Typer(
    name="minigpt",
    help="A workbench for small GPTs: train one, sample from it, look inside its attention heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _not_built(command: str, issue: str) -> None:
    raise MinigptError(
        f"`minigpt {command}` is not built yet.", hint=f"it arrives with the {issue} issue"
    )


@app.command()
def train() -> None:
    """Train a GPT on a text corpus (default: char-level on the Python standard library)."""
    _not_built("train", "trainer")


@app.command()
def generate() -> None:
    """Sample text from a trained run with the KV cache."""
    _not_built("generate", "generation")


@app.command("inspect-heads")
def inspect_heads() -> None:
    """Show what every attention head of a trained run does."""
    _not_built("inspect-heads", "head inspection")


@app.command()
def prepare(
    source: str = typer.Argument(
        "pystdlib",
        help="A text file, a folder, or a built-in dataset: pystdlib, shakespeare, induction.",
    ),
    tokenizer: str = typer.Option(
        "char", "--tokenizer", "-t", help="char, bpe, gpt2, r50k_base, cl100k_base or o200k_base."
    ),
    vocab_size: int | None = typer.Option(
        None, "--vocab-size", help="Vocabulary size for bpe (default 2048)."
    ),
    glob: str = typer.Option("*.txt", "--glob", help="Which files of a folder to read."),
    data_dir: str = typer.Option("data", "--data-dir", help="Where prepared data is kept."),
) -> None:
    """Tokenise a corpus once into train/val token files (cached by content hash)."""
    from pathlib import Path

    from minigpt import data

    prepared = data.prepare(source, tokenizer, vocab_size, Path(data_dir), glob)
    print(data.describe_prepared(prepared))


def main() -> None:
    """Entry point: run the app; bad input becomes one line, a hint and exit code 2.

    typer handles its own usage errors (unknown option, bad value) with exit code 2.
    """
    try:
        app()
    except MinigptError as err:
        print(f"error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
