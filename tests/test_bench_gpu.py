"""bench/gpu.py runs on the CPU in seconds (`--device cpu --quick`), so the code paths a
GPU run takes are checked here; its timings are for a GPU, never asserted."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_quick_on_the_cpu_writes_every_table(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(out),
         "--only", "decode", "kv_cache", "kernels", "training", "muon", "loss", "curve",
         "--corpus", str(REPO / "README.md")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["torch"] and result["device"]
    (training,) = result["training"]
    assert training["tokens_per_s"] > 0 and 0 < training["mfu"] < 1
    assert training["loop_tokens_per_s"] > 0 and 0 < training["loop_mfu"] < 1
    assert training["recipe_tokens_per_s"] > 0 and 0 < training["recipe_mfu"] < 1
    assert training["loop_over_recipe"] > 0 and training["best_loop_over_recipe"] > 0
    assert "| nanoGPT recipe ms/step |" in done.stdout
    combos = {(row["dtype"], row["batch"]) for row in result["decode"]}
    assert combos == {("float32", 1), ("float32", 8), ("bfloat16", 1), ("bfloat16", 8)}
    rates = ("minigpt_tok_s", "captured_tok_s", "captured_plain_tok_s", "step_us", "hf_tok_s")
    assert all(row[rate] > 0 for row in result["decode"] for rate in rates)
    assert result["kv_cache"]["speedup"] > 0
    assert "| decode |" in done.stdout
    kernels = result["kernels"]
    assert all(kernels[dtype] and kernels[dtype][0]["us"] > 0 for dtype in ("float32", "bfloat16"))
    adamw, muon = result["muon"]  # the speedrun config's block, each optimizer's step
    assert (adamw["optimizer"], muon["optimizer"]) == ("adamw", "muon")
    assert adamw["step_ms"] > 0 and muon["step_ms"] > 0 and math.isfinite(muon["loss"])
    assert "| optimizer | shape |" in done.stdout
    full, chunked = result["loss"]["rows"]  # bench/loss.py: the same loss either way
    assert full["loss_chunk"] == 0 and chunked["loss_chunk"] > 0
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert full["peak_mib"] > 0 and chunked["step_ms"] > 0
    curve = result["curve"]  # both loops learn README.md's characters: the val loss falls
    assert curve["steps"] == [20, 40]
    for losses in (curve["minigpt_val"], curve["recipe_val"]):
        assert losses[-1] < losses[0] < math.log(len(set((REPO / "README.md").read_text())))
    assert "| step | `minigpt train` | nanoGPT recipe |" in done.stdout


@pytest.fixture(scope="module")
def gpu_bench():
    """bench/gpu.py as a module (the bench folder is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_section_or_cell_costs_only_itself(gpu_bench, tmp_path, monkeypatch, capsys):
    """A GPU run is one shot: a section that raises is recorded as its error, a failing
    cell of a table as that cell's, and the other sections and cells are still measured
    and written to the JSON."""
    gpu = gpu_bench

    def broken(*args, **kwargs):
        raise RuntimeError("no capture today")

    monkeypatch.setattr(gpu, "kv_against_recompute", broken)
    monkeypatch.setattr(gpu, "captured_step_us", broken)
    out = tmp_path / "gpu.json"
    argv = [*"gpu.py --device cpu --quick --only kv_cache decode --out".split(), str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    gpu.main()
    result = json.loads(out.read_text())
    assert result["kv_cache"] == {"error": "RuntimeError: no capture today"}
    assert "training" not in result and "kernels" not in result  # only the sections asked for
    for row in result["decode"]:
        assert row["step_us_error"] == "RuntimeError: no capture today"
        assert row["minigpt_tok_s"] > 0 and row["captured_tok_s"] > 0
    printed = capsys.readouterr().out
    assert "kv_cache: failed: RuntimeError: no capture today" in printed
    assert "  step_us_error: RuntimeError: no capture today" in printed


@pytest.mark.parametrize("bias", [False, True])
def test_the_nanogpt_recipe_computes_minigpts_loss_on_the_same_weights(gpu_bench, bias):
    """The peer times the same work: its model, given minigpt's weights, gives the same
    loss and the same gradients (so a speed difference is never a different model)."""
    recipe = gpu_bench._bench_module("nanogpt_recipe")
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=bias)
    torch.manual_seed(0)
    ours, theirs = GPT(config), recipe.RecipeGPT(config)
    names = {"tok_emb": "wte", "pos_emb": "wpe", "blocks": "h", "ln_attn": "ln_1",
             "attn.qkv": "attn.c_attn", "attn.out_proj": "attn.c_proj", "ln_mlp": "ln_2",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}  # fmt: skip
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new)
        state[key] = value
    theirs.load_state_dict(state)  # strict: every weight has its counterpart
    x, y = torch.randint(65, (3, 16)), torch.randint(65, (3, 16))
    _, loss = ours(x, y)
    _, recipe_loss = theirs(x, y)
    torch.testing.assert_close(recipe_loss, loss)
    loss.backward()
    recipe_loss.backward()
    torch.testing.assert_close(theirs.h[1].mlp.c_fc.weight.grad, ours.blocks[1].mlp.fc.weight.grad)
    torch.testing.assert_close(theirs.wte.weight.grad, ours.tok_emb.weight.grad)


