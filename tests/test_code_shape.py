"""The shape the code keeps: functions a reader can hold in their head, and one
forward pass (the model's), which the head inspector calls instead of copying."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minigpt"
MAX_FUNCTION_LINES = 100


def function_lengths() -> dict[str, int]:
    """'module.py: name' -> lines from its first decorator (or def) to its last line.

    Typer commands count their options too: they are part of what a reader reads.
    """
    lengths = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lengths[f"{path.name}: {node.name}"] = node.end_lineno - start + 1
    return lengths


def test_no_function_is_over_100_lines():
    lengths = function_lengths()
    assert len(lengths) > 100  # the walk found the package
    too_long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert not too_long, f"split these into named steps: {too_long}"


def test_the_head_inspector_does_not_reimplement_the_model():
    source = (PACKAGE / "heads.py").read_text(encoding="utf-8")
    for part in ("tok_emb", "pos_emb", "ln_f", "lm_head", "cross_entropy", ".blocks"):
        assert part not in source, f"heads.py uses the model's {part}: call a GPT method instead"
