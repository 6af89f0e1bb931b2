"""Head metrics on hand-made attention matrices, roles, importance, and the renderers."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

from minigpt import heads, heads_run, render
from minigpt.checkpoint import write_run_files
from minigpt.errors import MinigptError


def causal_uniform(T: int) -> torch.Tensor:
    """Row i attends equally to keys 0..i."""
    A = torch.tril(torch.ones(T, T))
    return A / A.sum(-1, keepdim=True)


def sub_diagonal(T: int) -> torch.Tensor:
    """Every query i >= 1 attends only to i - 1; query 0 to itself."""
    A = torch.zeros(T, T)
    A[0, 0] = 1.0
    A[torch.arange(1, T), torch.arange(0, T - 1)] = 1.0
    return A


def offset_pattern(n: int, shift: int) -> torch.Tensor:
    """On a 2n probe: rows of the second copy attend to i - n + shift; the rest to themselves."""
    T = 2 * n
    A = torch.eye(T)
    for i in range(n, T):
        A[i] = 0.0
        A[i, i - n + shift] = 1.0
    return A


# ---------------------------------------------------------------------------- metrics


def test_previous_token_head_scores_one():
    A = sub_diagonal(10)
    assert heads.previous_token_score(A).item() == pytest.approx(1.0)
    assert heads.mean_attention_distance(A).item() == pytest.approx(0.9)  # row 0 has distance 0
    assert heads.confidence(A).item() == pytest.approx(1.0)
    assert heads.entropy(A).item() == pytest.approx(0.0)


def test_uniform_causal_has_normalised_entropy_one():
    T = 12
    A = causal_uniform(T)
    assert heads.normalised_entropy(A).item() == pytest.approx(1.0, abs=1e-6)
    expected = sum(math.log(i + 1) for i in range(T)) / T
    assert heads.entropy(A).item() == pytest.approx(expected, rel=1e-5)
    assert heads.previous_token_score(A).item() == pytest.approx(
        sum(1 / (i + 1) for i in range(1, T)) / (T - 1)
    )
    # sum_j (i - j) / (i + 1) = i / 2
    assert heads.mean_attention_distance(A).item() == pytest.approx(
        sum(i / 2 for i in range(T)) / T
    )


def test_induction_and_duplicate_scores():
    n = 6
    induction = offset_pattern(n, 1)
    duplicate = offset_pattern(n, 0)
    assert heads.induction_score(induction, n).item() == pytest.approx(1.0)
    assert heads.duplicate_token_score(induction, n).item() == pytest.approx(0.0)
    assert heads.duplicate_token_score(duplicate, n).item() == pytest.approx(1.0)
    assert heads.induction_score(duplicate, n).item() == pytest.approx(0.0)
    half = 0.5 * (induction + duplicate)
    assert heads.induction_score(half, n).item() == pytest.approx(0.5)


def test_first_token_sink():
    T = 8
    A = torch.zeros(T, T)
    A[:, 0] = 1.0
    assert heads.first_token_score(A).item() == pytest.approx(1.0)
    assert heads.first_token_score(torch.eye(T)).item() == pytest.approx(1 / T)


def test_metrics_batch_over_leading_dims():
    A = torch.stack([sub_diagonal(8), causal_uniform(8)])[None]  # (1, 2, T, T)
    scores = heads.previous_token_score(A)
    assert scores.shape == (1, 2)
    assert scores[0, 0].item() == pytest.approx(1.0)


def test_js_divergence():
    A, B = sub_diagonal(9), torch.eye(9)
    assert heads.js_divergence(A, A).item() == pytest.approx(0.0, abs=1e-7)
    # disjoint one-hot rows are 1 bit apart; row 0 is the same in both
    assert heads.js_divergence(A, B).item() == pytest.approx(8 / 9, rel=1e-5)
    sim = heads.head_similarity(torch.stack([A, B, A.clone()]))
    assert sim.shape == (3, 3)
    assert sim[0, 2].item() == pytest.approx(0.0, abs=1e-7)
    assert sim[0, 1].item() == pytest.approx(sim[1, 0].item())


def test_probe_too_short_is_refused():
    with pytest.raises(ValueError, match="needs at least"):
        heads.induction_score(torch.eye(5), 3)


# ---------------------------------------------------------------------------- roles


@pytest.mark.parametrize(
    ("metrics", "role"),
    [
        ({"induction": 0.9, "previous_token": 0.6}, "induction"),
        ({"induction": 0.1, "previous_token": 0.6}, "previous-token"),
        ({"previous_token": 0.2, "duplicate_token": 0.7}, "duplicate-token"),
        ({"previous_token": 0.2, "first_token": 0.8}, "first-token"),
        (
            {"previous_token": 0.2, "first_token": 0.1, "norm_entropy": 0.9, "mean_distance": 1.0},
            "broad",
        ),
        (
            {"previous_token": 0.2, "first_token": 0.1, "norm_entropy": 0.3, "mean_distance": 1.0},
            "local",
        ),
        (
            {"previous_token": 0.2, "first_token": 0.1, "norm_entropy": 0.3, "mean_distance": 9.0},
            "mixed",
        ),
        ({"previous_token": float("nan"), "first_token": 1.0}, "first-token"),
    ],
)
def test_roles(metrics, role):
    assert heads.assign_role(metrics) == role


def test_thresholds_are_described():
    text = heads.ROLE_THRESHOLDS.describe()
    for role in heads.ROLES:
        assert role in text


# ---------------------------------------------------------------------------- with a model


def test_repeated_probe(tiny):
    _, tokenizer = tiny
    probes = heads.repeated_probe(tokenizer, 7, count=5, seed=3)
    assert probes.shape == (5, 14)
    assert torch.equal(probes[:, :7], probes[:, 7:])
    assert torch.equal(probes, heads.repeated_probe(tokenizer, 7, count=5, seed=3))
    assert not torch.equal(probes, heads.repeated_probe(tokenizer, 7, count=5, seed=4))
    newline = tokenizer.encode("\n")[0]  # the char tokenizer's document separator
    assert tokenizer.separator_id == newline
    assert not (heads.repeated_probe(tokenizer, 50, count=20) == newline).any()
    # distinct within each half when the vocabulary allows (27 tokens besides "\n")
    for n in (7, 27):
        for half in heads.repeated_probe(tokenizer, n, count=20, seed=1)[:, :n]:
            assert len(set(half.tolist())) == n
    # a longer half than the vocabulary must repeat tokens, and still uses all of them
    long_halves = heads.repeated_probe(tokenizer, 50, count=20)[:, :50]
    assert set(long_halves.flatten().tolist()) == set(range(tokenizer.vocab_size)) - {newline}


def test_ablation_importance_matches_head_gates(tiny):
    """The layer-prefix shortcut gives exactly what zeroing through model.forward gives."""
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 28, (3, 16), generator=g), torch.randint(0, 28, (3, 16), generator=g))
    ]
    rise, base = heads.ablation_importance(model, batches)
    x, y = batches[0]
    with torch.no_grad():
        _, base_loss = model(x, y)
        assert base == pytest.approx(base_loss.item(), rel=1e-5)
        for layer, head in [(0, 0), (1, 2)]:
            gates = torch.ones(2, 3)
            gates[layer, head] = 0.0
            _, loss = model(x, y, head_gates=gates)
            assert rise[layer, head].item() == pytest.approx(
                loss.item() - base_loss.item(), abs=1e-5
            )


def test_gradient_importance_matches_per_example_grads(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 28, (2, 10), generator=g), torch.randint(0, 28, (2, 10), generator=g)
    proxy = heads.gradient_importance(model, [(x, y)])
    expected = torch.zeros(2, 3)
    for b in range(2):
        gates = torch.ones(2, 3, requires_grad=True)
        _, loss = model(x[b : b + 1], y[b : b + 1], head_gates=gates)
        loss.backward()
        expected += gates.grad.abs() / 2
    assert torch.allclose(proxy, expected, atol=1e-5)


def test_metrics_are_means_over_all_sequences(tiny):
    model, tokenizer = tiny
    seqs = list(heads.repeated_probe(tokenizer, 5, count=3, seed=0))
    together = heads.inspect_heads(model, tokenizer, seqs, repeated=5)
    one_by_one = [heads.inspect_heads(model, tokenizer, [s], repeated=5) for s in seqs]
    for k, h in enumerate(together.heads):
        mean = sum(o.heads[k].induction for o in one_by_one) / 3
        assert h.induction == pytest.approx(mean, abs=1e-6)
        assert h.induction != pytest.approx(one_by_one[0].heads[k].induction, abs=1e-9)
    # prompts of different lengths are averaged too
    mixed = heads.inspect_heads(model, tokenizer, [seqs[0][:4], seqs[1]])
    first = heads.inspect_heads(model, tokenizer, [seqs[0][:4]])
    second = heads.inspect_heads(model, tokenizer, [seqs[1]])
    assert mixed.heads[0].entropy == pytest.approx(
        (first.heads[0].entropy + second.heads[0].entropy) / 2
    )


# ---------------------------------------------------------------------------- renderers and CLI


@pytest.fixture(scope="module")
def inspection(tiny):
    model, tokenizer = tiny
    seqs = list(heads.repeated_probe(tokenizer, 8, count=2))
    batches = heads_run.prompt_batches(seqs)
    return heads.inspect_heads(
        model, tokenizer, seqs, repeated=8, importance_batches=batches, importance_source="probe"
    )


def test_json_and_html(tmp_path, inspection):
    render.save_json(tmp_path / "h.json", inspection)
    data = json.loads((tmp_path / "h.json").read_text())
    assert len(data["heads"]) == 6 and data["repeated"] == 8
    assert len(data["attention_first_sequence"][1][2]) == 16
    render.save_html(tmp_path / "h.html", inspection)
    page = (tmp_path / "h.html").read_text()
    assert "<script>" in page and "L1H2" in page
    assert not re.search(r"(src|href)=[\"']?https?:", page)  # nothing fetched from the network
    decoded = render.quantised_attention(inspection)
    import base64

    assert len(base64.b64decode(decoded)) == 6 * 16 * 17 // 2


@pytest.fixture
def damaged(inspection):
    """The inspection as NaN weights leave it: NaN metrics, similarity and attention."""
    bad = copy.deepcopy(inspection)
    bad.heads[0].entropy = float("nan")
    bad.heads[1].importance = float("inf")
    bad.heads[2].nearest_js = float("nan")
    bad.similarity[0, 1] = float("nan")
    bad.attention[1, 2, 5, :3] = float("nan")
    bad.base_loss = float("nan")
    return bad


def no_constants(name):
    raise AssertionError(f"{name} is not JSON")


def test_json_is_strict_even_with_nan_metrics(tmp_path, damaged):
    render.save_json(tmp_path / "h.json", damaged)
    data = json.loads((tmp_path / "h.json").read_text(), parse_constant=no_constants)
    assert data["heads"][0]["entropy"] is None and data["heads"][1]["importance"] is None
    assert data["base_loss"] is None and data["similarity_js_bits"][0][1] is None
    assert data["attention_first_sequence"][1][2][5][:3] == [None] * 3
    assert data["heads"][0]["previous_token"] == pytest.approx(damaged.heads[0].previous_token)
    # nested tensors, numpy values and tuples too
    text = render.strict_json({"t": torch.tensor([1.0, math.nan]), "n": [(math.inf, 2)]})
    assert json.loads(text, parse_constant=no_constants) == {"t": [1.0, None], "n": [[None, 2]]}


def test_html_and_heatmap_survive_nan_attention(tmp_path, damaged):
    from rich.console import Console

    render.save_html(tmp_path / "h.html", damaged)
    assert "NaN" not in (tmp_path / "h.html").read_text()
    console = Console(record=True, width=140)
    render.print_heatmap(console, damaged, 1, 2)
    render.print_table(console, damaged)
    assert "L1H2" in console.export_text()


def script_payload(page: str) -> str:
    return page.split("const D = ", 1)[1].split(";\nconst T = ", 1)[0]


def test_html_payload_cannot_end_or_hijack_the_script(inspection):
    hostile = ["<!--<script>", "</script>", "a&b>c", "\u2028\u2029", "</SCRIPT >"]
    labelled = copy.deepcopy(inspection)
    labelled.tokens[: len(hostile)] = hostile
    labelled.notes = ["a note that says __DATA__ and __TITLE__ <b>"]
    page = render.html_document(labelled)
    payload = script_payload(page)
    assert not set("<>&\u2028\u2029") & set(payload)
    assert json.loads(payload)["tokens"][: len(hostile)] == hostile  # the labels round-trip
    assert page.count("<script") == 1 and page.lower().count("</script") == 1
    assert "<!--" not in page
    # placeholders are filled in one pass: a note's text is not replaced by the data
    assert page.count("const D = ") == 1
    assert "<li>a note that says __DATA__ and __TITLE__ &lt;b&gt;</li>" in page


def test_png_and_terminal(tmp_path, inspection):
    from rich.console import Console

    render.save_png(tmp_path / "h.png", inspection)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    console = Console(record=True, width=140)
    render.print_table(console, inspection)
    render.print_heatmap(console, inspection, 1, 2, max_tokens=10)
    text = console.export_text()
    assert "L1H2" in text and "showing the first 10 of 16 tokens" in text


def test_unwritable_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write"):
        render.check_writable(blocker / "out.html")
    with pytest.raises(ValueError, match="directory"):
        render.check_writable(tmp_path)


def test_an_empty_output_name_is_refused_naming_the_option():
    with pytest.raises(MinigptError, match="html_file needs a file name") as caught:
        render.check_writable("", "html_file")
    assert caught.value.param == "html_file" and caught.value.hint
    from minigpt.cli import OPTION_NAMES

    names = {**OPTION_NAMES, "html_file": "--html"}
    assert caught.value.renamed(names)[0] == "--html needs a file name, got an empty one"
    with pytest.raises(MinigptError, match="the output file needs a file name"):
        render.check_writable("")


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    model, tokenizer = tiny
    return write_run_files(tmp_path_factory.mktemp("run"), model, tokenizer)


def test_cli_end_to_end(run_dir, tmp_path, run_minigpt):
    outputs = ["--json", tmp_path / "h.json", "--html", tmp_path / "h.html"]
    outputs += ["--png", tmp_path / "h.png"]
    out = run_minigpt(
        "inspect-heads", run_dir, "--repeated", 8, "--layer", 1, "--head", 0, *outputs
    )
    assert out.returncode == 0, out.stderr
    assert "L1H0" in out.stdout and "ind" in out.stdout and "nearest" in out.stdout
    assert "validation data was not found" in out.stderr
    for name in ("h.json", "h.html", "h.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "2", "--head", "0"], "layer 2 is out of range"),
        (["--layer", "0", "--head", "3"], "head 3 is out of range"),
        (["--prompt", ""], "empty"),
        (["--repeated", "40"], "from 2 to 16"),
        (["--json", "/proc/nope/h.json"], "cannot write"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
        (["--head", "1"], "--head needs --layer"),
        (["--prompt", "abc", "--repeated", "4"], "not both"),
        (["--layer", "-1"], "layer -1 is out of range"),
        (["--layer", "0", "--head", "-1"], "head -1 is out of range"),
        (["--repeated", "-3"], "from 2 to 16"),
        (["--html", ""], "--html needs a file name"),
        (["--png", ""], "--png needs a file name"),
    ],
)
def test_cli_bad_input(run_dir, args, message, minigpt_cli):
    """In-process through `cli.main` (what the `minigpt` script runs): exit 2, one clear line."""
    code, _, err = minigpt_cli("inspect-heads", run_dir, "--no-importance", *args)
    assert code == 2
    assert message in err and "Traceback" not in err


# A few lines of fake DOM, enough to run the viewer's script under node: it must
# build its controls, select heads, and answer hovers without a runtime error.
_DOM_STUB = r"""
function el(tag) {
  const e = { tag, style: {}, children: [], attrs: {}, className: "", textContent: "", innerHTML: "",
    classList: { toggle() {} }, options: [], rows: [], cells: [], width: 320, height: 320,
    add(o) { this.options.push(o); }, setAttribute(k, v) { this.attrs[k] = v; },
    appendChild(c) { this.children.push(c); return c; },
    querySelectorAll() { return this.children; },
    insertRow() { const r = el("tr"); r.insertCell = () => { const c = el("td"); r.cells.push(c); return c; }; this.rows.push(r); return r; },
    getContext() { return { createImageData: (w, h) => ({ data: new Uint8ClampedArray(w * h * 4) }), putImageData() {}, drawImage() {}, clearRect() {} }; },
    getBoundingClientRect() { return { top: 0, left: 0, width: 320, height: 320 }; },
  };
  if (tag === "metrics") { e.tHead = el("thead"); e.tBodies = [el("tbody")]; }
  return e;
}
const ids = {};
global.document = { getElementById: id => ids[id] || (ids[id] = el(id)), createElement: el, createElementNS: (ns, t) => el(t) };
global.Option = function (t, v) { this.text = t; this.value = v; };
global.atob = s => Buffer.from(s, "base64").toString("binary");
const fs = require("fs");
const html = fs.readFileSync(process.argv[2], "utf8");
const js = html.slice(html.indexOf("<script>") + 8, html.indexOf("</script>"));
eval(js + `
select(D.heads.length - 1); show(5); show(-1);
ids["heat"].onmousemove({ target: ids["heat"], clientX: 100, clientY: 200 });
ids["tokens"].children[3].onmouseenter();
ids["metrics"].tBodies[0].rows[2].onclick();
ids["layer"].value = 1; ids["head"].value = 0; ids["layer"].onchange();
console.log("ok", D.heads.length, "heads", T, "tokens; cur", cur, "readout:", ids["readout"].textContent);
console.log("span bg", ids["tokens"].children[2].style.background, ids["tokens"].children[3].title);`);
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_html_viewer_script_runs(tmp_path, inspection):
    render.save_html(tmp_path / "h.html", inspection)
    (tmp_path / "stub.js").write_text(_DOM_STUB)
    out = subprocess.run(
        ["node", str(tmp_path / "stub.js"), str(tmp_path / "h.html")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 6 heads 16 tokens; cur 3")  # layer 1, head 0 of 3 heads


def test_help_shows_the_role_thresholds():
    from typer.testing import CliRunner

    from minigpt.cli import app

    result = CliRunner().invoke(app, ["inspect-heads", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    t = heads.ROLE_THRESHOLDS
    for rule in (
        f"induction >= {t.induction}",
        f"previous-token >= {t.previous_token}",
        f"duplicate-token >= {t.duplicate_token}",
        f"first-token >= {t.first_token}",
        f"normalised entropy >= {t.broad_entropy}",
        f"distance <= {t.local_distance}",
    ):
        assert rule in result.output
