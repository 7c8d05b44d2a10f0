"""Several processes (torchrun / accelerate launch): who am I, wait for the others, gather small Python objects.

    torchrun --nproc_per_node 2 eval.py --dataset dl19 --model smollm2      # CPU: two ranks over gloo
    accelerate launch --num_processes 8 eval.py --dataset dl19              # 8 GPUs, one rank each (NCCL)
    accelerate launch --config_file launch/ddp.yaml grpo.py ...             # data-parallel GRPO

The launchers start N copies of the script and tell each its place in the environment (RANK, WORLD_SIZE,
LOCAL_RANK); `init` joins the process group they describe, through accelerate's PartialState, so eval.py and grpo.py
(whose Accelerator shares that state) see the same group. In one process every function here is the identity or a
no-op, and nothing is imported that a single run does not need.

grpo.py's data parallelism lives at the end: generation under FSDP (`gathered_params`) and one gradient exchange per
update however many backward passes make it (`grad_sync`).

Reading order: the bottom layer, beside files.py (the only module of ours it imports, for one error).

Measured here: `accelerate launch --cpu --num_processes 2` starts *one* process; `torchrun --nproc_per_node 2` gives
two CPU ranks, provided accelerate is told `cpu=True` (without it, a machine with no GPU gets DistributedType.NO).
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Sequence, TypeVar

from files import DataError

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
    """On CUDA, make this process's GPU (LOCAL_RANK) the current device before anything else touches CUDA: else every
    rank opens a context on GPU 0 (~0.5 GB each) and the memory plan reads GPU 0's free memory."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def quiet_unless_main() -> None:
    """One log on stdout, the main process's: the others' prints go nowhere (errors still reach stderr)."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s share of `items`: one contiguous block, sizes differing by at most one, earlier ranks larger.
    Concatenating the shards in rank order gives `items` back, so gathered results come back in the global order.

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
    """Sum the gradients of `params` over ranks, in place, a bucket of ~25 MB at a time (as DDP's buckets: few
    collectives, and never a second copy of all the gradients at once).

    Each rank's loss is its share of one global loss (divided by the global token count), so the sum, not DDP's mean,
    is the gradient one process would compute over the whole batch. A parameter without a gradient on this rank gets
    zeros, so every rank sends the same buffers."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as td

    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
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
    """accelerator.prepare(model, optimizer), without DDP's wrapper on several processes: its reducer allocates
    gradient buckets as large as all the gradients (+15.2 GB at 7B in bf16), which this loop never uses, since it runs
    the bare module and sums the gradients itself (`grad_sync`). The model keeps Accelerate's device placement and
    autocast forward (`evaluation_mode` skips only the wrapper); the wrapper's other part, the same initial weights
    on every process, is `broadcast_params`. FSDP shards the model in its wrapper, so it keeps it."""
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
    """Generation under FSDP: every process holds only a shard of each weight, so the weights are gathered whole
    for the rollout and sharded again after (FSDP2's unshard / reshard).

    Left sharded, generation would still be right (FSDP gathers each layer for its forward and frees it after), but
    then a 2,048-token completion gathers the whole model 2,048 times. Gathered once, it costs the memory of one
    unsharded bf16 copy on every GPU (15 GB for 7B) for the length of the rollout, and one all-gather of the model.
    Without FSDP this does nothing."""
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
    """One gradient exchange per update, however many backward passes it takes.

    DDP all-reduces in the backward of every forward made through its wrapper, and `prefix.group_backward` makes
    several a step (one per micro-batch, then the shared prompt's), whose sum is the gradient. So the model is not
    wrapped (`prepare`) and the gradients are summed over the processes once after (`all_reduce_grads`). Each
    process's loss is its share of the global loss (divided by the global token count), so the sum, not DDP's mean,
    is the gradient one process computes over the whole batch.
    FSDP reduce-scatters in every backward itself (its no_sync would keep whole unsharded gradients on every GPU) and
    averages over the processes: multiplying by their number makes that average the sum.
    """
    yield
    if accelerator.num_processes > 1 and not is_fsdp(accelerator):
        all_reduce_grads(model.parameters())
    elif is_fsdp(accelerator) and accelerator.num_processes > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(accelerator.num_processes)

