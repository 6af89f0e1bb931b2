"""The machine a command runs on: which device and dtype it computes in, whether what
it is about to allocate fits in memory, and how torch's CPU threads use the cores.

This module never imports torch at load time: the OpenMP wait policy below must be
set before torch starts, so the command line imports it first.

How torch's OpenMP threads wait between parallel ops is chosen before torch loads.
Between two parallel ops OpenMP's worker threads either spin (its default: ready at
once, but each holds a core) or sleep (OMP_WAIT_POLICY=PASSIVE: every op then pays
for waking them). Which is faster depends on whether the cores are free: on idle
cores spinning wins by a wide margin, for training steps and for generating alike;
with other busy processes on the same cores sleeping wins by as much
(docs/benchmarks.md has the measurements). A spinning thread that waits for a
sibling the scheduler has put off the core waits for a whole time slice. So the
commands that run a model (train, generate, inspect-heads, eval) look at how idle
this process's cores are for a moment before torch loads, and let the threads sleep
only when they are not. nanoGPT leaves OpenMP's default, the choice for idle cores.
The choice is made only when OMP_WAIT_POLICY is unset: a user's setting always wins.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from minigpt.errors import MinigptError

if TYPE_CHECKING:
    import torch

    from minigpt.model import GPTConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
"""The devices a setting may name (and cuda:N)."""
DTYPES = ("auto", "float32", "bfloat16")
"""The dtypes a setting may name."""


# --------------------------------------------------------------------------- device and dtype


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else must exist on this machine."""
    import torch  # here, not at load: see the module docstring

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise MinigptError(
            f"unknown device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinigptError(
            "device cuda was asked for but no CUDA GPU is available",
            hint="use device cpu (or auto)",
            param="device",
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MinigptError(
            "device mps was asked for but MPS is not available",
            hint="use device cpu (or auto)",
            param="device",
        )
    return device


def process_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device `name` resolves to; a process of a DDP job (its `local_rank` given)
    takes cuda:LOCAL_RANK when `name` names no GPU of its own."""
    import torch

    device = resolve_device(name)
    if local_rank is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 where it is supported and asked for (auto: CUDA with bf16 only), else None."""
    import torch

    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    # auto: only probe CUDA when the device is CUDA, so a driverless machine is never touched
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def allow_tf32(dtype: str, device: torch.device) -> None:
    """Let float32 matmuls on a GPU run on TF32 tensor cores, as nanoGPT does, unless
    dtype=float32 asks for full precision: what autocast leaves in float32 runs there."""
    import torch

    if device.type == "cuda" and dtype != "float32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sampling_dtype(name: str) -> torch.dtype:
    """The dtype of the weights while sampling: 'float32', 'bfloat16', or 'auto'.

    'auto' is float32 on every device: at batch 1 a decode step is bound by kernel
    launches, not memory, so halving the weights' bytes does not make it faster (see
    docs/benchmarks.md for the GPU figures, and bench/gpu.py to measure them).
    """
    import torch  # here, not at load: see the module docstring

    if name not in DTYPES:
        raise MinigptError(
            f"dtype must be one of {', '.join(DTYPES)}, got {name!r}",
            hint="bfloat16 halves the weights' memory; float32 is exact",
            param="dtype",
        )
    return torch.bfloat16 if name == "bfloat16" else torch.float32


# --------------------------------------------------------------------------- CPU threads


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads. Decoding a small model is a chain of tiny matmuls: on a
    machine whose cores are busy, threads wait for each other far longer than they work."""
    import torch

    if threads is None:
        return
    if not 1 <= threads <= 1024:
        raise MinigptError(
            f"threads must be between 1 and 1024, got {threads}",
            hint="use 1 on a busy machine, or leave it out",
            param="threads",
        )
    torch.set_num_threads(threads)


PROBE_SECONDS = 0.1
"""How long start-up watches the cores (/proc/stat counts in 10 ms ticks): one other
busy process on 2 cores shows as 10 of 20 ticks."""

SPARE = 0.5
"""How far below the thread count the idle cores may be and still count as free:
background daemons take a little of any machine."""


def idle_cores(seconds: float = PROBE_SECONDS, stat: Path = Path("/proc/stat")) -> float | None:
    """How many of this process's CPUs were idle over the next `seconds` (iowait counts
    as idle; time a hypervisor stole does not). Without Linux's /proc/stat (macOS),
    the CPUs less the 1-minute load average; None where there is neither (Windows)."""
    cpus = _usable_cpus()
    ours = {f"cpu{n}" for n in cpus}
    before = _cpu_ticks(stat, ours)
    if not before:
        try:
            return max(0.0, len(cpus) - os.getloadavg()[0])
        except (AttributeError, OSError):
            return None
    time.sleep(seconds)
    after = _cpu_ticks(stat, ours)
    idle = 0.0
    for cpu, (idle_before, total_before) in before.items():
        idle_after, total_after = after.get(cpu, (idle_before, total_before))
        if total_after > total_before:
            idle += (idle_after - idle_before) / (total_after - total_before)
    return idle


def _cpu_ticks(stat: Path, cpus: set[str]) -> dict[str, tuple[int, int]]:
    """cpu name -> (idle + iowait ticks, all ticks) for the named CPUs; {} if unreadable."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return {}
    ticks = {}
    for line in lines:
        name, *fields = line.split() or [""]
        if name in cpus and len(fields) >= 8:
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            try:
                counts = [int(f) for f in fields[:8]]
            except ValueError:
                return {}
            ticks[name] = (counts[3] + counts[4], sum(counts))
    return ticks


