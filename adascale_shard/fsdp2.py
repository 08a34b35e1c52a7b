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
  (``MicroGradCapture.sharded_grads = True``); they are taken when the last backward pass ends,
  so ``clip_grad_norm_`` between backward and ``step()`` does not change them.

When the hooks attach: :func:`attach` (called by :meth:`AdaScale.attach`) registers a forward
pre-hook on every module that ``fully_shard`` was applied to. It runs after FSDP2's own pre-hook
(FSDP2 prepends its hook), when the unsharded parameters exist, and hooks each unsharded parameter
the first time it is seen (FSDP2 re-uses the same tensor for every all-gather, with
``reshard_after_forward`` True or False; a re-created one would be hooked on its next forward).
The optimizer's ``param_groups`` are re-read whenever they change, so a later swap of the
optimizer's parameters (Accelerate's ``prepare``) is followed.

Limits: 1-D meshes only (no HSDP, no FSDP2 + tensor parallelism), and every trainable parameter
of the optimizer must be sharded by ``fully_shard`` (wrap the root module too).

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
import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .capture import MicroGradCapture
    from .optimizer import AdaScale

__all__ = [
    "is_dtensor",
    "has_dtensor_params",
    "build_capture",
    "attach",
    "FSDP2Hooks",
    "check_hooks_fired",
    "AdaScaleStateful",
]

logger = logging.getLogger(__name__)

ATTACH_FIX = (
    "call opt.attach(model) once, after fully_shard(...) (or accelerator.prepare(...)) and before "
    "the first forward"
)


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``, without importing the DTensor package.

    If the package was never imported, no DTensor can exist.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def has_dtensor_params(param_groups: Iterable[dict[str, Any]]) -> bool:
    """True if any parameter of the groups is a DTensor (FSDP2's sharded parameters)."""
    return any(is_dtensor(p) for group in param_groups for p in group["params"])


def _check_not_mixed(param_groups: Sequence[dict[str, Any]]) -> None:
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
            "(fully_shard(model) after the submodules)"
        )


def build_capture(param_groups: Sequence[dict[str, Any]]) -> MicroGradCapture:
    """A capture for DTensor parameters: no hooks on the sharded tensors (they never fire), and
    ``||G||^2`` summed over ranks. The hooks come from :func:`attach`."""
    from .capture import MicroGradCapture

    _check_not_mixed(param_groups)
    capture = MicroGradCapture([group["params"] for group in param_groups], hook=False)
    capture.sharded_grads = True
    return capture


