"""What each modern block option changes on tiny shakespeare, in the same 180 s.

    python bench/modern.py                       # 7 runs x 180 s of training
    python bench/modern.py --max-time 5 --variants baseline all   # a smoke run

Every run is `minigpt train configs/shakespeare-char-cpu.toml` on
../shared/data/tinyshakespeare/input.txt (same data, same seed, same 180 s of
training on the clock, evaluation included) with one `[model]` option on top of
GPT-2's block, then all of them together, and any config given with --config
(configs/modern-cpu.toml, the combination chosen from this table). Runs go one
after another: each has the machine to itself.

Prints a markdown table (best val loss, steps reached, parameters) and writes
bench/results/modern.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import torch

from minigpt.checkpoint import read_metrics
from minigpt.model import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare-char-cpu.toml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
VARIANTS = {
    "baseline": [],
    "rope": ["model.position=rope"],
    "rmsnorm": ["model.norm=rmsnorm"],
    "swiglu": ["model.mlp=swiglu"],
    "gqa (n_kv_head=2)": ["model.n_kv_head=2"],
    "qk_norm": ["model.qk_norm=true"],
    "all": [
        "model.position=rope",
        "model.norm=rmsnorm",
        "model.mlp=swiglu",
        "model.n_kv_head=2",
        "model.qk_norm=true",
    ],
}


def train_run(config: Path, sets: list[str], max_time: float, data_dir: Path) -> dict:
    """One training run; its best val loss, steps and parameter count."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "minigpt", "train", str(config),
                   "--data", str(SHAKESPEARE), "--out", str(out), "--max-time", str(max_time),
                   "--set", f"data.data_dir={data_dir}"]  # fmt: skip
        for item in sets:
            command += ["--set", item]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
        wall = time.perf_counter() - started
        records = read_metrics(out / "metrics.jsonl")
        model = json.loads((out / "config.json").read_text())["model"]
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    return {
        "sets": sets,
        "best_val_loss": min(r["val_loss"] for r in evals),
        "steps": steps[-1]["step"],
        "train_seconds": evals[-1]["time"],
        "wall_seconds": wall,
        "params": GPTConfig.from_dict(model).num_params(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-time", type=float, default=180.0, help="seconds of training per run")
    parser.add_argument("--variants", nargs="*", default=None, help="names from the table")
    parser.add_argument("--config", nargs="*", type=Path, default=[],
                        help="more configs to run as they are (e.g. configs/modern-cpu.toml)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "modern.json")
    args = parser.parse_args()
    if not SHAKESPEARE.exists():
        raise SystemExit(f"{SHAKESPEARE} is missing: this benchmark reads tiny shakespeare there")
    names = args.variants if args.variants is not None else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        runs = [(name, CONFIG, VARIANTS[name]) for name in names]
        runs += [(path.stem, path, []) for path in args.config]
        for name, config, sets in runs:
            where = config.resolve()
            row = {
                "variant": name,
                "config": str(where.relative_to(ROOT) if where.is_relative_to(ROOT) else where),
            }
            row |= train_run(config, sets, args.max_time, Path(data_dir))
            rows.append(row)
            print(f"{name}: best val loss {row['best_val_loss']:.4f} at {row['steps']} steps",
                  flush=True)  # fmt: skip
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    headers = [f"model (on {CONFIG.name})", "parameters", f"steps in {args.max_time:.0f} s",
               "best val loss", "vs baseline"]  # fmt: skip
    cells = [
        [r["variant"], f"{r['params']:,}", f"{r['steps']:,}", f"{r['best_val_loss']:.4f}",
         f"{r['best_val_loss'] - base['best_val_loss']:+.4f}" if base else "-"]
        for r in rows
    ]  # fmt: skip
    print()
    harness.print_table(headers, cells, right={1, 2, 3, 4})
    meta = harness.machine(processor=harness.cpu_name(), threads=torch.get_num_threads(),
                           max_time=args.max_time)  # fmt: skip
    harness.write_json(args.out, {"meta": meta, "runs": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
