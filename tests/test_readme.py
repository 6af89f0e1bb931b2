"""The README names the test behind each reliability promise: those tests must exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_readme_names_exists():
    named = set(re.findall(r"`(test_\w+)`", (REPO / "README.md").read_text(encoding="utf-8")))
    defined = {
        name
        for path in (REPO / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)\(", path.read_text(encoding="utf-8"), re.M)
    }
    assert len(named) >= 10
    assert named <= defined, sorted(named - defined)
