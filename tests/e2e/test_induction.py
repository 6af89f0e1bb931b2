"""Acceptance: a real 2-layer model, trained here through the command line.

`minigpt train configs/induction.toml` on the built-in `induction` data (lines of
a random segment of distinct symbols written three times, generated, not
downloaded), then `minigpt inspect-heads RUN --repeated 32 --json ...`. The run is
trained once per session (module fixture) in a temporary folder.

What it checks (docs/induction.md has the measurements):
  - a layer-1 induction head: induction score A[i, i-n+1] >= 0.35, labelled
    `induction`; zeroing it raises the loss on repeated sequences, it copies on its
    own when the other inducting heads are zeroed, and zeroing all of them removes
    the copying;
  - a layer-0 head that feeds it: the head that looks back most is the one whose
    removal hurts most, and removing it stops the copying;
  - that layer-0 head's previous-token score >= 0.3, labelled `previous-token`;
  - beyond heads (`minigpt lens`, `attribute`, `patch`, docs/circuits.md) on a segment
    written twice and begun a third time: the logit lens knows the next symbol of a
    copy only after layer 1; direct logit attribution ranks the layer-1 inducting heads
    above every other head; patching them together from the clean prompt into one
    whose earlier copies carry another symbol restores most of the logit difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from minigpt import heads
from minigpt.checkpoint import load_run

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "induction.toml"
N = 32  # probe half-length, as in docs/heads.md's command
INDUCTING = 0.2  # a layer-1 head that puts this much on A[i, i-n+1] takes part in copying


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_minigpt):
    """Train with the shipped config, inspect with the CLI; (folder, report, stdout)."""
    folder = tmp_path_factory.mktemp("induction")
    unbuffered = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = run_minigpt("train", CONFIG, "--out", "run", cwd=folder, env=unbuffered, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    inspect = ["inspect-heads", "run", "--repeated", N, "--json", "heads.json"]
    out = run_minigpt(*inspect, cwd=folder, env=unbuffered, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((folder / "heads.json").read_text())
    return folder, report, out.stdout


def layer(report: dict, index: int) -> list[dict]:
    return [h for h in report["heads"] if h["layer"] == index]


def probe_losses(run, gates=None) -> tuple[float, float]:
    """Mean loss on the first and on the second copy of fresh [r, r] probes."""
    probes = heads.repeated_probe(run.tokenizer, N, count=16, seed=123)  # (16, 2N)
    x, y = probes[:, :-1], probes[:, 1:]
    with torch.no_grad():
        logits, _ = run.model(x, head_gates=gates)
    loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), y, reduction="none"
    )  # (16, 2N-1)
    return loss[:, : N - 1].mean().item(), loss[:, N:].mean().item()


@pytest.mark.slow
def test_layer1_induction_head(trained):
    folder, report, stdout = trained
    assert report["importance_source"].startswith("8 validation batches")  # found val.bin
    top = max(layer(report, 1), key=lambda h: h["induction"])
    assert top["induction"] >= 0.35, stdout
    assert top["role"] == "induction", stdout

    run = load_run(folder / "run")
    first, second = probe_losses(run)
    assert second < first - 1.0, (first, second)  # the second copy is predicted from the first
    n_head = run.model.config.n_head
    _, second_without = probe_losses(run, gates_without(n_head, [top["head"]]))
    assert second_without > second, (second, second_without)  # zeroing it raises the loss
    # Layer 1 grows two or three heads that share the copying; which ones, and how they
    # split it, depends on the CPU's float rounding (docs/induction.md), so zeroing the
    # top one alone may cost little. The circuit is the set of heads that induct:
    inducting = [h["head"] for h in layer(report, 1) if h["induction"] >= INDUCTING]
    _, second_without_any = probe_losses(run, gates_without(n_head, inducting))
    assert second_without_any > first, (first, second_without_any)  # no copying left
    others = [h for h in inducting if h != top["head"]]
    top_alone_first, top_alone = probe_losses(run, gates_without(n_head, others))
    assert top_alone < top_alone_first - 1.0, (top_alone_first, top_alone)  # it copies alone


def gates_without(n_head: int, layer1_heads: list[int]) -> torch.Tensor:
    """Head gates (2, n_head) of ones, with the given layer-1 heads zeroed."""
    gates = torch.ones(2, n_head)
    gates[1, layer1_heads] = 0.0
    return gates


@pytest.mark.slow
def test_layer0_head_feeds_the_induction_head(trained):
    folder, report, stdout = trained
    looks_back = max(layer(report, 0), key=lambda h: h["previous_token"])
    assert looks_back["previous_token"] >= 0.15, stdout  # 1/64 would be uniform attention
    most_important = max(layer(report, 0), key=lambda h: h["importance"])
    assert most_important["head"] == looks_back["head"], stdout

    run = load_run(folder / "run")
    _, second = probe_losses(run)
    gates = torch.ones(2, run.model.config.n_head)
    gates[0, looks_back["head"]] = 0.0
    _, second_without = probe_losses(run, gates)
    assert second_without > second + 0.5, (second, second_without)


@pytest.mark.slow
def test_layer0_previous_token_score(trained):
    folder, report, stdout = trained
    best0 = max(layer(report, 0), key=lambda h: max(h["previous_token"], h["duplicate_token"]))
    assert max(best0["previous_token"], best0["duplicate_token"]) >= 0.3, stdout
    assert best0["role"] in ("previous-token", "duplicate-token"), stdout


SEGMENT = "k3x9qa7mbw2e"  # distinct symbols, as in the training data
CLEAN = SEGMENT * 2 + SEGMENT[:6]  # the next symbol is SEGMENT[6], '7'
CORRUPT = CLEAN.replace("7", "z")  # earlier copies say 'z' follows 'a' instead


def circuit_json(minigpt_cli, folder: Path, *args) -> dict:
    """Run `minigpt COMMAND run ... --json out.json` on the trained run; the JSON."""
    out = folder / "circuit.json"
    code, stdout, stderr = minigpt_cli(*args[:1], folder / "run", *args[1:], "--json", out)
    assert code == 0, stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_logit_lens_knows_a_copy_only_after_layer_1(trained, minigpt_cli):
    folder, _, _ = trained
    lens = circuit_json(minigpt_cli, folder, "lens", "--prompt", CLEAN)
    assert lens["streams"] == ["embed", "L0", "L1"]
    n = len(SEGMENT)
    # positions n..: the next symbol is in the second or third copy, known from the first
    after_l0, after_l1 = (sum(p[n:]) / len(p[n:]) for p in lens["next_probs"][1:])
    assert after_l0 < 0.2 < 0.8 < after_l1, (after_l0, after_l1)
    assert lens["top_tokens"][2][-1][0] == "7"  # the model's own answer, after the last block


@pytest.mark.slow
def test_attribution_ranks_the_inducting_heads_first(trained, minigpt_cli):
    folder, report, _ = trained
    result = circuit_json(
        minigpt_cli, folder, "attribute", "--prompt", CLEAN, "--answer", "7", "--versus", "z"
    )
    assert abs(result["total"] - result["logit_diff"]) < 1e-3 * abs(result["logit_diff"])
    inducting = {f"L1H{h['head']}" for h in layer(report, 1) if h["induction"] >= INDUCTING}
    heads = [c["name"] for c in result["components"] if "H" in c["name"]]
    assert set(heads[: len(inducting)]) == inducting, (heads, inducting)


@pytest.mark.slow
def test_patching_the_inducting_heads_restores_the_copy(trained, minigpt_cli):
    folder, report, _ = trained
    inducting = [f"L1H{h['head']}" for h in layer(report, 1) if h["induction"] >= INDUCTING]
    args = ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", "7", "--versus", "z"]
    result = circuit_json(minigpt_cli, folder, "patch", *args, "--heads", ",".join(inducting))
    assert result["clean_diff"] > 0 > result["corrupt_diff"]  # each prompt says its own symbol
    assert result["together_restored"] > 0.7, result["together_restored"]
    layer0_heads = result["restored"][0][:-1]  # the last column is the MLP
    assert max(map(abs, layer0_heads)) < 0.1, layer0_heads  # none of them carries the copy
    by_position = circuit_json(minigpt_cli, folder, "patch", *args, "--by", "layer-position")
    # entering layer 1, the streams at the earlier copies' '7' carry what the answer needs
    entering_l1 = by_position["restored"][1]
    top_two = sorted(range(len(CLEAN)), key=lambda t: -entering_l1[t])[:2]
    assert sorted(top_two) == [t for t, c in enumerate(CLEAN) if c == "7"], entering_l1
