"""FSDP2 (``torch.distributed.fsdp.fully_shard``): exact AdaScale statistics on sharded gradients.

Where the two squared norms come from:

* ``sum_i ||g_i||^2``: FSDP2 keeps each parameter as a sharded DTensor between iterations and
  all-gathers an *unsharded* ``nn.Parameter`` (a plain tensor, one per ``FSDPParam``) for forward
  and backward. Autograd writes the local micro-gradient of each backward pass into that unsharded
  tensor before FSDP2 reduce-scatters it, so a gradient hook on the unsharded parameter
  (``MicroGradCapture.hook_parameter``) sees exactly ``h_rk``, also when
  ``set_requires_gradient_sync(False)`` makes FSDP2 accumulate unsharded gradients over several
  passes (in ``.grad``, or in an fp32 buffer under a bf16 ``MixedPrecisionPolicy``), since the
  hook runs before that accumulation. A hook on the sharded DTensor never fires: it is not used
  in forward.
* ``||G||^2``: after the reduce-scatter the sharded DTensor ``.grad`` on each rank holds its shard
  of ``G = (1/W) sum_r sum_k h_rk`` (FSDP2's default divide factor is the shard group's size;
  a custom ``set_gradient_divide_factor`` is refused). The squares of the local shards are summed
  over ranks inside the one all-reduce the optimizer already does per update
  (:class:`FSDP2Engine`); they are taken when the last backward pass ends,
  so ``clip_grad_norm_`` between backward and ``step()`` does not change them.
* HSDP (a 2-D ``(replicate, shard)`` mesh, ``HSDPMeshInfo``): FSDP2 reduce-scatters over the shard
  group and then all-reduces over the replicate group, both with ``ReduceOp.AVG`` by default
  (``_get_gradient_divide_factors``: one factor ``shard x replicate``), so every replica's sharded
  ``.grad`` holds the same shard of ``G``, the mean over all ``W = shard x replicate`` ranks;
  with ``set_requires_gradient_sync(False)`` nothing is reduced, with ``set_requires_all_reduce
  (False)`` the reduce-scatter output waits in FSDP2's partial buffer (not in ``.grad``) until a
  pass that all-reduces. The micro-gradient hooks fire on every rank as on a 1-D mesh, and the
  optimizer's all-reduce (over ``W`` ranks) sums them. For ``||G||^2`` only the shards of
  replicate-rank 0 are counted (the other replicas' are the same numbers): each element of ``G``
  once, exactly, for any replicate size (dividing a sum of ``R`` copies by ``R`` would round when
  ``R`` is not a power of two), and no second norm kernel. AdaScale's process group must have
  ``shard x replicate`` ranks.

When the hooks attach: :func:`attach` registers a forward pre-hook on every module that
``fully_shard`` was applied to. It runs after FSDP2's own pre-hook (FSDP2 prepends its hook), when
the unsharded parameters exist, and hooks each unsharded parameter the first time it is seen
(FSDP2 re-uses the same tensor for every all-gather, with ``reshard_after_forward`` True or False;
a re-created one would be hooked on its next forward). The optimizer's ``param_groups`` are
re-read whenever they change, so a later swap of the optimizer's parameters (Accelerate's
``prepare``) is followed.

Who calls :func:`attach`: :meth:`AdaScale.attach` (explicit, optional), or :class:`AutoAttach`,
which every AdaScale holds until it is attached, an engine integration installs its own engine,
or its first update consumes backward passes. ``AutoAttach`` is a global module forward pre-hook
(``register_module_forward_pre_hook``, holding the optimizer through a weak reference); global
pre-hooks run before a module's own, so the first ``fully_shard`` module to run forward is FSDP2's
root before FSDP2 itself has seen it. When that module's sharded parameters include the
optimizer's (as they are then: a swap before the first forward is followed), it calls
:func:`attach` on it, which refuses, as an explicit call does, a module that does not hold all of
them (a submodule run first). The pre-hooks it registers there wait for the next call of the
module already running, so that module's unsharded parameters are hooked by a one-shot forward
hook when its forward ends, before any backward pass: the same hooks as an explicit
:func:`attach`, the same statistics.

Limits: a 1-D mesh or a 2-D HSDP mesh (no FSDP2 + tensor parallelism, no ``replicate()`` alone,
no SPMD mesh with data-parallel dims), and every trainable parameter of the optimizer must be
sharded by ``fully_shard`` (wrap the root module too).

Why ``||G||^2`` is complete when it is taken: the capture snapshots ``.grad`` in a callback
that it queues on the autograd engine at the first hooked gradient of a backward pass (and queues
once more from there). FSDP2 queues its root post-backward callback from the backward hook of
its modules' *outputs*, which fires before any parameter gradient of that module is computed, so
before the capture's first hook; queued callbacks run in order, so FSDP2's callback (the post-
backward of groups whose inputs need no gradient, e.g. a root holding the token embedding, and
the wait on every reduce-scatter) finishes before the snapshot. The tests check this order and
the resulting statistics against a single-process reference.

Only ``torch`` is imported at module level; FSDP2 internals are imported inside the functions.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._compat import (
    fsdp_mesh_info_classes,
    fsdp_param_group_name,
    fsdp_param_groups,
    fsdp_param_name,
    fsdp_state,
    fsdp_state_modules,
    fsdp_unsharded_param,
    is_dtensor,
    is_fsdp1_module,
    is_fsdp_module,
)
from .._docs import see
from .base import Engine, grad_sqr_norms

if TYPE_CHECKING:  # pragma: no cover
    from ..capture import MicroGradCapture
    from ..optimizer import AdaScale

__all__ = ["FSDP2Engine", "attach", "AutoAttach", "FSDP2Hooks", "check_not_mixed"]

logger = logging.getLogger(__name__)


def check_not_mixed(param_groups: Sequence[dict[str, Any]]) -> None:
    plain = [
        tuple(p.shape)
        for group in param_groups
        for p in group["params"]
        if p.requires_grad and not is_dtensor(p)
    ]
    if plain:
        raise ValueError(
            f"AdaScale got FSDP2 (DTensor) parameters together with {len(plain)} plain tensors "
            f"(shapes {plain[:4]}{'...' if len(plain) > 4 else ''}). On FSDP2 every trainable "
            "parameter must be sharded: apply fully_shard to the root module as well "
            "(fully_shard(model) after the submodules)" + see("fsdp2-with-plain-parameters")
        )


class FSDP2Engine(Engine):
    """``||G||^2`` of FSDP2's sharded gradients: each rank's DTensor shards, read when the last
    backward pass ends (after the reduce-scatter), summed over the ranks. The capture hooks no
    parameter itself: :func:`attach` hooks the unsharded parameters that receive the gradients."""

    hooks_parameters = False

    def __init__(self) -> None:
        self._grad_sqr: torch.Tensor | None = None
        self.hooks: FSDP2Hooks | None = None  # set by attach()

    def grad_sqr_is_part(self, capture: MicroGradCapture) -> bool:
        return True

    def on_pass_closed(self, capture: MicroGradCapture) -> None:
        groups = capture.groups
        skip = self.hooks.replica_copies if self.hooks is not None else None
        if skip:  # HSDP: one replica's shards, each counted once over the ranks
            groups = [[p for p in params if id(p) not in skip] for params in groups]
        self._grad_sqr = grad_sqr_norms(groups, capture.device)

    def take_grad_sqr(self, capture: MicroGradCapture) -> tuple[torch.Tensor, torch.Tensor]:
        if self._grad_sqr is None:
            self._grad_sqr = torch.zeros(len(capture.groups), dtype=torch.float64, device=capture.device)
        return self._grad_sqr, torch.zeros(0, dtype=torch.float64, device=capture.device)

    def _unrecorded_message(self, dtensor: bool) -> str:
        if self.hooks is None or not dtensor:
            return super()._unrecorded_message(dtensor)
        return (
            "AdaScale: the FSDP2 (DTensor) parameters have gradients but the hooks attached to the "
            "fully_shard model (at its first forward, or by attach(model)) never fired: the model "
            "attached is not the one that ran forward and backward, or its gradients were computed "
            "without backward(). Attach the model you train (opt.attach(model)), and compute the "
            "gradients with backward()" + see("fsdp2-hooks-never-fired")
        )


def _fsdp_states(model: nn.Module) -> list[Any]:
    """The FSDP2 states of ``model`` and its submodules, each once, in module order."""
    states: list[Any] = []
    seen: set[int] = set()
    for module in model.modules():
        state = fsdp_state(module)
        if state is not None and id(state) not in seen:
            seen.add(id(state))
            states.append(state)
    return states


def _layout(mesh_info: Any) -> str:
    """``"1-D"`` (plain sharding), ``"HSDP"`` (a 2-D (replicate, shard) mesh), or a description of
    a layout AdaScale refuses."""
    FSDPMeshInfo, DDPMeshInfo = fsdp_mesh_info_classes()
    sharded, replicated = isinstance(mesh_info, FSDPMeshInfo), isinstance(mesh_info, DDPMeshInfo)
    ndim = mesh_info.mesh.ndim
    if getattr(mesh_info, "is_spmd_mesh", False):  # dp_mesh_dims: data parallel dims of a larger mesh (TP)
        return f"a {ndim}-D SPMD mesh with data-parallel dims {mesh_info.dp_mesh_dims} ({type(mesh_info).__name__})"
    if sharded and not replicated and ndim == 1:
        return "1-D"
    if sharded and replicated and ndim == 2:
        return "HSDP"
    if replicated and not sharded:
        return f"replicate() without sharding ({type(mesh_info).__name__}) on a {ndim}-D mesh"
    return f"{type(mesh_info).__name__} on a {ndim}-D mesh"


def data_parallel_size(mesh_info: Any) -> int:
    """The ranks whose micro-gradients FSDP2 averages for a parameter group: the shard group's
    size, times the replicate group's under HSDP."""
    replicas = mesh_info.replicate_mesh_size if _layout(mesh_info) == "HSDP" else 1
    return mesh_info.shard_mesh_size * replicas