def _fsdp_states(model: nn.Module) -> list[Any]:
    """The FSDP2 states of ``model`` and its submodules, each once, in module order."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    states: list[Any] = []
    seen: set[int] = set()
    for module in model.modules():
        state = _get_module_fsdp_state(module)
        if state is not None and id(state) not in seen:
            seen.add(id(state))
            states.append(state)
    return states


def _check_group(param_group: Any, ranks: int) -> None:
    """Refuse the FSDP2 layouts whose reduced gradient is not the mean of the micro-gradients
    over ``ranks`` (the estimator's normalisation)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, FSDPMeshInfo

    mesh_info = param_group.mesh_info
    name = param_group._module_fqn or "<module>"
    plain = isinstance(mesh_info, FSDPMeshInfo) and not isinstance(mesh_info, DDPMeshInfo)
    if not plain or mesh_info.mesh.ndim != 1:
        raise NotImplementedError(
            f"AdaScale on FSDP2 supports a 1-D device mesh (plain sharding); {name} uses "
            f"{type(mesh_info).__name__} on a {mesh_info.mesh.ndim}-D mesh (HSDP / replicate / "
            "2-D). Use fully_shard(module, mesh=init_device_mesh(device, (world_size,)))"
        )
    if mesh_info.shard_mesh_size != ranks:
        raise ValueError(
            f"AdaScale's process group has {ranks} ranks but FSDP2 shards {name} over "
            f"{mesh_info.shard_mesh_size}: pass AdaScale(..., process_group=<the FSDP2 mesh's group>)"
        )
    factor = param_group.gradient_divide_factor
    if factor is not None and factor != mesh_info.shard_mesh_size:
        raise ValueError(
            f"{name} has set_gradient_divide_factor({factor}); AdaScale needs FSDP2's default "
            f"average over the {mesh_info.shard_mesh_size} ranks (the applied gradient must be the "
            "mean of the micro-gradients). Remove the custom divide factor and scale the loss instead"
        )


class FSDP2Hooks:
    """The hooks :func:`attach` installs; :meth:`remove` takes them off.

    Forward pre-hooks on every ``fully_shard`` module hook the unsharded parameters into the
    optimizer's capture, with the sharded parameter as the ``.grad`` owner (its DTensor gradient
    is what the optimizer applies, and what tells a ``zero_grad`` between passes).
    """

    def __init__(self, optimizer: AdaScale, states: Sequence[Any]) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        from .distributed import world_size

        self._optimizer_ref = weakref.ref(optimizer)
        self._ranks = world_size(optimizer.process_group)
        self._states = list(states)
        self._hooked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._group_of: dict[int, int] = {}
        self._signature: tuple[tuple[int, int], ...] = ()
        self._sync_groups(optimizer)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for state in self._states:
            for module in state._modules:
                self._handles.append(module.register_forward_pre_hook(self._make_pre_forward(state)))
        # Parameters already unsharded now (reshard_after_forward=False after a forward) get
        # their hook at once; the others on their next forward.
        for state in self._states:
            self._hook_unsharded(state, optimizer)

    # -- groups -------------------------------------------------------------------------------
    def _sync_groups(self, optimizer: AdaScale) -> None:
        """Follow the optimizer's ``param_groups`` (a swap of its parameters, a new group)."""
        groups = optimizer.param_groups
        signature = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if signature == self._signature:
            return
        capture = optimizer._capture
        _check_not_mixed(groups)
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
        for param_group in state._fsdp_param_groups:
            factor = param_group.gradient_divide_factor
            if factor is not None and factor != self._ranks:
                _check_group(param_group, self._ranks)  # raises with the fix
            for fsdp_param in param_group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is None or unsharded in self._hooked or not unsharded.requires_grad:
                    continue
                index = self._group_of.get(id(fsdp_param.sharded_param))
                if index is None:
                    continue  # not optimised by this optimizer
                if is_dtensor(unsharded):
                    raise NotImplementedError(
                        f"AdaScale on FSDP2: {fsdp_param._param_fqn} is a DTensor also when "
                        "unsharded (FSDP2 combined with tensor parallelism), which is not supported"
                    )
                self._hooked[unsharded] = capture.hook_parameter(
                    unsharded, index, owner=fsdp_param.sharded_param
                )

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


def _check_attachable(optimizer: AdaScale, model: nn.Module, states: Sequence[Any]) -> None:
    """Every check of :func:`attach`, before anything is changed."""
    from .distributed import world_size

    if optimizer._capture.passes > 0:
        raise RuntimeError(
            "AdaScale.attach was called after backward passes that were not consumed by step(): "
            "call attach(model) before the first backward"
        )
    if not states:
        raise ValueError(
            f"AdaScale.attach: {type(model).__name__} has no fully_shard module. attach() is for "
            "FSDP2: apply torch.distributed.fsdp.fully_shard first (or call it after "
            "accelerator.prepare); DDP and single-process training need no attach()"
        )
    ranks = world_size(optimizer.process_group)
    for state in states:
        for param_group in state._fsdp_param_groups:
            _check_group(param_group, ranks)
    sharded = {
        id(fsdp_param.sharded_param)
        for state in states
        for param_group in state._fsdp_param_groups
        for fsdp_param in param_group.fsdp_params
    }
    foreign = [
        tuple(p.shape)
        for g in optimizer.param_groups
        for p in g["params"]
        if p.requires_grad and id(p) not in sharded
    ]
    if foreign:
        raise ValueError(
            f"AdaScale.attach: {len(foreign)} of the optimizer's parameters (shapes "
            f"{foreign[:4]}) are not the sharded parameters of the fully_shard modules of this "
            "model. Build the optimizer from model.parameters() after fully_shard(model), or "
            "let accelerator.prepare swap them, then attach the same model"
        )


def attach(optimizer: AdaScale, model: nn.Module) -> FSDP2Hooks:
    """Hook ``optimizer``'s statistics into the FSDP2-sharded ``model`` (see the module docstring).

    Rebuilds the optimizer's capture for sharded gradients if it was built on plain parameters
    (an optimizer created before ``fully_shard`` whose parameters were swapped afterwards); the
    smoothed statistics are kept.
    """
    states = _fsdp_states(model)
    _check_attachable(optimizer, model, states)
    previous = getattr(optimizer, "_fsdp2_hooks", None)
    if previous is not None:
        previous.remove()
    if not optimizer._capture.sharded_grads:
        optimizer._capture.detach()  # hooks on plain parameters that FSDP2 replaced
        optimizer._capture = build_capture(optimizer.param_groups)
    return FSDP2Hooks(optimizer, states)


def check_hooks_fired(optimizer: AdaScale) -> None:
    """Raise if DTensor gradients exist although no backward pass was ever recorded.

    Called by ``step()`` when no pass has been recorded since the optimizer was built. A
    ``step()`` with all-zero gradients (torch's distributed checkpoint builds optimizer state that
    way) is fine; real gradients with no recorded pass mean the hooks never fired.
    """
    from .capture import local_shard

    grads = [
        local_shard(p.grad)
        for group in optimizer.param_groups
        for p in group["params"]
        if is_dtensor(p) and p.grad is not None
    ]
    if not grads or not any(bool(g.count_nonzero()) for g in grads if g.numel()):
        return
    if getattr(optimizer, "_fsdp2_hooks", None) is None:
        raise RuntimeError(
            "AdaScale: the FSDP2 (DTensor) parameters have gradients but no backward pass was "
            "recorded, because the hooks were never attached; the gain would silently stay 1. Fix: "
            f"{ATTACH_FIX}"
        )
    raise RuntimeError(
        "AdaScale: the FSDP2 (DTensor) parameters have gradients but the hooks attached by "
        "attach(model) never fired: the model given to attach() is not the one that ran forward "
        "and backward, or its gradients were computed without backward(). Attach the model you "
        "train"
    )


class AdaScaleStateful:
    """A ``torch.distributed.checkpoint`` ``Stateful`` for an FSDP2 model and its AdaScale.

    ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` keep only the base optimizer's
    ``state`` and ``param_groups`` (they drop AdaScale's ``"adascale"`` key), so this wrapper
    saves three entries: the sharded model, the sharded base-optimizer state, and AdaScale's
    estimator (plain floats, identical on every rank)::

        from adascale_shard.fsdp2 import AdaScaleStateful
        dcp.save({"train": AdaScaleStateful(model, opt)}, checkpoint_id=path)
        ...
        dcp.load({"train": AdaScaleStateful(model, opt)}, checkpoint_id=path)  # fresh process

    ``set_optimizer_state_dict`` calls ``step()`` with zero gradients on a fresh optimizer to
    create its state; that ``step()`` records no backward pass, so ``tau`` does not move.
    """

    def __init__(self, model: nn.Module, optimizer: AdaScale, *, options: Any = None) -> None:
        from .optimizer import AdaScale

        if not isinstance(optimizer, AdaScale):
            raise TypeError(
                f"AdaScaleStateful needs an AdaScale optimizer, got {type(optimizer).__name__}"
            )
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from .optimizer import STATE_DICT_KEY

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        return {
            "model": model_state,
            "optim": optim_state,
            STATE_DICT_KEY: self.optimizer.estimator_state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from .optimizer import STATE_DICT_KEY

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )
        self.optimizer.load_estimator_state_dict(state_dict[STATE_DICT_KEY])
