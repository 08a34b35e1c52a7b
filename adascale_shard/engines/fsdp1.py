"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``): exact AdaScale statistics.

FSDP1 flattens the parameters of each wrapped module into one ``FlatParameter`` and keeps it
sharded between iterations. For forward and backward it swaps the flat parameter's ``.data`` for
the all-gathered (unsharded) buffer, and the module's parameters become views of it, so:

* ``sum_i ||g_i||^2``: autograd computes each backward pass's local micro-gradient of the whole
  *unsharded* flat parameter and hands it to the flat parameter's tensor hooks before
  ``AccumulateGrad``; FSDP1's reduce-scatter runs in a post-hook of that node, after them. One
  tensor hook per flat parameter (:meth:`MicroGradCapture.hook_parameter`) therefore sees exactly
  ``h_rk``, with and without ``no_sync()``, whatever the optimizer holds (the flat parameters with
  ``use_orig_params=False``, torch's default; the original parameters with ``use_orig_params=True``,
  Accelerate's and the HF Trainer's default, whose own hooks never fire because forward uses views
  of the flat parameter). Under ``MixedPrecision`` the hook sees the low-precision gradient.
* ``||G||^2``: after the last pass of an update each rank's ``flat_param.grad`` holds its shard of
  ``G = (1/W) sum_r sum_k h_rk`` (FSDP1 divides by the data-parallel size, replicas of a hybrid
  strategy included, and casts back to the parameters' dtype). The squared norms of the shards
  are summed over the ranks in the optimizer's one all-reduce; a strategy that keeps ``r``
  identical copies of each shard (``NO_SHARD``: every rank, ``HYBRID_SHARD``: one per replica
  group) contributes ``1/r`` of each copy. They are taken when the last backward pass ends, after
  FSDP1's final callback (queued at the root's pre-backward hook, before the capture's first
  hook), so ``clip_grad_norm_`` between backward and ``step()`` does not change them.

A backward pass moves ``flat_param.grad`` aside before it starts (``_saved_grad_shard``) and puts
it back after the reduction, so a ``zero_grad`` between passes is noticed from the storage the
gradient lives in (:meth:`FSDP1Engine.grad_token`), not from the tensor object.

When the hooks attach: at the first forward of the outermost FSDP1 instance holding the
optimizer's parameters (:class:`~adascale_shard.engines.fsdp2.AutoAttach`, the same global
pre-hook FSDP2 uses), or by ``AdaScale.attach(model)``. The flat parameters exist from FSDP1's
construction, so the hooks are placed at once.

Refused, each with an error that names FSDP1 and the fix: ``CPUOffload(offload_params=True)``
(FSDP1's offload pins memory and synchronises streams, which needs an accelerator: it cannot run,
so it cannot be verified, on a CPU-only machine), a custom communication hook
(``register_comm_hook``: the reduced gradient may not be the mean), a data-parallel size other
than AdaScale's process group, strategies with different replica counts in one model, and a
flat parameter that flattens parameters AdaScale does not optimise (frozen ones mixed with
trainable ones, with ``use_orig_params=True``): its micro-gradient norm would include theirs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._compat import fsdp1_layout, fsdp1_modules, fsdp1_pending_grad, is_fsdp1_module
from .._docs import see
from .base import Engine, grad_sqr_norms

if TYPE_CHECKING:  # pragma: no cover
    from ..capture import MicroGradCapture
    from ..optimizer import AdaScale

__all__ = ["FSDP1Engine", "attach", "holds_optimizer_parameters", "FSDP1_ATTACH_FIX"]

logger = logging.getLogger(__name__)

FSDP1 = "AdaScale on FSDP1 (FullyShardedDataParallel)"

FSDP1_ATTACH_FIX = (
    "build AdaScale before the first forward of the FullyShardedDataParallel model and compute the "
    "gradients with forward and backward through it, or call opt.attach(fsdp_model) once, after "
    "wrapping and before the first backward"
)