def _check_group(param_group: Any, ranks: int) -> None:
    """Refuse the FSDP2 layouts whose reduced gradient is not the mean of the micro-gradients
    over ``ranks`` (the estimator's normalisation)."""
    mesh_info = param_group.mesh_info
    name = fsdp_param_group_name(param_group) or "<module>"
    layout = _layout(mesh_info)
    if layout not in ("1-D", "HSDP"):
        raise NotImplementedError(
            f"AdaScale on FSDP2 supports a 1-D device mesh (plain sharding) or a 2-D (replicate, shard) "
            f"mesh (HSDP); {name} uses {layout}. Use fully_shard(module, mesh=init_device_mesh(device, "
            "(world_size,))) or, for HSDP, mesh=init_device_mesh(device, (replicas, shards), "
            "mesh_dim_names=('replicate', 'shard')); for replicate() alone use DDP" + see("fsdp2-mesh-layout-not-supported")
        )
    size = data_parallel_size(mesh_info)
    if size != ranks:
        over = (
            f"{mesh_info.replicate_mesh_size} replicas x {mesh_info.shard_mesh_size} shards = {size} ranks"
            if layout == "HSDP"
            else str(size)
        )
        raise ValueError(
            f"AdaScale's process group has {ranks} ranks but FSDP2 averages the gradients of {name} over "
            f"{over}: pass AdaScale(..., process_group=<the FSDP2 mesh's group>) (the default, the "
            "whole world, is right when the mesh spans every rank)" + see("fsdp2-process-group-differs")
        )
    factor = param_group.gradient_divide_factor
    if factor is not None and factor != size:
        raise ValueError(
            f"{name} has set_gradient_divide_factor({factor}); AdaScale needs FSDP2's default "
            f"average over the {size} ranks (the applied gradient must be the "
            "mean of the micro-gradients). Remove the custom divide factor and scale the loss instead"
            + see("fsdp2-gradient-divide-factor")
        )


