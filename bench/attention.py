"""Forward + backward time of the attention forms: textbook wrapper vs fused (explicit, SDPA).

    python bench/attention.py                # both shapes, n_head in {1, 4, 8, 16}
    python bench/attention.py --quick        # a smoke run
    python bench/attention.py --device cuda

Prints a table (milliseconds per forward+backward, and the speedup of each fused
path over the wrapper) and writes bench/results/attention.json.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import harness  # bench/harness.py (the script's folder is on sys.path)
import torch

from minigpt.attention import MultiHeadAttention, MultiHeadAttentionWrapper

SHAPES = {
    # name: (width, context, batch)
    "nanoGPT CPU (128 wide, ctx 64, batch 12)": (128, 64, 12),
    "384 wide, ctx 256, batch 8": (384, 256, 8),
}
HEAD_COUNTS = (1, 4, 8, 16)


def time_fwd_bwd(module, x, need_weights, repeats, device) -> float:
    """Median milliseconds of one forward + backward pass (after a warm-up of the
    allocator, kernels and caches)."""

    def step():
        out, _ = module(x, need_weights=need_weights)
        out.sum().backward()

    return harness.median_of(step, repeats, device, warmup=3) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="few repeats, small shape only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES

    rows = []
    header = f"{'shape':<42} {'heads':>5} {'wrapper ms':>10} {'explicit ms':>11} {'sdpa ms':>8} {'explicit x':>10} {'sdpa x':>7}"
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for shape_name, (width, context, batch) in shapes.items():
        for n_head in HEAD_COUNTS:
            torch.manual_seed(0)
            wrapper = MultiHeadAttentionWrapper(width, width, context, n_head).to(device)
            fused = MultiHeadAttention.from_wrapper(wrapper)
            x = torch.randn(batch, context, width, device=device, requires_grad=True)
            wrapper_ms = time_fwd_bwd(wrapper, x, False, repeats, device)
            explicit_ms = time_fwd_bwd(fused, x, True, repeats, device)
            sdpa_ms = time_fwd_bwd(fused, x, False, repeats, device)
            row = dict(
                shape=shape_name,
                width=width,
                context=context,
                batch=batch,
                n_head=n_head,
                wrapper_ms=wrapper_ms,
                fused_explicit_ms=explicit_ms,
                fused_sdpa_ms=sdpa_ms,
                speedup_explicit=wrapper_ms / explicit_ms,
                speedup_sdpa=wrapper_ms / sdpa_ms,
            )
            rows.append(row)
            print(
                f"{shape_name:<42} {n_head:>5} {wrapper_ms:>10.2f} {explicit_ms:>11.2f} {sdpa_ms:>8.2f} "
                f"{row['speedup_explicit']:>9.2f}x {row['speedup_sdpa']:>6.2f}x"
            )

    meta = dict(
        torch=torch.__version__,
        device=str(device),
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        processor=harness.cpu_name(),
        repeats=repeats,
    )
    out = harness.write_json(args.out, dict(meta=meta, rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
