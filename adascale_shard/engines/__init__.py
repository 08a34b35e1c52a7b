"""Engines: where ``||G||^2`` comes from in each way of training, behind one small protocol.

The capture (:mod:`adascale_shard.capture`) records every local micro-gradient the same way on
every engine; what differs is the reduced gradient ``G``:

============================  ==========================================================  =========
engine                        ``||G||^2``                                                  a part?
============================  ==========================================================  =========
:mod:`.replicated`            one process or DDP: every rank holds all of ``G``; each      yes (DDP)
                              rank reads its share of the tensors at ``step()``
:mod:`.fsdp2`                 ``fully_shard``: each rank's DTensor shard, when the last    yes
                              backward pass ends (after the reduce-scatter)
:mod:`.deepspeed`             ZeRO-1/2/3, bf16, fp16: the wrapper's own global norm;       no
                              ZeRO-0 in fp32: the reduced ``.grad`` after the all-reduce   yes
============================  ==========================================================  =========

A part is summed over the ranks in the optimizer's one all-reduce. :func:`select_engine` picks
the engine from the optimizer's parameters; the DeepSpeed engines are installed by the DeepSpeed
integration once ``deepspeed.initialize`` has wrapped the optimizer. The core (capture, estimator,
optimizer shell) never imports an engine module: it talks to :class:`Engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .base import Engine

__all__ = ["Engine", "select_engine"]


def select_engine(param_groups: Iterable[dict[str, Any]], replicas: Callable[[], tuple[int, int]]) -> Engine:
    """The engine for an optimizer's parameter groups: FSDP2 when they are DTensors, else replicated.

    ``replicas`` gives ``(rank, ranks)`` of the optimizer's data-parallel group.
    """
    from .._compat import is_dtensor, is_flat_parameter

    param_groups = list(param_groups)
    if any(is_flat_parameter(p) for group in param_groups for p in group["params"]):
        from .fsdp1 import FSDP1Engine

        return FSDP1Engine()  # hooked at the first forward of the FSDP1 model, or by attach()
    if any(is_dtensor(p) for group in param_groups for p in group["params"]):
        from .fsdp2 import FSDP2Engine, check_not_mixed

        check_not_mixed(param_groups)
        return FSDP2Engine()
    from .replicated import ReplicatedEngine

    return ReplicatedEngine(replicas)