def _replica_copies(states: Sequence[Any]) -> set[int]:
    """The ids of the sharded parameters whose local shard is a copy of another replica's: under
    HSDP every replica holds the same reduced shards, and only replicate-rank 0's are counted in
    ``||G||^2``."""
    _, DDPMeshInfo = fsdp_mesh_info_classes()
    return {
        id(fsdp_param.sharded_param)
        for state in states
        for param_group in fsdp_param_groups(state)
        if isinstance(param_group.mesh_info, DDPMeshInfo) and param_group.mesh_info.replicate_mesh_rank != 0
        for fsdp_param in param_group.fsdp_params
    }


class FSDP2Hooks:
    """The hooks :func:`attach` installs; :meth:`remove` takes them off.

    Forward pre-hooks on every ``fully_shard`` module hook the unsharded parameters into the
    optimizer's capture, with the sharded parameter as the ``.grad`` owner (its DTensor gradient
    is what the optimizer applies, and what tells a ``zero_grad`` between passes).
    """

    def __init__(self, optimizer: AdaScale, states: Sequence[Any]) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        from ..distributed import world_size

        self._optimizer_ref = weakref.ref(optimizer)
        self._ranks = world_size(optimizer.process_group)
        self._states = list(states)
        self.replica_copies = _replica_copies(self._states)  # not counted in ||G||^2 (HSDP)
        self._hooked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._group_of: dict[int, int] = {}
        self._signature: tuple[tuple[int, int, int], ...] = ()
        self._sync_groups(optimizer)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for state in self._states:
            for module in fsdp_state_modules(state):
                self._handles.append(module.register_forward_pre_hook(self._make_pre_forward(state)))
        # Parameters already unsharded now (reshard_after_forward=False after a forward) get
        # their hook at once; the others on their next forward.
        for state in self._states:
            self._hook_unsharded(state, optimizer)

    # -- groups -------------------------------------------------------------------------------
    def _sync_groups(self, optimizer: AdaScale) -> None:
        """Follow the optimizer's ``param_groups`` (a swap of its parameters, a new group)."""
        groups = optimizer.param_groups
        signature = _groups_signature(groups)
        if signature == self._signature:
            return
        capture = optimizer._capture
        check_not_mixed(groups)
        for index, group in enumerate(groups):
            if index < len(capture.groups):
                capture.groups[index] = list(group["params"])
        self._group_of = {id(p): index for index, g in enumerate(groups) for p in g["params"]}
        self._signature = signature

    # -- hooks --------------------------------------------------------------------------------
    def _make_pre_forward(self, state: Any):
        def pre_forward(module: nn.Module, args: Any) -> None:
            optimizer = self._optimizer_ref()
            if optimizer is not None:
                self._hook_unsharded(state, optimizer)

        return pre_forward

    def _hook_unsharded(self, state: Any, optimizer: AdaScale) -> None:
        self._sync_groups(optimizer)
        capture = optimizer._capture
        for param_group in fsdp_param_groups(state):
            factor = param_group.gradient_divide_factor
            if factor is not None and factor != self._ranks:
                _check_group(param_group, self._ranks)  # raises with the fix
            for fsdp_param in param_group.fsdp_params:
                unsharded = fsdp_unsharded_param(fsdp_param)
                if unsharded is None or unsharded in self._hooked or not unsharded.requires_grad:
                    continue
                index = self._group_of.get(id(fsdp_param.sharded_param))
                if index is None:
                    continue  # not optimised by this optimizer
                if is_dtensor(unsharded):
                    raise NotImplementedError(
                        f"AdaScale on FSDP2: {fsdp_param_name(fsdp_param)} is a DTensor also when "
                        "unsharded (FSDP2 combined with tensor parallelism), which is not supported"
                        + see("fsdp2-with-tensor-parallelism")
                    )
                self._hooked[unsharded] = capture.hook_parameter(
                    unsharded, index, owner=fsdp_param.sharded_param
                )

    def hook_when_forward_ends(self, module: nn.Module) -> None:
        """For the module whose forward runs now: a pre-hook registered while its pre-hooks run
        waits for its next call, so hook its unsharded parameters once, when this forward ends
        (they exist then; the backward pass that uses them comes later)."""
        state = fsdp_state(module)

        def post_forward(module: nn.Module, args: Any, output: Any) -> None:
            handle.remove()
            optimizer = self._optimizer_ref()
            if optimizer is not None and self._handles:  # not removed in the meantime
                self._hook_unsharded(state, optimizer)

        handle = module.register_forward_hook(post_forward)

    @property
    def num_hooked(self) -> int:
        """Unsharded parameters hooked so far."""
        return len(self._hooked)

    def remove(self) -> None:
        """Remove the forward pre-hooks and the hooks on the unsharded parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for handle in list(self._hooked.values()):
            handle.remove()
        self._hooked.clear()


def _groups_signature(groups: Sequence[dict[str, Any]]) -> tuple[tuple[int, int, int], ...]:
    """What changes when an optimizer's parameters are swapped or a group is added (a new list,
    another length, or another first parameter in the same list)."""
    return tuple((id(g["params"]), len(g["params"]), id(g["params"][0]) if g["params"] else 0) for g in groups)


def _sharded_ids(states: Sequence[Any]) -> set[int]:
    """The ids of the sharded (DTensor) parameters of FSDP2 ``states``."""
    return {
        id(fsdp_param.sharded_param)
        for state in states
        for param_group in fsdp_param_groups(state)
        for fsdp_param in param_group.fsdp_params
    }


def _check_attachable(optimizer: AdaScale, model: nn.Module, states: Sequence[Any], at_forward: bool = False) -> None:
    """Every check of :func:`attach`, before anything is changed."""
    from ..distributed import world_size

    if optimizer._capture.passes > 0:
        raise RuntimeError(
            "AdaScale.attach was called after backward passes that were not consumed by step(): "
            "call attach(model) before the first backward" + see("attach-after-backward")
        )
    if not states:
        raise ValueError(
            f"AdaScale.attach: {type(model).__name__} has no fully_shard module. attach() is for "
            "FSDP2: apply torch.distributed.fsdp.fully_shard first (or call it after "
            "accelerator.prepare); DDP and single-process training need no attach()"
            + see("attach-found-no-fsdp2-module")
        )
    ranks = world_size(optimizer.process_group)
    for state in states:
        for param_group in fsdp_param_groups(state):
            _check_group(param_group, ranks)
    sharded = _sharded_ids(states)
    foreign = [
        tuple(p.shape)
        for g in optimizer.param_groups
        for p in g["params"]
        if p.requires_grad and id(p) not in sharded
    ]
    if foreign and at_forward:
        raise ValueError(
            f"AdaScale could not attach itself at the first forward of {type(model).__name__}, the "
            f"first fully_shard module holding its parameters to run: {len(foreign)} of the "
            f"optimizer's parameters (shapes {foreign[:4]}) are not the sharded parameters of the "
            "fully_shard modules under it. Run the first forward through the model the optimizer "
            "was built from (its root module, not a submodule), or call opt.attach(model) with "
            "that model before the first forward" + see("attach-with-foreign-parameters")
        )
    if foreign:
        raise ValueError(
            f"AdaScale.attach: {len(foreign)} of the optimizer's parameters (shapes "
            f"{foreign[:4]}) are not the sharded parameters of the fully_shard modules of this "
            "model. Build the optimizer from model.parameters() after fully_shard(model), or "
            "let accelerator.prepare swap them, then attach the same model" + see("attach-with-foreign-parameters")
        )


def attach(optimizer: AdaScale, model: nn.Module, *, at_forward: bool = False) -> FSDP2Hooks:
    """Hook ``optimizer``'s statistics into the FSDP2-sharded ``model`` (see the module docstring).

    Installs the FSDP2 engine (with a new capture) if the optimizer was built on plain parameters
    (before ``fully_shard``, its parameters swapped afterwards); the smoothed statistics are kept.
    ``at_forward``: called by :class:`AutoAttach` while ``model``'s forward pre-hooks run.
    """
    states = _fsdp_states(model)
    _check_attachable(optimizer, model, states, at_forward)
    engine = optimizer._engine
    if isinstance(engine, FSDP2Engine):
        if engine.hooks is not None:
            engine.hooks.remove()
    else:
        check_not_mixed(optimizer.param_groups)
        engine = FSDP2Engine()
        optimizer._install_engine(engine, new_capture=True)  # the plain parameters' hooks go dead
    engine.hooks = FSDP2Hooks(optimizer, states)
    optimizer._stop_auto_attach()
    if at_forward:
        engine.hooks.hook_when_forward_ends(model)
    return engine.hooks


class AutoAttach:
    """Calls :func:`attach` at the first forward of the ``fully_shard`` module that holds the
    optimizer's parameters (see the module docstring); :meth:`remove` stops it, and so does the
    optimizer's death.

    One global module forward pre-hook per waiting optimizer. Modules that are not ``fully_shard``
    modules cost one check per call; a ``fully_shard`` module holding none of the optimizer's
    parameters is looked at once per state of the optimizer's parameter list (a swap makes it
    look again).
    """

    def __init__(self, optimizer: AdaScale) -> None:
        from torch.nn.modules.module import register_module_forward_pre_hook

        self._optimizer_ref = weakref.ref(optimizer)
        self._passed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> signature
        self._handle = register_module_forward_pre_hook(self._pre_forward)
        self._finalizer = weakref.finalize(optimizer, self._handle.remove)

    @property
    def active(self) -> bool:
        """Whether the global hook is still registered."""
        return self._finalizer.alive

    def remove(self) -> None:
        self._handle.remove()
        self._finalizer.detach()

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if not is_fsdp_module(module):
            if is_fsdp1_module(module):  # FSDP1: its flat parameters exist already, hook them now
                optimizer = self._optimizer_ref()
                if optimizer is not None:
                    from .fsdp1 import first_forward

                    first_forward(optimizer, module)
            return
        optimizer = self._optimizer_ref()
        if optimizer is None:
            return
        groups = optimizer.param_groups
        signature = _groups_signature(groups)
        if self._passed.get(module) == signature:
            return
        sharded = _sharded_ids(_fsdp_states(module))
        if not any(id(p) in sharded for g in groups for p in g["params"]):
            self._passed[module] = signature  # another model's, or not swapped in (yet)
            return
        attach(optimizer, module, at_forward=True)  # removes this hook
