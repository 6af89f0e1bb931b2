"""bench/gpu.py runs on the CPU in seconds (`--device cpu --quick`), so the code paths a
GPU run takes are checked here; its timings are for a GPU, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_quick_on_the_cpu_writes_every_table(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["torch"] and result["device"]
    (training,) = result["training"]
    assert training["tokens_per_s"] > 0 and 0 < training["mfu"] < 1
    assert training["loop_tokens_per_s"] > 0 and 0 < training["loop_mfu"] < 1
    combos = {(row["dtype"], row["batch"]) for row in result["decode"]}
    assert combos == {("float32", 1), ("float32", 8), ("bfloat16", 1), ("bfloat16", 8)}
    rates = ("minigpt_tok_s", "captured_tok_s", "hf_tok_s")
    assert all(row[rate] > 0 for row in result["decode"] for rate in rates)
    assert result["kv_cache"]["speedup"] > 0
    assert "| decode |" in done.stdout
    kernels = result["kernels"]
    assert all(kernels[dtype] and kernels[dtype][0]["us"] > 0 for dtype in ("float32", "bfloat16"))
