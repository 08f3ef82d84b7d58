"""One training run over several processes: ``torchrun --nproc_per_node N -m robustmed_lite train ...``.

``torchrun`` starts N copies of the command and tells each its place through environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``init_from_env`` joins them into one
``torch.distributed`` process group (NCCL on CUDA, gloo on the CPU). Without those variables nothing here is
used and a run is one process, exactly as before.

What the trainer keeps equal on every rank, and how (see ``Trainer`` for where):

* the weights and optimizer state: ``DistributedDataParallel`` averages the gradients of ``DistributedLoss``, a
  module whose forward is the registered loss, so that one DDP forward covers the loss's several model calls;
* the weight noise: the proxy's gradients are averaged (``average_gradients``) before its optimizer steps, so
  the proxy steps on the global batch and its AdamW moments stay equal;
* BatchNorm buffers before validation and saving: rank 0's (``broadcast_buffers``), as DDP itself does;
* every decision taken from data: sums over ranks (``sum_over_ranks``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting its variables)."""
    return all(name in os.environ for name in ENV_VARS)


def init_from_env(device: torch.device) -> bool:
    """Joins the process group that ``torchrun``'s variables describe, once; returns whether training is
    distributed (a process group exists, made here or by the caller).

    Args:
        device: The training device; CUDA uses NCCL, anything else gloo.
    """
    if is_distributed():
        return True
    if not launched():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes the run directory (rank 0, or the only process)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: a launched run on CUDA uses GPU ``LOCAL_RANK`` (one process per GPU).

    Raises:
        ValueError: More processes on this node than GPUs.
    """
    if device.type != "cuda" or not launched():
        return device
    index, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if index >= gpus:
        raise ValueError(
            f"process {index} of this node has no GPU of its own: the node has {gpus}. Fix: pass "
            f"torchrun --nproc_per_node {gpus} (one process per GPU), or --device cpu"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def per_rank_batch(batch_size: int, ranks: int) -> int:
    """Each rank's share of a global batch.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``ranks``.
    """
    if batch_size % ranks:
        raise ValueError(
            f"batch_size {batch_size} does not split over {ranks} ranks: every rank takes an equal "
            f"share of each global batch. Fix: pass --batch_size a multiple of {ranks} (e.g. "
            f"{batch_size - batch_size % ranks or ranks}) or run another number of processes"
        )
    return batch_size // ranks


def epoch_seed(seed: int, epoch: int, rank_: int) -> int:
    """The seed of a rank's global RNG (the training attacks' random starts) for one epoch: a distributed run
    re-seeds at every epoch start, so that resuming needs no per-rank RNG state."""
    return (seed * 1_000_003 + epoch) * 65_537 + rank_


def _comm_device() -> torch.device:
    """Where tensors must live for the backend's collectives (NCCL: the rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over all ranks (in float64, so counts stay exact); unchanged in one process."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replaces each parameter's gradient by its mean over ranks (one collective for all of them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not is_distributed() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copies rank ``src``'s buffers (BatchNorm running statistics) to every rank."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    """Leaves the process group (at the end of a launched command)."""
    if is_distributed():
        dist.destroy_process_group()


def check_sync_batchnorm(device: torch.device) -> None:
    """Refuses SyncBatchNorm where PyTorch cannot run it: its training forward supports accelerators only and
    raises deep inside the first step on a CPU.

    Raises:
        ValueError: ``device`` is a CPU.
    """
    if device.type == "cpu":
        raise ValueError(
            "sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU. Fix: pass "
            "--sync_batchnorm false (each rank then normalises with its own batch's statistics)"
        )


class DistributedLoss(nn.Module):
    """The registered loss as a module: ``DistributedLoss(model, loss, cfg)(batch)`` is ``loss(model, batch,
    cfg)``. Wrapped in DDP, one forward per step covers every model call of the loss, and DDP averages the
    gradients of the model's parameters over ranks in the backward pass."""

    def __init__(self, model: nn.Module, loss, cfg):
        super().__init__()
        self.model, self.loss, self.cfg = model, loss, cfg

    def forward(self, batch):
        return self.loss(self.model, batch, self.cfg)


def wrap_loss(model: nn.Module, loss, cfg) -> DistributedDataParallel:
    """``DistributedLoss`` in DDP. Construction copies rank 0's weights and buffers to every rank."""
    return DistributedDataParallel(DistributedLoss(model, loss, cfg))
