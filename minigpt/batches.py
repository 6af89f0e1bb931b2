"""The random-window batcher: what the trainer and the head probe draw from a token file.

Its own module so that `minigpt prepare` never imports torch, which alone takes
about 200 MB of memory.
"""

from __future__ import annotations

import numpy as np
import torch

from minigpt.data import check_block_size
from minigpt.errors import MinigptError


class Batcher:
    """Random windows of block_size + 1 tokens: x is the first block_size, y the last (shifted by one).

    Start positions come from a `torch.Generator` seeded with `seed`; its state is
    what `state_dict()` saves, so a restored batcher yields exactly the batches the
    original would have yielded next.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
    ):
        if block_size < 1 or batch_size < 1:
            raise MinigptError(
                f"block_size and batch_size must be at least 1 (got {block_size} and {batch_size})"
            )
        check_block_size(len(tokens), block_size, "the token file")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.n_starts = len(tokens) - block_size  # window [s, s + block_size] must fit
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)  # (T + 1,)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (x, y), each int64 (batch_size, block_size); y[:, t] is the token after x[:, t]."""
        starts = torch.randint(self.n_starts, (self.batch_size,), generator=self.generator)
        index = starts.numpy()[:, None] + self._offsets  # (B, T + 1)
        window = torch.from_numpy(self.tokens[index].astype(np.int64))  # (B, T + 1), one gather
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            window = window.to(self.device)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict:
        """The generator state (a uint8 tensor): safe with torch.load(weights_only=True)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