class FSDP1Engine(Engine):
    """``||G||^2`` of FSDP1's sharded flat gradients, read when the last backward pass ends and
    summed over the ranks (each copy of a replicated shard counted once). Built unattached when the
    optimizer holds ``FlatParameter``s; :func:`attach` gives it the flat parameters and hooks them."""

    hooks_parameters = False

    def __init__(self) -> None:
        self.flat_groups: list[list[torch.Tensor]] | None = None  # per statistics group; None: unattached
        self.copies = 1  # identical copies of each gradient shard across AdaScale's ranks
        self._grad_sqr: torch.Tensor | None = None

    def grad_sqr_is_part(self, capture: MicroGradCapture) -> bool:
        return True

    def on_pass_closed(self, capture: MicroGradCapture) -> None:
        if self.flat_groups is not None:
            self._grad_sqr = grad_sqr_norms(self.flat_groups, capture.device)
            if self.copies != 1:
                self._grad_sqr /= self.copies

    def take_grad_sqr(self, capture: MicroGradCapture) -> tuple[torch.Tensor, torch.Tensor]:
        if self._grad_sqr is None or self._grad_sqr.numel() != len(capture.groups):
            self._grad_sqr = torch.zeros(len(capture.groups), dtype=torch.float64, device=capture.device)
        return self._grad_sqr, torch.zeros(0, dtype=torch.float64, device=capture.device)

    def grad_token(self, owner: torch.Tensor) -> tuple | None:
        grad = fsdp1_pending_grad(owner)
        return None if grad is None else (grad.untyped_storage().data_ptr(), grad.shape)

    def _unrecorded_message(self, dtensor: bool) -> str:
        return (
            "AdaScale: the FSDP1 (FullyShardedDataParallel) flat parameters have gradients but no "
            "backward pass was recorded: AdaScale hooks them at the first forward of the wrapped "
            "model after it was built, and none ran (or the gradients were written without "
            f"backward()); the gain would silently stay 1. Fix: {FSDP1_ATTACH_FIX}" + see("fsdp1-hooks-never-attached")
        )


