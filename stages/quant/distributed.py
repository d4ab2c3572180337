"""Data-parallel quantization: which calibration samples a process holds, and the reductions across processes.

The quantizers and the driver talk to a `Comm`. `LOCAL` (one process) makes every reduction a
no-op, so a single-process run computes exactly what it always did. `TorchComm` wraps the
torch.distributed process group of a `torch.distributed.run` (torchrun) launch: NCCL on CUDA, gloo
on the CPU. Every rank holds the current block and a contiguous shard of the calibration samples;
AutoRound sums each iteration's gradients and loss over the ranks before its SignSGD step, GPTQ
sums its Hessians, and the driver sums the block MSE; rank 0's tuned parameters are broadcast at
the end of a block, so every rank carries on with bit-identical weights.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

RANK_SEED_STRIDE = 1_000_003  # rank r > 0 draws its batch order from seed + r * stride (rank 0: the seed itself)


class Comm:
    """One process: holds every sample, reductions change nothing."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """The contiguous range of the n calibration samples this rank holds (sizes differ by at most one)."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def rank_seed(self, seed: int) -> int:
        return (seed + RANK_SEED_STRIDE * self.rank) % (2**31 - 1)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place."""

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place."""

    def sum_float(self, value: float) -> float:
        return float(value)

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


LOCAL = Comm()


class TorchComm(Comm):
    """The default torch.distributed process group (initialised by `init_from_env`)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in tensors]
        for work in works:
            work.wait()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        works = [dist.broadcast(t, src=0, async_op=True) for t in tensors]
        for work in works:
            work.wait()

    def sum_float(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.sum_([t])
        return float(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True inside a process started by torch.distributed.run (it sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_from_env(device_type: str, timeout_minutes: int = 60) -> tuple[TorchComm, torch.device]:
    """Join the process group torchrun set up: NCCL with cuda:LOCAL_RANK on CUDA, gloo on the CPU.

    Returns:
        (the comm, this rank's device).
    """
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(minutes=timeout_minutes), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_minutes))
    return TorchComm(rank, world, device), device
