"""The README is a landing page and docs/ the reference: the README stays short, every
relative link in them leads to a file (and heading), and every test that
docs/reliability.md names as holding a promise exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

README_MAX_LINES = 250
"""A landing page a newcomer reads in one go; the reference lives in docs/."""

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
"""A markdown link or image: [text](target) or ![alt](target "title")."""

URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
"""A target with a scheme (https:, mailto:): outside the repository."""

TEST_DEF = re.compile(r"^\s*(?:async\s+)?def (test_\w+)\(", re.M)


def prose(page: Path) -> str:
    """page's markdown without its fenced code blocks, where brackets and #s are code."""
    return re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)


def defined_tests() -> set[str]:
    """Every test function under tests/, process-level ones in subfolders included."""
    return {
        name
        for path in (REPO / "tests").rglob("test_*.py")
        for name in TEST_DEF.findall(path.read_text(encoding="utf-8"))
    }


def relative_links(page: Path) -> list[str]:
    """The targets of page's links that point inside the repository."""
    targets = [match.group(1) for match in LINK.finditer(prose(page))]
    return [t for t in targets if not URL.match(t) and not t.startswith("#")]


def anchors(page: Path) -> set[str]:
    """The #anchors GitHub gives page's headings: lower case, punctuation dropped, spaces
    to hyphens, a repeated heading numbered."""
    seen: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(page), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in seen:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        seen.add(anchor)
    return seen


def test_every_test_the_reliability_page_names_exists():
    named = set(re.findall(r"`(test_\w+)`", (DOCS / "reliability.md").read_text(encoding="utf-8")))
    assert len(named) >= 10
    assert named <= defined_tests(), sorted(named - defined_tests())


def test_the_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md: {len(lines)} lines; move reference to docs/"


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_heading():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            linked = page.parent / path
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert len(pages) > 10 and not broken, broken


def test_the_link_finder_sees_links_and_images_and_skips_urls_and_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[a](docs/a.md#part) ![b](b.png) [c](https://example.com) [d](#here)\n"
        '[e](e.md "title")\n```\n[f](not-a-link.md)\n```\n',
        encoding="utf-8",
    )
    assert relative_links(page) == ["docs/a.md#part", "b.png", "e.md"]


def test_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n## Import: `minigpt import SOURCE --out RUN`\n## `modern-cpu.toml`\n"
        "## Title\n```\n# not a heading\n```\n",
        encoding="utf-8",
    )
    expected = {"title", "import-minigpt-import-source---out-run", "modern-cputoml", "title-1"}
    assert anchors(page) == expected
