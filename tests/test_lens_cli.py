"""`minigpt lens`, `attribute` and `patch` as a user meets them: what each prints, the
files --json, --html and --png write, every kind of bad input refused in one sentence
and a hint (exit 2, nothing written), and --help. One tiny run with random weights and
a char tokenizer that knows the characters HTML must escape."""

from __future__ import annotations

import io
import json
import os
import re
from html.parser import HTMLParser

import pytest
from rich.console import Console

from minigpt import lens_render
from minigpt.checkpoint import load_run, write_run_files
from minigpt.lens_run import attribute_run, lens_run, patch_run
from minigpt.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 <&\"'.\n"
BLOCK_SIZE = 32
PROMPT = 'a<b&c"d e'  # short enough for the number table
CLEAN, CORRUPT = 'x<y&"z 1', 'x<y&"z 2'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_gpt, tmp_path_factory):
    tokenizer = CharTokenizer.from_text(CHARS)
    model = tiny_gpt(tokenizer.vocab_size, block_size=BLOCK_SIZE)
    return write_run_files(tmp_path_factory.mktemp("run"), model, tokenizer)


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir, "cpu")


def outputs(folder) -> list:
    return ["--json", folder / "r.json", "--html", folder / "r.html", "--png", folder / "r.png"]


def strict(path):
    """The file's JSON, refusing NaN and Infinity as a strict parser does."""

    def refuse(word):
        raise ValueError(f"not strict JSON: {word}")

    return json.loads(path.read_text(), parse_constant=refuse)


def row_numbers(out: str, row: str) -> list[float]:
    """The numbers in the printed table's row named `row`."""
    line = next(line for line in out.splitlines() if re.match(rf"│ {re.escape(row)}\s+│", line))
    return [float(cell) for cell in line.split("│")[2:-1]]


# --------------------------------------------------------------------------- what each prints


def test_lens_prints_each_stream_the_grid_and_the_top_list(run_dir, run, minigpt_cli, tmp_path):
    code, out, err = minigpt_cli(
        "lens", run_dir, "--prompt", PROMPT, "--top", 3, "--position", 2, *outputs(tmp_path)
    )
    assert code == 0, err
    data = strict(tmp_path / "r.json")
    expected, _ = lens_run(run, PROMPT, 3, 2)
    assert data == expected.to_dict()
    assert data["streams"] == ["embed", "L0", "L1"]
    assert f"at position 2 '{PROMPT[2]}'" in out and f"next token '{PROMPT[3]}'" in out
    for s, stream in enumerate(data["streams"]):
        p, rank = data["next_probs"][s][2], data["next_ranks"][s][2]
        top = ", ".join(
            f"'{tok}' {prob:.2f}"
            for tok, prob in zip(data["top_tokens"][s][2], data["top_probs"][s][2], strict=True)
        )
        assert re.search(rf"^\s+{stream}\s+p={p:.3f} rank {rank}\s+{re.escape(top)}$", out, re.M)
        assert row_numbers(out, stream) == [round(v, 3) for v in data["next_probs"][s]]
    for name in ("r.json", "r.html", "r.png"):
        assert f"wrote {tmp_path / name}" in err


def test_attribute_prints_the_logit_difference_and_an_equal_sum(
    run_dir, run, minigpt_cli, tmp_path
):
    args = ["--prompt", PROMPT, "--answer", "x", "--versus", "y"]
    code, out, err = minigpt_cli("attribute", run_dir, *args, *outputs(tmp_path))
    assert code == 0, err
    data = strict(tmp_path / "r.json")
    assert data == attribute_run(run, PROMPT, "x", "y").to_dict()
    assert data["total"] == pytest.approx(data["logit_diff"], abs=1e-4)
    said = re.search(r"logit\('x'\) - logit\('y'\) at the last position 'e' = (\S+),", out)
    summed = re.search(r"sum of the terms = (\S+):", out)
    assert said and summed and said[1] == summed[1] == f"{data['logit_diff']:.4f}"
    for layer, (heads, mlp) in enumerate(zip(data["heads"], data["mlps"], strict=True)):
        assert row_numbers(out, f"L{layer}") == [round(v, 3) for v in [*heads, mlp]]
    best = data["components"][0]
    value = re.escape(f"{best['value']:+.4f}")
    assert re.search(rf"^\s+{best['name']}\s+{value}$", out, re.M)


