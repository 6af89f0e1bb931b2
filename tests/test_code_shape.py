"""The shape the code keeps, so that a student can read it: modules of one sitting,
functions a reader can hold in their head, imports that follow docs/layout.md's order,
a default forward pass through a handful of functions as in nanoGPT, and no history
in the code (it goes to commit messages and docs/benchmarks.md)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minigpt"
MAX_MODULE_LINES = 650
MAX_FUNCTION_LINES = 60
MAX_COMMAND_LINES = 100  # cli.py's typer commands: their options are declarations
MAX_FORWARD_FUNCTIONS = 7
HISTORY = re.compile(
    r"\bissue \d+|\b(this|last|previous|earlier) session\b|\b20\d\d-[01]\d-[0-3]\d\b", re.I
)


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_longer_than_one_sitting():
    lengths = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in modules()}
    assert len(lengths) > 20  # the walk found the package
    too_long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these by concern: {too_long}"


def test_no_function_is_longer_than_a_screen():
    too_long = {}
    for path in modules():
        limit = MAX_COMMAND_LINES if path.name == "cli.py" else MAX_FUNCTION_LINES
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    too_long[f"{path.name}: {node.name}"] = lines
    assert not too_long, f"split these into named steps: {too_long}"


def layout_order() -> list[str]:
    """The modules in the order of docs/layout.md's table."""
    table = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    return re.findall(r"^\| `(\w+)\.py` \|", table, re.M)


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, minigpt module) of every import that runs (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for sub in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom):
            continue
        if node.module == "minigpt":
            found += [(node.lineno, alias.name) for alias in node.names]
        elif node.module and node.module.startswith("minigpt."):
            found.append((node.lineno, node.module.split(".")[1]))
    return found


def test_every_module_is_in_the_layout_and_imports_only_those_above_it():
    order = layout_order()
    position = {name: i for i, name in enumerate(order)}
    package = {p.stem for p in modules()} - {"__init__", "__main__"}
    assert package <= set(order), f"add to docs/layout.md: {sorted(package - set(order))}"
    upward = [
        f"{path.name}:{line} imports {name}"
        for path in modules()
        if path.stem in position
        for line, name in runtime_imports(path)
        if position.get(name, -1) >= position[path.stem]
    ]
    assert not upward, upward


def test_the_default_forward_pass_runs_through_a_handful_of_functions():
    import torch

    from minigpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=65)).eval()
    idx = torch.randint(0, 65, (1, 16))
    entered: set[str] = set()

    def record(frame, event, arg):
        if event == "call" and str(PACKAGE) in frame.f_code.co_filename:
            entered.add(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_qualname}")

    with torch.no_grad():
        model(idx)
        sys.setprofile(record)
        try:
            model(idx)
        finally:
            sys.setprofile(None)
    assert "attention.py:MultiHeadAttention.forward" in entered  # the profile saw the model
    assert len(entered) <= MAX_FORWARD_FUNCTIONS, sorted(entered)


def test_the_code_carries_no_history():
    dated = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("minigpt", "tests", "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if HISTORY.search(line) and path.name != "test_code_shape.py"
    ]
    assert not dated, f"history belongs in commit messages and docs/benchmarks.md: {dated}"


def test_the_head_inspector_does_not_reimplement_the_model():
    for name in ("heads.py", "heads_run.py"):
        source = (PACKAGE / name).read_text(encoding="utf-8")
        for part in ("tok_emb", "pos_emb", "ln_f", "lm_head", "cross_entropy", ".blocks"):
            assert part not in source, f"{name} uses the model's {part}: call a GPT method"
