"""The few cross-rank decisions the loop and its checkpoints make, each a no-op in one process."""

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def is_lead() -> bool:
    """Rank 0: the one rank that renames, moves and prunes checkpoint folders."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def agree_max(values: list[int]) -> list[int]:
    """The element-wise maximum of ``values`` over all ranks, on every rank: every rank takes
    the same decision from flags only some ranks raised (a signal, a finished write)."""
    if not distributed():
        return values
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