@pytest.mark.parametrize("by", ["head", "layer-position"])
def test_patch_prints_both_differences_and_the_restored_table(
    by, run_dir, run, minigpt_cli, tmp_path
):
    args = ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "1", "--versus", "2", "--by", by]
    code, out, err = minigpt_cli(
        "patch", run_dir, *args, "--heads", "L1H0,L1H1", *outputs(tmp_path)
    )
    assert code == 0, err
    data = strict(tmp_path / "r.json")
    assert data == patch_run(run, CLEAN, CORRUPT, "1", "2", by, "L1H0,L1H1").to_dict()
    assert f"L1H0, L1H1 patched together restore {data['together_restored']:.3f}" in out
    assert (
        f"logit('1') - logit('2'): clean {data['clean_diff']:.4f}, "
        f"corrupted {data['corrupt_diff']:.4f}" in out
    )
    assert "the prompts differ at 1 position(s): 7 '1' -> '2'" in out
    for row, restored in zip(data["rows"], data["restored"], strict=True):
        assert row_numbers(out, row) == [round(v, 3) + 0.0 for v in restored]


def test_a_table_too_wide_for_the_terminal_is_shaded_not_cut(run):
    """Numbers for every position of a longer prompt do not fit a narrow terminal: the
    grid is shaded instead, no cell cut short, every row named."""
    lens, position = lens_run(run, "abcdefghijklmnop", 5, -1)
    text = io.StringIO()
    lens_render.print_grid(lens_render.lens_grid(lens, position), Console(file=text, width=80))
    lines = text.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in text.getvalue()
    for stream in lens.streams:
        assert any(line.lstrip().startswith(f"{stream} ") for line in lines)


# --------------------------------------------------------------------------- the files


