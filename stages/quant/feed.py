"""Mini-batches of cached block inputs/targets for tuning, without host-device syncs.

* `DeviceFeeder`: the cache is on the tuning device; batches are `index_select`s with an
  index schedule that lives on the device too.
* `HostFeeder` (low_gpu_mem on CUDA): the cache is in pinned CPU memory; each sample is
  copied straight from its pinned row into one of two device buffers on a side stream, one
  batch ahead of the compute (events order reuse), so the copy overlaps the previous step.

Both serve the same schedule: `schedule[step]` are the sample indices of mini-batch `step`.
"""

from __future__ import annotations

import torch


def index_schedule(n: int, global_batch: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Sample indices per iteration, [iters, global_batch] int64 (CPU), as the reference samples.

    A shuffled order is consumed in consecutive chunks; when fewer than `global_batch`
    indices remain it is reshuffled and restarted (the tail is dropped).
    """
    rows, order, pos = [], torch.randperm(n, generator=generator), 0
    for _ in range(iters):
        if pos + global_batch > n:
            order, pos = torch.randperm(n, generator=generator), 0
        rows.append(order[pos:pos + global_batch])
        pos += global_batch
    return torch.stack(rows) if rows else torch.empty(0, global_batch, dtype=torch.long)


def minibatch_slices(global_batch: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, global_batch)) for s in range(0, global_batch, batch_size)]


def flat_steps(schedule: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per mini-batch step (iteration-major) the sample indices it uses."""
    slices = minibatch_slices(schedule.shape[1], batch_size)
    return [schedule[it, s] for it in range(schedule.shape[0]) for s in slices]


class DeviceFeeder:
    """Batches from tensors already on the tuning device (index_select, no host sync)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, schedule: torch.Tensor, batch_size: int):
        self.inputs, self.targets = inputs, targets
        self.steps = flat_steps(schedule.to(inputs.device), batch_size)  # one copy, then views

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.steps[step]
        return self.inputs.index_select(0, idx), self.targets.index_select(0, idx)

    def done(self, step: int) -> None:
        return None


class HostFeeder:
    """Batches copied from pinned CPU memory to the GPU on a side stream, one step ahead."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, schedule: torch.Tensor, batch_size: int,
                 device: torch.device):
        self.inputs, self.targets, self.device = inputs, targets, device
        self.steps = [idx.tolist() for idx in flat_steps(schedule, batch_size)]
        shape = (min(batch_size, schedule.shape[1]), *inputs.shape[1:])
        self.buf = [(torch.empty(shape, dtype=inputs.dtype, device=device),
                     torch.empty(shape, dtype=targets.dtype, device=device)) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.released = [torch.cuda.Event() for _ in range(2)]
        self.issued = -1  # highest step whose copy was issued

    def _issue(self, step: int) -> None:
        k = step % 2
        x, t = self.buf[k]
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[k])  # the compute that read this buffer is done
            for j, sample in enumerate(self.steps[step]):
                x[j].copy_(self.inputs[sample], non_blocking=True)
                t[j].copy_(self.targets[sample], non_blocking=True)
            self.copied[k].record(self.copy_stream)
        self.issued = step

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        while self.issued < step:
            self._issue(self.issued + 1)
        k, n = step % 2, len(self.steps[step])
        torch.cuda.current_stream(self.device).wait_event(self.copied[k])
        return self.buf[k][0][:n], self.buf[k][1][:n]

    def done(self, step: int) -> None:
        """The compute of `step` is enqueued: free its buffer after it, prefetch the next step."""
        self.released[step % 2].record(torch.cuda.current_stream(self.device))
        if step + 1 < len(self.steps) and self.issued < step + 1:
            self._issue(step + 1)


def make_feeder(inputs: torch.Tensor, targets: torch.Tensor, schedule: torch.Tensor, batch_size: int,
                device: torch.device) -> "DeviceFeeder | HostFeeder":
    """HostFeeder when the cache is in CPU memory and tuning runs on CUDA, else DeviceFeeder."""
    if device.type == "cuda" and inputs.device.type == "cpu":
        return HostFeeder(inputs, targets, schedule, batch_size, device)
    if inputs.device != device:
        inputs, targets = inputs.to(device), targets.to(device)
    return DeviceFeeder(inputs, targets, schedule, batch_size)
