"""The one collective AdaScale adds per update: a sum of a few float64 scalars.

This is the only module of the core that touches ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank_and_world_size", "start_all_reduce_sum"]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks that average gradients: the group's size, or 1 outside ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in the group and the group's size; ``(0, 1)`` outside ``torch.distributed``."""
    ranks = world_size(group)
    return (dist.get_rank(group) if ranks > 1 else 0), ranks


def start_all_reduce_sum(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> Callable[[], torch.Tensor]:
    """Start summing ``values`` over the ranks in place; the returned function waits and returns
    them. The caller does its local work in between, hidden behind the collective's latency."""
    if world_size(group) <= 1:
        return lambda: values
    work = dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return values

    return wait
