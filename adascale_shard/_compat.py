"""Every private API of torch, FSDP1, FSDP2, DeepSpeed and Accelerate that adascale_shard uses, in
one place: no other module of the package names a private attribute of an object it does not own
(``tests/unit/test_layers.py`` reads the source to hold this).

Each accessor checks, the first time it is used, that the private attribute exists in the
installed version, and otherwise fails with what to install (the way the DeepSpeed integration
checks the engine methods it patches). Nothing here imports FSDP2, DTensor or DeepSpeed before it
is asked for.
"""

from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ._docs import see

__all__ = [
    "current_graph_task_id",
    "current_autograd_node",
    "will_engine_execute_node",
    "queue_callback",
    "outer_backward_node",
    "foreach_norm",
    "is_dtensor",
    "is_flat_parameter",
    "is_fsdp1_flattened",
    "is_fsdp_module",
    "local_shard",
    "fsdp_state",
    "fsdp_param_groups",
    "fsdp_mesh_info_classes",
    "global_grad_norm",
    "deepspeed_adam_configuration",
    "accelerator_optimizers",
    "is_fsdp1_module",
    "fsdp1_modules",
    "fsdp1_layout",
    "fsdp1_pending_grad",
    "tensor_version",
    "sparse_values",
    "python_frame",
    "init_optimizer_hooks",
    "fsdp_state_modules",
    "fsdp_param_group_name",
    "fsdp_param_name",
    "fsdp_unsharded_param",
    "accelerator_schedulers",
    "DEEPSPEED_ENGINE_METHODS",
    "deepspeed_engine_methods",
    "deepspeed_method_names",
    "missing",
]

TORCH_INSTALL = "pip install 'torch>=2.6,<2.15'"
DEEPSPEED_INSTALL = "pip install -e '.[deepspeed]' in a clone of adascale-shard (deepspeed>=0.19.8,<0.20)"


def missing(what: str, package: str, install: str, pointer: str) -> RuntimeError:
    """The error for a private API that this installed version lacks; ``pointer`` is
    ``see(anchor)``, its troubleshooting entry."""
    return RuntimeError(
        f"adascale_shard needs {what}, which the installed {package} does not have. Install a tested "
        f"version: {install}" + pointer
    )


