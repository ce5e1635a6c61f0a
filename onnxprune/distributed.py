"""Data-parallel statistics over torchrun's ranks (torch.distributed: gloo on CPU, NCCL on GPU).

`torchrun --nproc-per-node K onnxprune in.onnx out.onnx ...` starts K processes; each loads and
converts the model. Of the N calibration gradients, gradient k is computed by rank k mod K only;
after each round of K gradients the ranks exchange them (`share`), so every rank folds all N
into its statistics in the order one process would (k = 0, 1, 2, ...); where the tensors are
split between the ranks, each rank receives the rows of its own tensors only (one all-to-all). The statistics are then
the same bit for bit as one process's (summing partial Gram matrices instead moved scores at the
threshold by a rounding: 2 of MiniLM's 8.5M pruned entries differed), and so are the masks.
Everything after that starts from the same statistics on every rank and is computed identically
there; rank 0 alone writes the model, its report and checkpoints, and hands its report to the
others.

What is split is the gradients' backward passes, the dominant part of collecting statistics;
for estimators whose statistics are per tensor (WoodFisher), the tensors themselves: each rank
folds, inverts, scores and updates its share (`assign`, by size), and the scores, masks and new
weights of every tensor come from the rank that computed them (`from_owners`); and fine-tuning:
each rank trains on its share of every mini-batch under DistributedDataParallel, which sums the
ranks' gradients before each optimiser step (finetune.py). Not yet split: the layer inputs of the
layer-wise methods (sparsegpt, wanda), the statistics of the other estimators and the repair.
Every rank repeats them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .errors import UsageError


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
        torch.cuda.set_device(_own_gpu())
        backend = "nccl"
    dist.init_process_group(backend=backend)
    return True


def _own_gpu() -> int:
    """This rank's GPU: the one of its local rank (NCCL cannot put two ranks on one GPU)."""
    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    ranks = max(local + 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # every rank of the machine stops
    if ranks > gpus:
        raise UsageError(
            f"torchrun started {ranks} ranks on this machine but torch sees {gpus} GPU(s): each rank needs a GPU "
            f"of its own; start at most {gpus} (--nproc-per-node {gpus}) or add --device cpu (gloo)"
        )
    return local


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(
    parts: dict[str, torch.Tensor] | None, sizes: dict[str, int], owners: dict[str, int] | None = None
) -> list[dict[str, torch.Tensor] | None]:
    """Every rank's `parts` (flat float32 tensors by name, any subset of `sizes`' names; None when
    the rank has nothing this round), in rank order (one process: `[parts]`). With `owners` (the
    rank that consumes each name), each rank receives only the names it owns (one all-to-all:
    1/K of what every rank would otherwise receive); else every rank receives every name."""
    if world() == 1:
        return [parts]
    device = _collective_device(next(iter(parts.values())).device if parts else torch.device("cpu"))
    if owners is None:
        buffer = torch.zeros(_length(sizes, list(sizes)), dtype=torch.float32, device=device)
        _pack(buffer, parts, sizes, list(sizes))
        gathered = [torch.empty_like(buffer) for _ in range(world())]
        dist.all_gather(gathered, buffer)
        return [_unpacked(received, sizes, list(sizes)) for received in gathered]
    names = [[name for name in sizes if owners[name] == r] for r in range(world())]
    lengths = [_length(sizes, n) for n in names]
    # each destination's part packed in place in one buffer of uneven parts (gloo's list form of
    # all-to-all wants parts of one size)
    sent = torch.zeros(sum(lengths), dtype=torch.float32, device=device)
    for part, destined in zip(sent.split(lengths), names):
        _pack(part, parts, sizes, destined)
    mine = lengths[rank()]
    received = torch.empty(mine * world(), dtype=torch.float32, device=device)
    dist.all_to_all_single(received, sent, [mine] * world(), lengths)
    return [_unpacked(buffer, sizes, names[rank()]) for buffer in received.split(mine)]


def _length(sizes: dict[str, int], names: list[str]) -> int:
    """The length of `_pack`'s buffer for `names`."""
    return sum(sizes[n] for n in names) + len(names) + 1


def _pack(buffer: torch.Tensor, parts: dict[str, torch.Tensor] | None, sizes: dict[str, int], names: list[str]) -> None:
    """Fill `buffer` (zeros, `_length` long): the values of `names` in order, then a presence flag
    per name, then whether the rank sent anything this round."""
    if parts is None:
        return
    total = buffer.numel() - len(names) - 1
    buffer[-1] = 1.0
    offset = 0
    for index, name in enumerate(names):
        if name in parts:
            buffer[offset : offset + sizes[name]].copy_(parts[name])
            buffer[total + index] = 1.0
        offset += sizes[name]


def _unpacked(buffer: torch.Tensor, sizes: dict[str, int], names: list[str]) -> dict[str, torch.Tensor] | None:
    """`_pack`'s parts back (None: the rank sent nothing)."""
    if buffer[-1].item() == 0.0:
        return None
    total = sum(sizes[n] for n in names)
    flags = buffer[total:-1].tolist()
    pieces = torch.split(buffer[:total], [sizes[n] for n in names])
    return {n: piece for n, piece, flag in zip(names, pieces, flags) if flag}


def _collective_device(default: torch.device) -> torch.device:
    """Where a collective's buffer lives: this rank's GPU under NCCL (which reduces only CUDA
    tensors), else `default`."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default


def assign(sizes: Sequence[int], ranks: int) -> list[int]:
    """The rank that computes each of the work items of `sizes` (their costs): the largest first,
    each to the least loaded rank (ties to the lower rank), the same on every rank."""
    load, owners = [0] * ranks, [0] * len(sizes)
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(ranks), key=lambda r: (load[r], r))
        owners[item], load[owner] = owner, load[owner] + sizes[item]
    return owners


def from_owners(
    values: dict[int, torch.Tensor], owners: Sequence[int], device: torch.device
) -> dict[int, torch.Tensor]:
    """Every item's tensor on every rank, broadcast from the rank that owns it (`owners[i]`;
    `values` holds this rank's own, any dtype and shape; an item its owner has no value for is
    left out). Received tensors land on `device`; one process gets `values` back."""
    if world() == 1:
        return dict(values)
    described: list[dict[int, tuple[str, tuple[int, ...]]] | None] = [None] * world()
    dist.all_gather_object(
        described, {i: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for i, v in values.items()}
    )
    wire_device = _collective_device(device)
    result: dict[int, torch.Tensor] = {}
    for item, owner in enumerate(owners):
        known = described[owner] or {}
        if item not in known:
            continue
        dtype = getattr(torch, known[item][0])
        wire = torch.uint8 if dtype == torch.bool else dtype  # collectives carry no booleans
        if owner == rank():
            dist.broadcast(values[item].to(wire_device, wire).contiguous(), src=owner)
            result[item] = values[item]
        else:
            buffer = torch.empty(known[item][1], dtype=wire, device=wire_device)
            dist.broadcast(buffer, src=owner)
            result[item] = buffer.to(device=device, dtype=dtype)
    return result


def from_writer(value: Any) -> Any:
    """Rank 0's `value` on every rank (pickled; unchanged in one process)."""
    if world() == 1:
        return value
    box = [value if is_writer() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(value: float) -> float:
    """The sum of `value` over the ranks (`value` itself in one process)."""
    if world() == 1:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=_collective_device(torch.device("cpu")))
    dist.all_reduce(box)
    return float(box.item())


def least(value: int) -> int:
    """The smallest `value` over the ranks (`value` itself in one process)."""
    if world() == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=_collective_device(torch.device("cpu")))
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return int(box.item())


def local_ranks() -> int:
    """How many of the launcher's ranks run on this machine (they share its memory); 1 outside
    torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if launched() else 1


def describe() -> str:
    """How the run was spread, for the report."""
    if world() == 1:
        return "1 process"
    return f"{world()} ranks ({dist.get_backend()})"