SHAPE_ONLY_OPS = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "arange", "t",
                  "transpose", "permute", "expand", "squeeze", "unsqueeze", "slice", "select",
                  "alias", "detach"}  # fmt: skip
"""Ops that only re-describe a tensor's shape: the two models may spell these differently."""


def compiled_step_ops(model, x, y) -> dict[str, collections.Counter]:
    """The aten ops of a compiled training step's forward and backward graphs (what
    inductor fuses into kernels), counted by name, shape-only ops left out."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = {}

    def record(part):
        def compiler(graph, inputs):
            graphs[part] = graph
            return make_boxed_func(graph.forward)

        return compiler

    def backend(graph, inputs):
        return aot_module_simplified(graph, inputs, fw_compiler=record("forward"),
                                     bw_compiler=record("backward"))  # fmt: skip

    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU
        _, loss = torch.compile(model, backend=backend, dynamic=False)(x, y)
    loss.backward()
    torch._dynamo.reset()
    counts = {}
    for part, graph in graphs.items():
        names = (str(node.target).split(".")[1] for node in graph.graph.nodes
                 if node.op == "call_function" and str(node.target).startswith("aten."))  # fmt: skip
        counts[part] = collections.Counter(name for name in names if name not in SHAPE_ONLY_OPS)
    return counts


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_compiled_training_step_does_nanogpts_work_op_for_op(gpu_bench, dropout):
    """A GPU gap to nanoGPT's training speed is not in the model: compiled with bf16 autocast,
    minigpt's forward and backward are the recipe's aten ops, matmul for matmul and
    elementwise op for elementwise op (an extra copy or cast would show here first)."""
    recipe = gpu_bench._bench_module("nanogpt_recipe")
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False,
                       dropout=dropout)  # fmt: skip
    x, y = torch.randint(65, (2, 32)), torch.randint(65, (2, 32))
    ours = compiled_step_ops(GPT(config), x, y)
    theirs = compiled_step_ops(recipe.RecipeGPT(config), x, y)
    assert set(ours) == {"forward", "backward"}
    assert (
        ours["forward"]["mm"] + ours["forward"]["addmm"] >= 2 * 4 + 1
    )  # 4 Linears a layer, the head
    assert ours == theirs


def test_a_failing_bare_step_leaves_the_loop_rows_of_the_training_table(gpu_bench, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """The bare step gives the FLOPs per token that MFU needs: when it fails, the loops'
    tokens/s are still recorded (without an MFU), not the whole section lost."""

    def broken(*args, **kwargs):
        raise RuntimeError("no compile today")

    monkeypatch.setattr(gpu_bench, "train_rate", broken)
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(
        sys, "argv", [*"gpu.py --device cpu --quick --only training --out".split(), str(out)]
    )
    gpu_bench.main()
    (row,) = json.loads(out.read_text())["training"]
    assert row["bare_error"] == "RuntimeError: no compile today"
    assert row["loop_tokens_per_s"] > 0 and row["recipe_tokens_per_s"] > 0
    assert "loop_mfu" not in row