def holds_optimizer_parameters(module: nn.Module, optimizer: AdaScale) -> bool:
    """Whether the FSDP1 instance ``module`` (or one inside it) flattens any of ``optimizer``'s
    parameters (the flat parameter itself, or one of its original parameters)."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layout in _layouts(module):
        if id(layout["flat_param"]) in ids or any(id(p) in ids for p in layout["originals"] or ()):
            return True
    return False


def _layouts(model: nn.Module) -> list[dict[str, Any]]:
    layouts = [fsdp1_layout(m) for m in fsdp1_modules(model)]
    return [layout for layout in layouts if layout is not None]


def attach(optimizer: AdaScale, model: nn.Module, *, at_forward: bool = False) -> FSDP1Engine:
    """Hook ``optimizer``'s statistics into the FSDP1 ``model``: install an :class:`FSDP1Engine`
    with a new capture whose hooks sit on the flat parameters (the averages are kept, or restart
    in one whole-model group when a flat parameter spans several of the optimizer's groups)."""
    from ..distributed import world_size

    if optimizer._capture.passes > 0:
        raise RuntimeError(
            "AdaScale.attach was called after backward passes that were not consumed by step(): "
            "call attach(model) before the first backward" + see("attach-after-backward")
        )
    layouts = _layouts(model)
    if not layouts:
        raise ValueError(
            f"AdaScale.attach: {type(model).__name__} has no FullyShardedDataParallel instance "
            "managing parameters" + see("attach-found-no-fsdp2-module")
        )
    group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    ranks = world_size(optimizer.process_group)
    flats: list[tuple[torch.Tensor, set[int]]] = []
    covered: set[int] = set()
    copies: set[int] = set()
    for layout in layouts:
        flat = layout["flat_param"]
        members = [flat] if id(flat) in group_of else [p for p in layout["originals"] or () if id(p) in group_of]
        if not members:
            continue  # another optimizer's
        # FSDP1 computes the gradient of the whole flat parameter, frozen parts included.
        others = [p for p in layout["originals"] or () if id(p) not in group_of]
        if id(flat) not in group_of and others:
            frozen = sum(not p.requires_grad for p in others)
            raise ValueError(
                f"{FSDP1}: "
                f"a flat parameter flattens {len(others)} parameters AdaScale does not optimise "
                f"({frozen} of them frozen) beside its own; FSDP1 computes the gradient of the whole "
                "flat parameter, so its micro-gradient norms would include theirs. Give AdaScale "
                "every parameter of the flat parameter, or wrap the others (frozen ones) in FSDP "
                "units of their own (an auto_wrap_policy that separates them, e.g. peft's "
                "fsdp_auto_wrap_policy)" + see("fsdp1-flat-parameter-with-other-parameters")
            )
        if layout["comm_hook"]:
            raise ValueError(
                f"{FSDP1}: "
                "a communication hook is registered (register_comm_hook); AdaScale needs FSDP1's "
                "own reduction, the mean of the micro-gradients. Remove the hook" + see("fsdp1-communication-hook")
            )
        if layout["offload"]:
            raise ValueError(
                f"{FSDP1}: "
                "CPUOffload(offload_params=True) is not supported yet: FSDP1's offload needs an "
                "accelerator (pinned memory, streams), so AdaScale's statistics with it have not been "
                "verified. Remove cpu_offload, or use DeepSpeed ZeRO-Offload (offload_optimizer / "
                "offload_param), which is tested" + see("fsdp1-cpu-offload")
            )
        if layout["data_parallel_ranks"] != ranks:
            raise ValueError(
                f"{FSDP1}: "
                f"FSDP1 averages the gradient over {layout['data_parallel_ranks']} ranks "
                f"({layout['strategy']}) but AdaScale's process group has {ranks}: pass "
                "AdaScale(..., process_group=<the group FSDP1 averages over>)" + see("fsdp1-process-group-differs")
            )
        copies.add(ranks // layout["shard_ranks"] if layout["sharded"] else ranks)
        covered.update(id(p) for p in members)
        flats.append((flat, {group_of[id(p)] for p in members}))
    foreign = [
        tuple(p.shape)
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad and id(p) not in covered
    ]
    if foreign:
        where = "the first FSDP1 instance to run forward" if at_forward else "the model given to attach()"
        raise ValueError(
            f"{FSDP1}: "
            f"{len(foreign)} of the optimizer's parameters (shapes {foreign[:4]}) are not flattened "
            f"by {where} ({type(model).__name__}). Wrap the root module with FullyShardedDataParallel "
            "and run the first forward through it (not a submodule), or build the optimizer from "
            "that model's parameters" + see("fsdp1-optimizer-parameters-outside-the-model")
        )
    if len(copies) > 1:
        raise ValueError(
            f"{FSDP1}: "
            "the model mixes sharding strategies that keep different numbers of copies of the "
            "gradient; use one sharding_strategy for every FSDP1 unit" + see("fsdp1-mixed-sharding-strategies")
        )
    merge = any(len(groups) > 1 for _, groups in flats) and len(optimizer.param_groups) > 1
    engine = FSDP1Engine()
    engine.copies = copies.pop()
    optimizer._install_engine(engine, new_capture=True, merge_groups=merge)
    num_groups = 1 if merge else len(optimizer.param_groups)
    engine.flat_groups = [[] for _ in range(num_groups)]
    for flat, groups in flats:
        index = 0 if merge else next(iter(groups))
        engine.flat_groups[index].append(flat)
        if flat.requires_grad:
            optimizer._capture.hook_parameter(flat, index, owner=flat)
    if merge:
        logger.info(
            "AdaScale on FSDP1: a flat parameter spans several of the optimizer's parameter groups, "
            "so the statistics are kept for the whole model (one group), as on DeepSpeed"
        )
    return engine


def first_forward(optimizer: AdaScale, module: nn.Module) -> bool:
    """For the automatic attach: ``module`` (an FSDP1 instance) runs forward; attach if it holds
    the optimizer's parameters. Returns whether it attached."""
    if not is_fsdp1_module(module) or not holds_optimizer_parameters(module, optimizer):
        return False
    attach(optimizer, module, at_forward=True)
    return True