class Page(HTMLParser):
    """The tags, links and text of an HTML page, as a browser reads them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.links, self.text, self.titles, self.heads = set(), [], [], [], []
        self._in_th = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        self.titles += [attrs["title"]] if "title" in attrs else []
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        self._in_th = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_th:
            self.heads.append(data)


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table"}
PAGE_TAGS |= {"caption", "thead", "tbody", "tr", "th", "td", "ol", "li"}


@pytest.mark.parametrize(
    ("command", "args", "shown"),
    [
        ("lens", ["--prompt", PROMPT], list(PROMPT[:-1])),
        ("attribute", ["--prompt", PROMPT, "--answer", '"', "--versus", "<"], ["logit('\"') - logit('<')"]),
        (
            "patch",
            ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "&", "--versus", "<", "--by", "layer-position"],
            list(CLEAN),
        ),
    ],
)  # fmt: skip
def test_html_is_self_contained_and_escapes_every_token(
    command, args, shown, run_dir, minigpt_cli, tmp_path
):
    code, _, err = minigpt_cli(command, run_dir, *args, *outputs(tmp_path))
    assert code == 0, err
    text = (tmp_path / "r.html").read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    page = Page(text)
    assert page.tags <= PAGE_TAGS, page.tags - PAGE_TAGS  # a raw '<b' would open a tag
    assert page.links == []
    if command == "attribute":
        assert shown[0] in "".join(page.text) and shown[0] not in text
    else:
        assert not any(f"<th>{raw}</th>" in text for raw in '<&"')
        assert page.heads[: len(shown)] == shown  # the column headers, then the rows
    if command == "lens":  # a raw '"' would end the title attribute early
        assert all(t.startswith("after ") and "; top: '" in t for t in page.titles)
        assert any("at 5 '\"': next 'd'" in t for t in page.titles)
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_png_labels_are_text_even_with_dollar_signs(tmp_path):
    """GPT-2 has tokens such as '$$': matplotlib must not read them as math."""
    grid = lens_render.Grid(
        title="logit('$$') - logit('$_$'): runs/$$",
        rows=["L0"],
        columns=["$$", "$_$", "\\$"],
        values=[[0.5, -0.25, 0.0]],
        caption="of logit('$$')",
        diverging=True,
    )
    lens_render.save_png(tmp_path / "r.png", grid)
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- bad input

LONG = "a" * (BLOCK_SIZE + 1)
PATCH = ["--clean", "abc", "--corrupt", "abd", "--answer", "x", "--versus", "y"]

BAD = {
    "--answer of two tokens": (
        ["attribute", "--prompt", "abc", "--answer", "xy"],
        "--answer 'xy' is 2 tokens ('x', 'y')",
    ),
    "--versus of two tokens": (
        ["attribute", "--prompt", "abc", "--answer", "x", "--versus", "yz"],
        "--versus 'yz' is 2 tokens",
    ),
    "patch --answer of two tokens": (
        ["patch", *PATCH[:5], "xy", *PATCH[6:]],
        "--answer 'xy' is 2 tokens",
    ),
    "an empty --answer": (["attribute", "--prompt", "abc", "--answer", ""], "is no token"),
    "an empty --prompt": (["lens", "--prompt", ""], "--prompt is empty"),
    "no prompt at all": (["attribute", "--answer", "x"], "--prompt is empty"),
    "an empty --clean": (["patch", "--clean", "", *PATCH[2:]], "the --clean prompt is empty"),
    "a prompt longer than the context": (
        ["lens", "--prompt", LONG],
        f"{BLOCK_SIZE + 1} tokens, more than the model's context of {BLOCK_SIZE}",
    ),
    "a --corrupt longer than the context": (
        ["patch", "--clean", LONG[:-1], "--corrupt", LONG, *PATCH[4:]],
        "the --corrupt prompt is 33 tokens",
    ),
    "prompts of different lengths": (
        ["patch", "--clean", "abc", "--corrupt", "abcd", *PATCH[4:]],
        "the clean prompt is 3 tokens and the corrupted one 4",
    ),
    "--by nonsense": (["patch", *PATCH, "--by", "nonsense"], "--by must be one of head, layer-position"),
    "--position past the end": (["lens", "--prompt", "abc", "--position", "3"], "--position 3 is out of range"),
    "--position before the start": (["lens", "--prompt", "abc", "--position", "-4"], "--position -4 is out of range"),
    "--top 0": (["lens", "--prompt", "abc", "--top", "0"], "--top 0 is out of range"),
    "--prompt and --prompt-file": (
        ["lens", "--prompt", "abc", "--prompt-file", "{tmp}/prompt.txt"],
        "--prompt and --prompt-file were both given",
    ),
    "attribute --prompt and --prompt-file": (
        ["attribute", "--prompt", "abc", "--prompt-file", "{tmp}/prompt.txt", "--answer", "x"],
        "--prompt and --prompt-file were both given",
    ),
    "--heads naming no head": (["patch", *PATCH, "--heads", "L1H0,foo"], "'foo' is not a head name"),
    "--heads outside the model": (["patch", *PATCH, "--heads", "L2H0"], "L2H0 is not in this model"),
    "clean == corrupt": (
        ["patch", "--clean", "abc", "--corrupt", "abc", *PATCH[4:]],
        "nothing for a patch to restore",
    ),
    "a character the tokenizer never saw": (["lens", "--prompt", "ab€"], "never saw: '€'"),
}  # fmt: skip


def refused(code: int, err: str) -> None:
    """Exit 2, one `error:` line and one `hint:` line, no traceback."""
    lines = err.splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert sum(line.startswith("hint: ") for line in lines) == 1, err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_a_hint(case, run_dir, minigpt_cli, tmp_path):
    (tmp_path / "prompt.txt").write_text("abc")
    args, message = BAD[case]
    command, *rest = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    code, out, err = minigpt_cli(command, run_dir, *rest, *outputs(tmp_path))
    refused(code, err)
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.txt"]


def test_a_missing_run_directory_is_refused(tmp_path, minigpt_cli):
    code, _, err = minigpt_cli("lens", tmp_path / "nope", "--prompt", "abc", *outputs(tmp_path))
    refused(code, err)
    assert f"run directory {tmp_path / 'nope'} does not exist" in err
    assert list(tmp_path.iterdir()) == []


COMMANDS = {
    "lens": ["--prompt", "abc"],
    "attribute": ["--prompt", "abc", "--answer", "x"],
    "patch": PATCH,
}


@pytest.mark.parametrize("option", ["--json", "--html", "--png"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_that_cannot_be_written_fails_before_the_model_loads(
    command, option, tmp_path, minigpt_cli
):
    """The run directory does not exist either: the output path is what is named."""
    (tmp_path / "a-file").write_text("")
    where = tmp_path / "a-file" / "out"
    code, _, err = minigpt_cli(command, tmp_path / "no-run", *COMMANDS[command], option, where)
    refused(code, err)
    assert f"cannot write {where}" in err and "no-run" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_in_a_read_only_folder_is_refused(run_dir, tmp_path, minigpt_cli):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    try:
        code, _, err = minigpt_cli("lens", run_dir, "--prompt", "abc", "--json", folder / "r.json")
        refused(code, err)
        assert f"cannot write {folder / 'r.json'}" in err
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- --help

HELP = {
    "lens": ["--prompt", "--prompt-file", "--top", "--position"],
    "attribute": ["--prompt", "--prompt-file", "--answer", "--versus"],
    "patch": ["--clean", "--corrupt", "--answer", "--versus", "--by", "--heads"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_lists_every_option(command):
    from typer.testing import CliRunner

    from minigpt.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in [*HELP[command], "--html", "--png", "--json", "--device"]:
        assert re.search(rf"(?<![\w-]){option}(?![\w-])", result.output), option


def test_the_heads_page_names_these_commands(run_dir, minigpt_cli, tmp_path):
    code, _, err = minigpt_cli(
        "inspect-heads", run_dir, "--no-importance", "--html", tmp_path / "h.html"
    )
    assert code == 0, err
    page = Page((tmp_path / "h.html").read_text())
    text = " ".join(page.text)
    for command in ("minigpt lens RUN --prompt", "minigpt attribute RUN", "minigpt patch RUN"):
        assert command in text
    assert "docs/circuits.md" in text and page.links == []
