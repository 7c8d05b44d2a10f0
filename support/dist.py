"""Several processes (torchrun / accelerate launch): who am I, wait for the others, gather small Python objects.

    torchrun --nproc_per_node 2 eval.py --dataset dl19 --model smollm2      # CPU: two ranks over gloo
    accelerate launch --num_processes 8 eval.py --dataset dl19              # 8 GPUs, one rank each (NCCL)
    accelerate launch --config_file launch/ddp.yaml grpo.py ...             # data-parallel GRPO

In one process every function here is the identity or a no-op. On CPU use torchrun: `accelerate launch --cpu
--num_processes 2` starts only one process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Sequence, TypeVar

from support.files import DataError

T = TypeVar("T")

# an eval rank that finishes first waits at the gather for the slowest one: with a 7B model that can be hours, far
# beyond the collectives' default timeout (10 min NCCL, 30 min gloo), after which the waiting rank would be killed
WAIT = timedelta(hours=12)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the outputs."""
    return rank() == 0


def init(timeout: timedelta = WAIT):
    """Join the process group of a multi-process launch (a no-op in one process); returns accelerate's PartialState
    or None. On CUDA each rank takes the GPU of its LOCAL_RANK, so `model.to("cuda")` lands on its own device."""
    if world_size() == 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(state.local_process_index)
    return state


def use_local_gpu() -> None:
    """On CUDA, make this process's GPU (LOCAL_RANK) current before anything touches CUDA: else every rank opens a
    context on GPU 0 and the memory plan reads GPU 0's free memory."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def quiet_unless_main() -> None:
    """One log on stdout, the main process's: the others' prints go nowhere (errors still reach stderr)."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s contiguous block of `items`, earlier ranks larger by at most one; the shards in rank order
    concatenate back to `items`.

    >>> [shard(range(5), r, 2) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> [shard("abc", r, 4) for r in range(4)]
    [['a'], ['b'], ['c'], []]
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (rank < extra)])


def gather(obj: T) -> list[T]:
    """Every rank's `obj` (small picklable Python objects), in rank order, on every rank; [obj] in one process."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as td

    out: list = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def gather_lists(items: list[T]) -> list[T]:
    """The concatenation, in rank order, of every rank's list: with `shard`'s blocks, the global list back."""
    return [x for part in gather(items) for x in part]


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as td

        td.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on one (e.g. a Ctrl-C that reached only some: all must stop together)."""
    return any(gather(bool(flag)))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sums over ranks of a few numbers (token counts, loss parts), in float64."""
    if world_size() == 1:
        return list(values)
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    td.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params, bucket_bytes: int = 25 << 20) -> None:
    """Sum the gradients of `params` over ranks, in place, in buckets of `bucket_bytes` (no second copy of all the
    gradients). The sum, not DDP's mean: each rank's loss is already its share of the global loss."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as td

    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every rank must send the same buffers
    buckets: list[list] = []
    for p in params:
        last = buckets[-1] if buckets else None
        if last and last[0].grad.dtype == p.grad.dtype and sum(q.grad.nbytes for q in last) < bucket_bytes:
            last.append(p)
        else:
            buckets.append([p])
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        td.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _device():
    import torch
    import torch.distributed as td

    # NCCL only moves CUDA tensors; gloo only CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# training under Accelerate (grpo.py): data parallel over whole groups; in one process all of it is inert


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_world(accelerator, batch_size: int) -> None:
    """What grpo.py runs on several processes: whole groups on each process, under DDP (FSDP is not finished)."""
    world = accelerator.num_processes
    if world > 1 and batch_size % world:
        raise DataError(f"--batch-size {batch_size} does not split over {world} processes: use a multiple of "
                        f"{world} (each process rolls out whole groups)")
    if is_fsdp(accelerator):  # launch/fsdp-7b.yaml: see README "More than one GPU"
        raise DataError("FSDP training is not finished: a step's parts are written (gathered_params, grad_sync) but "
                        "sharded checkpoints are not, and it has never run on GPUs; use launch/ddp.yaml "
                        "(with --bf16-weights a 7B model fits 80 GB per GPU)")


def prepare(accelerator, model, optimizer):
    """accelerator.prepare(model, optimizer), without DDP's wrapper on several processes: its reducer's buckets, as
    large as all the gradients, go unused, since this loop sums the gradients itself (`grad_sync`); the equal initial
    weights it would give are `broadcast_params`. FSDP keeps its wrapper."""
    if accelerator.num_processes == 1 or is_fsdp(accelerator):
        return accelerator.prepare(model, optimizer)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    broadcast_params(model)
    return model, accelerator.prepare_optimizer(optimizer)


def broadcast_params(model) -> None:
    """Rank 0's weights and buffers on every rank (what DDP's constructor does): the replicas start equal."""
    if world_size() == 1:
        return
    import torch.distributed as td

    for t in [*model.parameters(), *model.buffers()]:
        td.broadcast(t.data, src=0)


@contextlib.contextmanager
def gathered_params(accelerator, model):
    """Generation under FSDP: the weights are gathered whole for the rollout and sharded again after, at the cost of
    one unsharded copy per GPU; left sharded, every decoded token would gather the whole model. Else a no-op."""
    if not is_fsdp(accelerator):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise DataError("FSDP version 1 is not supported: set fsdp_version: 2 (see launch/fsdp-7b.yaml)")
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)  # or the first decoding step would shard them again
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def grad_sync(accelerator, model):
    """One gradient exchange per update, however many backward passes it takes: the model is not DDP-wrapped
    (`prepare`), and the gradients are summed over the processes once after (`all_reduce_grads`)."""
    yield
    if accelerator.num_processes > 1 and not is_fsdp(accelerator):
        all_reduce_grads(model.parameters())
    elif is_fsdp(accelerator) and accelerator.num_processes > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(accelerator.num_processes)  # FSDP averages in every backward: this makes it the sum

