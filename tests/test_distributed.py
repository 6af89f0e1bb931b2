"""The process group and the collective operations the training loop needs: alone
(rank 0 of 1, nothing communicated) and on two gloo processes. The whole trainer
under torchrun is tested as a process."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from torch import nn

from minigpt.distributed import Distributed, setup_distributed


def test_alone_every_operation_returns_its_input(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ddp = setup_distributed("cpu")
    assert (ddp.rank, ddp.world_size, ddp.enabled, ddp.is_master) == (0, 1, False, True)
    assert ddp.gather({"a": 1}) == [{"a": 1}]
    cpu = torch.device("cpu")
    assert ddp.any_rank(True, cpu) and not ddp.any_rank(False, cpu)
    tensor = torch.tensor([1.0, 3.0])
    assert ddp.mean_(tensor) is tensor and ddp.sum_(tensor).tolist() == [1.0, 3.0]
    model = nn.Linear(2, 2)
    assert ddp.wrap(model, torch.device("cpu")) is model
    ddp.barrier()
    ddp.close()


def _two_ranks(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    ddp = Distributed(rank=rank, local_rank=rank, world_size=2)
    cpu = torch.device("cpu")
    loss, value, got_signal, elapsed = ddp.share_step(
        torch.tensor(float(rank + 1)), 15 if rank == 1 else 0, 10.0 * (rank + 1)
    )
    results[rank] = {
        "gather": ddp.gather(rank * 10),
        "any": [ddp.any_rank(rank == 1, cpu), ddp.any_rank(False, cpu)],
        "sum": ddp.sum_(torch.tensor([1.0, float(rank)])).tolist(),
        "step": [loss.item(), value, got_signal, elapsed],
    }
    torch.distributed.destroy_process_group()


def test_two_processes_share_the_loss_the_signal_and_the_clock(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        got = results[rank]
        assert got["gather"] == [0, 10]
        assert got["any"] == [True, False]
        assert got["sum"] == [2.0, 1.0]
        assert got["step"] == [1.5, 1.5, True, 15.0]  # means: loss, clock; any rank's signal