@functools.cache
def _torch_private(owner: str, name: str) -> Callable[..., Any]:
    obj = {"torch._C": torch._C, "torch": torch, "engine": torch.autograd.Variable._execution_engine}[owner]
    fn = getattr(obj, name, None)
    if fn is None:
        raise missing(f"{owner}.{name}", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing"))
    return fn


def current_graph_task_id() -> Callable[[], int]:
    """``torch._C._current_graph_task_id``: which backward pass a hook runs in."""
    return _torch_private("torch._C", "_current_graph_task_id")


def current_autograd_node() -> Any:
    """The autograd node being evaluated (``torch._C._current_autograd_node``)."""
    return _torch_private("torch._C", "_current_autograd_node")()


def will_engine_execute_node(node: Any) -> bool:
    """``torch._C._will_engine_execute_node``; raises ``RuntimeError`` for a leaf's node inside
    ``torch.autograd.grad()``."""
    return _torch_private("torch._C", "_will_engine_execute_node")(node)


def outer_backward_node() -> Any:
    """The autograd node of the outer backward pass whose Python ``backward`` runs the backward pass
    now running (torch's reentrant ``checkpoint`` calls ``torch.autograd.backward`` inside
    ``CheckpointFunction.backward``), or ``None`` when this backward is not nested. Read from the
    Python frames of this thread (the nested backward runs on the thread of the outer node): the
    ``ctx`` of a ``backward(ctx, ...)`` frame is the outer graph's node."""
    function_node = torch.autograd.function.BackwardCFunction
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "backward":
            ctx = frame.f_locals.get("ctx")
            if isinstance(ctx, function_node):
                return ctx
        frame = frame.f_back
    return None


def python_frame(depth: int) -> Any:
    """The Python frame ``depth`` calls above the caller of this function (``sys._getframe``)."""
    try:
        getframe = sys._getframe
    except AttributeError as err:
        raise missing("sys._getframe", f"Python {sys.version.split()[0]}", "CPython", see("a-private-api-is-missing")) from err
    return getframe(depth + 1)


def tensor_version(tensor: torch.Tensor) -> int:
    """``Tensor._version``: the counter of in-place changes to ``tensor`` (a ``zero_()`` moves it)."""
    try:
        return tensor._version
    except AttributeError as err:
        raise missing("torch.Tensor._version", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")) from err


def sparse_values(tensor: torch.Tensor) -> torch.Tensor:
    """``Tensor._values()``: the stored values of a sparse COO tensor, without coalescing it."""
    try:
        values = tensor._values
    except AttributeError as err:
        raise missing("torch.Tensor._values", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")) from err
    return values()


_OPTIMIZER_HOOK_TABLES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


@functools.cache
def _check_optimizer_hooks() -> None:
    declared = getattr(torch.optim.Optimizer, "__annotations__", {})
    absent = [name for name in _OPTIMIZER_HOOK_TABLES if name not in declared]
    if not hasattr(torch.optim.Optimizer, "_patch_step_function"):
        absent.append("_patch_step_function")
    if absent:
        raise missing(
            f"torch.optim.Optimizer's {', '.join(absent)}", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")
        )


def init_optimizer_hooks(optimizer: torch.optim.Optimizer) -> None:
    """What ``torch.optim.Optimizer.__init__`` sets up for its hooks, for an optimizer that does not
    call it: the six (empty) hook tables, the step wrapper (``_patch_step_function``) and the flag
    that the CUDA-graph capture warning was given."""
    _check_optimizer_hooks()
    for name in _OPTIMIZER_HOOK_TABLES:
        setattr(optimizer, name, OrderedDict())
    optimizer._patch_step_function()
    optimizer._warned_capturable_if_run_uncaptured = True


def queue_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the running backward pass ends (the autograd engine's final callbacks)."""
    _torch_private("engine", "queue_callback")(callback)


def foreach_norm() -> Callable[..., list[torch.Tensor]]:
    """``torch._foreach_norm``: one fused kernel for the norms of many tensors."""
    return _torch_private("torch", "_foreach_norm")


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``, without importing the DTensor package (if
    it was never imported, no DTensor can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_flat_parameter(tensor: Any) -> bool:
    """True for FSDP1's ``FlatParameter`` (``use_orig_params=False``), without importing FSDP1."""
    module = sys.modules.get("torch.distributed.fsdp._flat_param")
    cls = getattr(module, "FlatParameter", None)
    return cls is not None and isinstance(tensor, cls)


def is_fsdp1_flattened(tensor: Any) -> bool:
    """True for a parameter FSDP1 flattened into a ``FlatParameter`` (it marks each, and the flat
    parameter itself, with ``_fsdp_flattened``)."""
    return bool(getattr(tensor, "_fsdp_flattened", False))


def is_fsdp_module(module: Any) -> bool:
    """True for a module that ``fully_shard`` was applied to (``torch.distributed.fsdp.FSDPModule``,
    public), without importing FSDP (if it was never imported, no such module can exist)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and isinstance(module, cls)


def local_shard(grad: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor gradient (FSDP2), or the tensor itself."""
    # DTensor.to_local() is an autograd Function, costly per call on many tensors
    # (benchmarks/overhead_micro.py); the shard it returns is the DTensor's _local_tensor.
    local = getattr(grad, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    return grad.to_local() if hasattr(grad, "to_local") else grad


def fsdp_state(module: torch.nn.Module) -> Any:
    """The FSDP2 state of ``module`` (``None`` if ``fully_shard`` was not applied to it)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
    except ImportError as err:
        raise missing(
            "FSDP2's _get_module_fsdp_state", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")
        ) from err
    return _get_module_fsdp_state(module)


def fsdp_param_groups(state: Any) -> list[Any]:
    """An FSDP2 state's parameter groups (each with ``fsdp_params``, ``mesh_info``, ...)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        raise missing(
            "FSDPState._fsdp_param_groups", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")
        )
    return groups


def _fsdp_private(obj: Any, name: str, owner: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError as err:
        raise missing(f"FSDP2's {owner}.{name}", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")) from err


def fsdp_state_modules(state: Any) -> tuple[torch.nn.Module, ...]:
    """The modules one FSDP2 state manages (``FSDPState._modules``: one per ``fully_shard`` call)."""
    return _fsdp_private(state, "_modules", "FSDPState")


def fsdp_param_group_name(param_group: Any) -> str | None:
    """The qualified name of the module an FSDP2 parameter group belongs to (``_module_fqn``)."""
    return _fsdp_private(param_group, "_module_fqn", "FSDPParamGroup")


def fsdp_param_name(fsdp_param: Any) -> str | None:
    """The qualified name of an FSDP2 parameter (``FSDPParam._param_fqn``)."""
    return _fsdp_private(fsdp_param, "_param_fqn", "FSDPParam")


@functools.cache
def _check_unsharded_param(cls: type) -> None:
    if "_unsharded_param" not in getattr(cls, "__annotations__", {}):
        raise missing("FSDP2's FSDPParam._unsharded_param", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing"))


def fsdp_unsharded_param(fsdp_param: Any) -> torch.nn.Parameter | None:
    """An FSDP2 parameter's unsharded parameter (``FSDPParam._unsharded_param``), ``None`` before
    its first all-gather creates it (the class declares it; checked once per class)."""
    _check_unsharded_param(type(fsdp_param))
    return getattr(fsdp_param, "_unsharded_param", None)


def fsdp_mesh_info_classes() -> tuple[type, type]:
    """FSDP2's ``(FSDPMeshInfo, DDPMeshInfo)``: which layout a parameter group is sharded with."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, FSDPMeshInfo
    except ImportError as err:
        raise missing(
            "FSDP2's FSDPMeshInfo and DDPMeshInfo",
            f"torch {torch.__version__}",
            TORCH_INSTALL,
            see("a-private-api-is-missing"),
        ) from err
    return FSDPMeshInfo, DDPMeshInfo


def global_grad_norm(wrapper: Any) -> Any:
    """A DeepSpeed ZeRO/fp16/bf16 wrapper's pre-clip ``_global_grad_norm`` of the last step."""
    if not hasattr(wrapper, "_global_grad_norm"):
        raise missing(
            f"the gradient norm of DeepSpeed's {type(wrapper).__name__} (_global_grad_norm)",
            "DeepSpeed",
            DEEPSPEED_INSTALL,
            see("deepspeed-wrapper-has-no-global-grad-norm"),
        )
    return wrapper._global_grad_norm


def deepspeed_adam_configuration(engine: Any) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """``DeepSpeedEngine.get_optimizer_configuration``: the Adam class and keyword arguments that
    DeepSpeed's own ``"type": "AdamW"`` block uses (``DeepSpeedCPUAdam`` under ZeRO-Offload)."""
    method = getattr(engine, "get_optimizer_configuration", None)
    if method is None:
        raise missing(
            "DeepSpeedEngine.get_optimizer_configuration (the Adam that DeepSpeed picks for ZeRO-Offload)",
            "DeepSpeed",
            DEEPSPEED_INSTALL,
            see("a-private-api-is-missing"),
        )
    return method


def _accelerator_prepared(accelerator: Any, name: str) -> list[Any]:
    prepared = getattr(accelerator, name, None)
    if prepared is None:
        raise missing(
            f"Accelerator.{name}",
            "accelerate",
            "pip install -e '.[accelerate]' in a clone of adascale-shard",
            see("a-private-api-is-missing"),
        )
    return prepared


def accelerator_optimizers(accelerator: Any) -> list[Any]:
    """The optimizers an ``accelerate.Accelerator`` prepared (its ``_optimizers``)."""
    return _accelerator_prepared(accelerator, "_optimizers")


def accelerator_schedulers(accelerator: Any) -> list[Any]:
    """The schedulers an ``accelerate.Accelerator`` prepared (its ``_schedulers``)."""
    return _accelerator_prepared(accelerator, "_schedulers")


# DeepSpeedEngine's private methods that the DeepSpeed patch wraps, by the name the patch uses.
DEEPSPEED_ENGINE_METHODS = {
    "configure_basic_optimizer": "_configure_basic_optimizer",
    "configure_optimizer": "_configure_optimizer",
    "is_supported_optimizer": "_is_supported_optimizer",
    "configure_lr_scheduler": "_configure_lr_scheduler",
    "take_model_step": "_take_model_step",
}


def deepspeed_engine_methods(engine_cls: type) -> dict[str, Callable[..., Any]]:
    """DeepSpeedEngine's own private methods that the patch wraps, keyed as in
    ``DEEPSPEED_ENGINE_METHODS``."""
    absent = [name for name in DEEPSPEED_ENGINE_METHODS.values() if not hasattr(engine_cls, name)]
    if absent:
        raise missing(f"DeepSpeedEngine's {', '.join(absent)}", "DeepSpeed", DEEPSPEED_INSTALL, see("a-private-api-is-missing"))
    return {key: getattr(engine_cls, name) for key, name in DEEPSPEED_ENGINE_METHODS.items()}


def deepspeed_method_names(methods: dict[str, Any]) -> dict[str, Any]:
    """``methods`` keyed as in ``DEEPSPEED_ENGINE_METHODS``, rekeyed by DeepSpeedEngine's names."""
    return {DEEPSPEED_ENGINE_METHODS[key]: method for key, method in methods.items()}


# -- FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) --------------------------------------
def is_fsdp1_module(module: Any) -> bool:
    """True for an FSDP1 ``FullyShardedDataParallel`` instance, without importing FSDP1."""
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    return cls is not None and isinstance(module, cls)


def fsdp1_modules(model: torch.nn.Module) -> list[Any]:
    """The FSDP1 instances in ``model`` (itself included), outermost first; [] without FSDP1."""
    if "torch.distributed.fsdp.fully_sharded_data_parallel" not in sys.modules:
        return []
    return [m for m in model.modules() if is_fsdp1_module(m)]


def fsdp1_layout(module: Any) -> dict[str, Any] | None:
    """What AdaScale needs of one FSDP1 instance, or ``None`` if it manages no parameters:
    ``flat_param``; ``originals``, the original parameters it flattens (``use_orig_params=True``),
    else ``None``; ``sharded`` (whether its gradient is sharded after the reduction);
    ``shard_ranks`` (the ranks one shard group spans) and ``data_parallel_ranks`` (the ranks the
    gradient is averaged over: ``shard_ranks`` times the replicas of a hybrid strategy);
    ``comm_hook`` (a custom reduction was registered); ``offload`` (``CPUOffload(offload_params=True)``);
    ``strategy`` (its name)."""
    if not hasattr(module, "_handle"):
        raise missing(
            "FSDP1's FullyShardedDataParallel._handle", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")
        )
    handle = module._handle
    if handle is None:
        return None
    try:
        flat_param = handle.flat_param
        group = module.process_group
        inter = getattr(module, "_inter_node_pg", None)
        strategy = handle._sharding_strategy
        layout = {
            "flat_param": flat_param,
            "originals": list(flat_param._params) if handle._use_orig_params else None,
            "sharded": bool(handle.uses_sharded_strategy),
            "shard_ranks": group.size(),
            "comm_hook": module._comm_hook is not None,
            "offload": bool(handle._offload_params),
            "strategy": getattr(strategy, "name", str(strategy)),
        }
    except AttributeError as err:
        raise missing(f"FSDP1's {err.name}", f"torch {torch.__version__}", TORCH_INSTALL, see("a-private-api-is-missing")) from err
    hybrid = layout["strategy"] in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
    layout["data_parallel_ranks"] = layout["shard_ranks"] * (inter.size() if hybrid and inter is not None else 1)
    return layout


def fsdp1_pending_grad(flat_param: Any) -> Any:
    """The gradient FSDP1 accumulates into across backward passes: ``.grad``, or, while a backward
    pass runs, the shard FSDP1 moved aside (``_saved_grad_shard``, a new tensor on its storage)."""
    grad = flat_param.grad
    return getattr(flat_param, "_saved_grad_shard", None) if grad is None else grad
