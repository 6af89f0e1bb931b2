"""Time `minigpt prepare`: reading, tokenizer training, tokenising and writing the token files.

    python bench/prepare.py            # shakespeare char, shakespeare bpe 2048, stdlib bpe 8192, ...
    python bench/prepare.py --quick    # a smoke run (shakespeare char, induction char)

Each case runs in a fresh temporary data dir, so the cache never hides the work
(the BPE training is included). Tiny shakespeare is read from
../shared/data/tinyshakespeare/input.txt (placed where the built-in dataset looks
for it, so nothing is downloaded). Also times a cached re-prepare and the batcher.
Prints a table and writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from minigpt.data import Batcher, prepare, shakespeare_path

SHAKESPEARE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
)

# name, source, tokenizer, vocab size, target seconds (None: no target)
CASES = [
    ("shakespeare char", "shakespeare", "char", None, 10.0),
    ("shakespeare bpe 2048", "shakespeare", "bpe", 2048, 10.0),
    ("pystdlib char", "pystdlib", "char", None, None),
    ("pystdlib bpe 8192", "pystdlib", "bpe", 8192, 60.0),
    ("induction char", "induction", "char", None, None),
]
QUICK_CASES = ("shakespeare char", "induction char")


def time_case(source: str, tokenizer: str, vocab_size: int | None, repeats: int) -> dict:
    """Best-of-`repeats` seconds for a cold prepare, then one warm (cached) prepare."""
    cold = []
    for _ in range(repeats):
        data_dir = Path(tempfile.mkdtemp(prefix="minigpt-bench-"))
        try:
            if source == "shakespeare":  # where the built-in dataset looks; no download
                shakespeare_path(data_dir).parent.mkdir(parents=True)
                shutil.copyfile(SHAKESPEARE, shakespeare_path(data_dir))
            start = time.perf_counter()
            prepared = prepare(source, tokenizer, vocab_size, data_dir, progress=False)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            again = prepare(source, tokenizer, vocab_size, data_dir, progress=False)
            warm = time.perf_counter() - start
            assert again.reused
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    meta = prepared.meta
    return {
        "seconds": min(cold),
        "cached_seconds": warm,
        "characters": meta["characters"],
        "documents": meta["documents"],
        "tokens": meta["train_tokens"] + meta["val_tokens"],
        "vocab_size": meta["vocab_size"],
        "bytes_per_token": meta["bytes_per_token"],
    }


def time_batcher(batch_size: int = 64, block_size: int = 256, n_batches: int = 200) -> dict:
    """Batches per second from a memory-mapped token file."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        np.random.default_rng(0).integers(0, 8192, 5_000_000).astype(np.uint16).tofile(path)
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        batcher = Batcher(tokens, block_size, batch_size, seed=0)
        batcher.next()
        start = time.perf_counter()
        for _ in range(n_batches):
            batcher.next()
        seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "block_size": block_size,
        "ms_per_batch": seconds / n_batches * 1e3,
        "tokens_per_second": n_batches * batch_size * block_size / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two small cases only")
    parser.add_argument("--repeats", type=int, default=1, help="cold runs per case (best is kept)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prepare.json"))
    args = parser.parse_args()
    if not SHAKESPEARE.exists():
        raise SystemExit(f"needs tiny shakespeare at {SHAKESPEARE}")

    cases = [case for case in CASES if not args.quick or case[0] in QUICK_CASES]
    rows = []
    print(
        f"{'case':<24}{'seconds':>9}{'target':>8}{'cached':>9}{'chars':>12}{'tokens':>12}{'B/tok':>7}"
    )
    for name, source, tokenizer, vocab_size, target in cases:
        result = time_case(source, tokenizer, vocab_size, args.repeats)
        result |= {"case": name, "target_seconds": target}
        result["meets_target"] = None if target is None else result["seconds"] < target
        rows.append(result)
        target_text = "-" if target is None else f"<{target:.0f}"
        print(
            f"{name:<24}{result['seconds']:>9.2f}{target_text:>8}{result['cached_seconds']:>9.3f}"
            f"{result['characters']:>12,}{result['tokens']:>12,}{result['bytes_per_token']:>7.2f}"
        )
    batcher = time_batcher(n_batches=50 if args.quick else 200)
    print(
        f"batcher: {batcher['ms_per_batch']:.3f} ms per batch of {batcher['batch_size']}x"
        f"{batcher['block_size']} ({batcher['tokens_per_second'] / 1e6:.1f}M tokens/s)"
    )

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "quick": args.quick,
        "cases": rows,
        "batcher": batcher,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
