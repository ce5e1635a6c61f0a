"""Data-parallel statistics over torchrun's ranks (torch.distributed: gloo on CPU, NCCL on GPU).

`torchrun --nproc-per-node K onnxprune in.onnx out.onnx ...` starts K processes; each loads and
converts the model. Of the N calibration gradients, gradient k is computed by rank k mod K only,
and the statistics are summed over the ranks before anything reads them: streamed statistics
(WoodFisher's block Gram matrices, the diagonal Fisher's squares) add their partial sums; gradient
rows collected whole hold zeros where another rank computed the row, so their sum is exact.
Everything after that starts from the same statistics on every rank and is computed identically
there (the same masks; weights to float precision, the partial sums being added in another
order than one process would); rank 0 alone writes the model, its report and checkpoints, and
hands its report to the others.

Not split yet: the inverses and scores, the layer inputs of the layer-wise methods (sparsegpt,
wanda), the repair and fine-tuning. Every rank repeats them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world() -> int:
    """How many ranks share the work (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """Whether this process writes files (rank 0)."""
    return rank() == 0


def owned(count: int) -> range:
    """Which of `count` work items (gradients) this rank computes: k ≡ rank (mod world)."""
    return range(rank(), count, world())


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_as_writer() -> bool:
    """Whether the launcher made this process rank 0 (or started no ranks), before any group is
    joined: the command line lets only that process print."""
    return os.environ.get("RANK", "0") == "0"


def join(device: torch.device) -> bool:
    """Join the launcher's process group (gloo for CPU, NCCL for CUDA; each rank on the GPU of its
    local rank); returns whether this call started it (and `leave` should end it)."""
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend=backend)
    return True


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# elements summed at a time: a 6.5 GiB set of Gram matrices is not copied whole into the
# backend's buffers (nor onto a GPU for NCCL)
REDUCE_ELEMENTS = 1 << 25


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (contiguous) replaced in place by its sum over the ranks (unchanged in one
    process), a slice at a time."""
    if world() == 1:
        return tensor
    flat = tensor.view(-1)
    to_gpu = dist.get_backend() == "nccl" and tensor.device.type != "cuda"
    for start in range(0, flat.numel(), REDUCE_ELEMENTS):
        part = flat[start : start + REDUCE_ELEMENTS]
        if to_gpu:
            moved = part.cuda()
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            part.copy_(moved.cpu())
        else:
            dist.all_reduce(part, op=dist.ReduceOp.SUM)
    return tensor


def count_over_ranks(count: int) -> int:
    """The sum of an integer over the ranks."""
    return int(sum_over_ranks(torch.tensor([count], dtype=torch.int64)).item()) if world() > 1 else count


def from_writer(value: Any) -> Any:
    """Rank 0's `value` on every rank (pickled; unchanged in one process)."""
    if world() == 1:
        return value
    box = [value if is_writer() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def describe() -> str:
    """How the run was spread, for the report."""
    if world() == 1:
        return "1 process"
    return f"{world()} ranks ({dist.get_backend()})"
