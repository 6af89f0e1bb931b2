"""What the training loop measures without slowing it down: each step's loss, kept on
the device until it is read; the seconds of training over every session of a run;
and tokens per second.

Reading a CUDA tensor on the host waits for the GPU to finish, and while the CPU
waits it cannot queue the next step's kernels: one read per step leaves the GPU idle
between steps. So the loop reads the loss only every few steps (nanoGPT reads at its
log_interval too), and times the steps between two reads, when the GPU has caught
up with the clock.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor


class LossLog:
    """The training loss of each step, kept on the device until it is read.

    Losses are read every `read_every` steps, and the first non-finite one is
    remembered on the device, with its step, for `read` to report. The CPU runs in
    step with itself: it reads every step, for a live progress bar.
    """

    def __init__(self, device: torch.device, read_every: int):
        self.read_every = read_every
        self.last: Tensor | None = None  # the latest step's mean loss, a 0-d tensor
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)

    def add(self, loss: Tensor, step: int) -> None:
        """The mean loss of `step` (a 0-d float tensor on the device); no host sync."""
        first_bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_loss = torch.where(first_bad, loss, self.bad_loss)
        self.last = loss

    def due(self, step: int) -> bool:
        return step % self.read_every == 0 or step == 1

    def read(self) -> tuple[float, tuple[int, float] | None]:
        """The latest loss as a float (a host sync), and the step and value of the
        first loss that was not finite (None while every one was)."""
        bad_step, bad_loss, last = torch.stack(
            [self.bad_step.double(), self.bad_loss.double(), self.last.double()]
        ).tolist()
        return last, ((int(bad_step), bad_loss) if bad_step >= 0 else None)


class Clock:
    """Seconds of training: what the run trained before it was resumed, plus the wall
    time since."""

    def __init__(self, elapsed_before: float):
        self.elapsed_before, self.session_start = elapsed_before, time.perf_counter()

    def now(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.session_start)


class Throughput:
    """Tokens per second between the steps whose loss was read (only then has the GPU
    caught up with the clock), smoothed; the first reading of a session is taken as is."""

    def __init__(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()
        self.tokens_per_s = 0.0
        self.measured = False

    def update(self, step: int, tokens_per_step: int) -> None:
        now = time.perf_counter()
        rate = (step - self.step) * tokens_per_step / max(now - self.time, 1e-9)
        self.tokens_per_s = 0.9 * self.tokens_per_s + 0.1 * rate if self.measured else rate
        self.step, self.time, self.measured = step, now, True

    def skip(self, step: int) -> None:
        """Leave out the time since the last reading (an evaluation, a save)."""
        self.step, self.time = step, time.perf_counter()


class Meters:
    """What the loop measures as it goes: the clock, tokens/s, the losses not read yet,
    the latest loss read, and when loss.png was last drawn."""

    def __init__(self, elapsed_before: float, step: int, losses: LossLog):
        self.clock, self.speed, self.losses = Clock(elapsed_before), Throughput(step), losses
        self.loss = math.nan
        self.last_plot = time.perf_counter()