def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def torch_threads(topology: Path = Path("/sys/devices/system/cpu")) -> int:
    """The threads torch will start with: one per physical core among the usable CPUs
    (hyperthread siblings share one), as torch's default is."""
    cores = set()
    for cpu in _usable_cpus():
        try:
            core = (topology / f"cpu{cpu}" / "topology" / "core_id").read_text().strip()
            package = (topology / f"cpu{cpu}" / "topology" / "physical_package_id").read_text()
        except OSError:
            core, package = str(cpu), "0"
        cores.add((package.strip(), core))
    return max(1, len(cores))


def cgroup_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float:
    """The CPUs a cgroup v2 quota allows this process ("200000 100000": 2.0), or
    infinity without one. /proc/stat shows the host's idle cores, not the quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return int(quota) / int(period)
    except (OSError, ValueError):  # no file, "max ...", or malformed
        return float("inf")


def choose_wait_policy(
    threads: int | None = None, *, environ: MutableMapping[str, str] = os.environ
) -> str:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` unless the cores that `threads` (default:
    OMP_NUM_THREADS, else torch's count) will use are idle now, or unless it is set
    already; return the policy in effect ('default' for OpenMP's own spinning). Call
    before torch is imported: OpenMP reads it once."""
    if "OMP_WAIT_POLICY" in environ:
        return environ["OMP_WAIT_POLICY"]
    threads = threads or _count(environ.get("OMP_NUM_THREADS")) or torch_threads()
    if _count(environ.get("LOCAL_WORLD_SIZE")) > 1:
        free = False  # processes of one DDP run share these cores
    elif cgroup_cpus() < threads:
        free = False  # a container's CPU quota: the threads take turns on fewer cores
    elif threads == 1:
        free = True  # one thread waits for no sibling
    else:
        idle = idle_cores()
        free = idle is not None and idle >= threads - SPARE
    if free:
        return "default"
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


def _count(value: str | None) -> int:
    """A positive count from an environment variable, or 0 (unset or not a number:
    torch and torchrun report a bad one themselves)."""
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


# --------------------------------------------------------------------------- memory


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (a GPU's own; the machine's RAM for cpu and mps),
    or None where it cannot be told."""
    import torch  # here, not at load: see the module docstring

    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError, AssertionError):
        return None  # no sysconf (Windows), or torch built without CUDA


def check_memory(needed: int, device: torch.device, what: str) -> None:
    """Refuse, before allocating, what cannot fit on `device` at all: a typo such as
    n_layer=1e23 must be one sentence, not minutes of swapping and a killed process."""
    available = device_memory(device)
    if available is not None and needed > available:
        raise MinigptError(
            f"{what} needs at least {_bytes_text(needed)}, more than the "
            f"{_bytes_text(available)} of memory on {device.type}",
            hint="make the model or the batch smaller (model.n_layer, model.n_embd, "
            "model.vocab_size, model.block_size, train.batch_size)",
        )


def check_training_memory(model: GPTConfig, batch_size: int, device: torch.device) -> None:
    """Refuse a run whose weights, gradients, AdamW moments (16 bytes a parameter) and
    one micro-batch's activations cannot fit on the device: a lower bound, so a run
    that fits is never refused. A vocab_size of 0 is the tokenizer's, not known yet:
    one token stands in for it, and the message says it is not known."""
    shape = model.describe() if model.vocab_size else _shape_before_the_vocab(model)
    model = model if model.vocab_size else replace(model, vocab_size=1)
    B, T, C = batch_size, model.block_size, model.n_embd
    # activations kept for backward: ~14 floats a token per layer (LN, QKV, attention
    # output, LN, the MLP's 4C twice), plus the logits and their gradient
    activations = 4 * B * T * (model.n_layer * 14 * C + 2 * model.vocab_size)
    needed = 16 * model.num_params() + model.module_bytes() + activations
    check_memory(needed, device, f"training a model of {shape} with batch_size {B:,}")


def _shape_before_the_vocab(model: GPTConfig) -> str:
    """`GPTConfig.describe` of a model whose vocabulary the tokenizer has yet to give:
    the placeholder stand-in is not named as its vocab size."""
    counted = replace(model, vocab_size=1)
    return (
        f"{model.n_layer:,} layers x {model.n_head:,} heads x {model.n_embd:,} wide, "
        f"ctx {model.block_size:,}, vocab not yet known "
        f"(at least {float(counted.num_params()):.3g} parameters)"
    )


def _bytes_text(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**70 else f"{float(n):.3g} bytes"
