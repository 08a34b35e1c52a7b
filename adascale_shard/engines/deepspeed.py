"""DeepSpeed ZeRO-0/1/2/3: where ``||G||^2`` comes from once ``deepspeed.initialize`` has wrapped
AdaScale (connected by :mod:`adascale_shard.integrations.deepspeed`'s patch, via :func:`attach`).

* ZeRO-1/2/3, bf16, fp16: DeepSpeed wraps AdaScale in an optimizer (a "wrapper") that computes
  the pre-clip global norm of the reduced gradient before it calls AdaScale's ``step()``;
  :class:`WrapperNormEngine` reads it. DeepSpeed reports one norm, so the statistics become one
  whole-model group. Under fp16 the norm and the micro-gradients are brought to the units of the
  unscaled gradient per wrapper kind (:data:`_FP16_WRAPPERS`, docs/deepspeed-fp16.md).
* ZeRO-0 in fp32 (no wrapper): every rank holds the full reduced ``.grad`` right after the
  engine's all-reduce and before it clips them; a replicated engine measures it there.

Local micro-gradients come from the capture's tensor hooks, which fire before DeepSpeed's own
reduction hooks in every stage (ZeRO-3 keeps the same ``Parameter`` objects). ZeRO frees or moves
``.grad`` after every pass, so these engines do not detect resets: an update the engine skips
(fp16 overflow) is dropped by the patch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .._compat import DEEPSPEED_INSTALL, global_grad_norm
from .._docs import see
from .base import Engine
from .replicated import ReplicatedEngine

if TYPE_CHECKING:  # pragma: no cover
    from ..capture import MicroGradCapture
    from ..optimizer import AdaScale

__all__ = ["attach", "check_offload", "check_zero_layout", "WrapperNormEngine", "refuse_unscaled_fp16_step"]


def _loss_scale(wrapper: Any) -> float:
    scale = getattr(wrapper, "loss_scale", None)
    if scale is None:
        scale = getattr(wrapper, "cur_scale", 1.0)
    scale = float(scale)
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def check_zero_layout(engine: Any) -> None:
    """Refuse the ZeRO layouts whose statistics are not proven exact (called at
    ``deepspeed.initialize``, before :func:`attach`).

    * ZeRO++ hpZ (``zero_hpz_partition_size`` > 1, ZeRO-3): a secondary copy of the parameters
      partitioned within a node; not run against the single-process reference here, so refused
      rather than trusted.
    * MiCS (``mics_shard_size``): DeepSpeed 0.19.8 removed it and refuses the key itself
      (``runtime/config.py``, ``_REMOVED_ZERO_CONFIG_KEYS``); nothing to check here.
    """
    hpz = int(getattr(engine, "zero_hpz_partition_size", lambda: 1)() or 1)
    if engine.zero_optimization_stage() == 3 and hpz > 1:
        raise NotImplementedError(
            f"AdaScale does not support ZeRO++ hierarchical partitioning yet "
            f"(zero_optimization.zero_hpz_partition_size={hpz} with ZeRO-3): its statistics are not "
            "verified against the single-process reference. Remove zero_hpz_partition_size (or set "
            "it to 1) from the DeepSpeed config" + see("zero-hpz-not-supported")
        )


def _device(config: Any) -> str:
    device = getattr(config, "device", "none")
    return str(getattr(device, "value", device))


def _offload_setting(engine: Any, name: str) -> Any:
    """``zero_optimization.<name>`` when it offloads somewhere (``"device"`` not ``"none"``)."""
    config = getattr(engine, f"zero_{name}")() if engine.zero_optimization() else None
    return config if config is not None and _device(config) != "none" else None


def check_offload(engine: Any) -> None:
    """Refuse, before DeepSpeed builds its ZeRO wrapper around AdaScale, the ZeRO-Offload variants
    whose statistics were not checked. ``offload_optimizer`` and ``offload_param`` to the CPU are
    supported: DeepSpeed reduces, offloads and measures ``_global_grad_norm`` after the capture's
    hooks have read the local micro-gradients (tests/distributed/test_deepspeed_offload.py)."""
    for name in ("offload_optimizer", "offload_param"):
        config = _offload_setting(engine, name)
        if config is not None and _device(config) == "nvme":
            raise ValueError(
                f'AdaScale does not support zero_optimization.{name} with "device": "nvme" (NVMe '
                "offload needs DeepSpeed's async_io op and libaio, and AdaScale's statistics were not "
                f'checked with it): use "{name}": {{"device": "cpu"}}, or remove {name}'
                + see("zero-offload-to-nvme-not-supported")
            )
    config = _offload_setting(engine, "offload_optimizer")
    if config is None:
        return
    ratio, super_offload = float(getattr(config, "ratio", 1.0)), bool(getattr(config, "super_offload", False))
    if ratio != 1.0 or super_offload or getattr(engine, "zenflow", False):
        which = "ratio" if ratio != 1.0 else "super_offload" if super_offload else "zenflow"
        raise ValueError(
            f"AdaScale does not support partial ZeRO-Offload (zero_optimization.offload_optimizer.{which}"
            f"{'=' + format(ratio, 'g') if which == 'ratio' else ''}): DeepSpeed then steps a part of the "
            "parameters with its own second optimizer, outside AdaScale. Offload all optimizer states: "
            f'remove "{which}" (ratio 1.0, the default)' + see("partial-zero-offload-not-supported")
        )


def attach(engine: Any, adascale: AdaScale) -> None:
    """Install the engine for the way DeepSpeed wrapped ``adascale`` (before training starts)."""
    # The JSON knows the global batch: a scale beyond it would need a base batch under one sample.
    scale, global_batch = adascale.config.scale, engine.train_batch_size()
    if scale is not None and scale > global_batch:
        raise ValueError(
            f"AdaScale scale={scale:g} is larger than DeepSpeed's global batch, train_batch_size="
            f"{global_batch} samples: S = global_batch / base_batch would need a base batch under one "
            f"sample. Set scale to {global_batch} / (the batch the learning rate was tuned at), or "
            "null for S = N (one micro-batch is the base batch)" + see("scale-larger-than-the-global-batch")
        )
    if engine.optimizer is adascale:
        _attach_replicated(engine, adascale)
    else:
        adascale._install_engine(WrapperNormEngine(engine), merge_groups=True)


def _attach_replicated(engine: Any, adascale: AdaScale) -> None:
    """ZeRO-0 in fp32: measured right after the engine's all-reduce, before ``_take_model_step``
    clips (autograd returns before DeepSpeed reduces)."""
    replicated = ReplicatedEngine(adascale._engine.replicas, measure_at_step=False, detects_reset=False)
    adascale._install_engine(replicated)
    allreduce = engine.allreduce_gradients

    def allreduce_gradients(*args, **kwargs):
        result = allreduce(*args, **kwargs)
        if engine.is_gradient_accumulation_boundary() and adascale._capture.passes:
            replicated.snapshot(adascale._capture)
        return result

    engine.allreduce_gradients = allreduce_gradients


def before_model_step(adascale: AdaScale) -> None:
    """Called by the patch before the engine's model step: the loss scale of this window's
    backward passes, read before the wrapper updates it in its ``step()``."""
    if isinstance(adascale._engine, WrapperNormEngine):
        adascale._engine.record_backward_scale()


class WrapperNormEngine(Engine):
    """``||G||^2`` from a ZeRO/bf16/fp16 wrapper's ``_global_grad_norm`` (already reduced over
    the ranks and pre-clip), in the units of the unscaled gradient."""

    detects_reset = False  # ZeRO frees .grad after each pass; the patch ends skipped windows

    def __init__(self, engine: Any) -> None:
        self.wrapper = engine.optimizer
        global_grad_norm(self.wrapper)  # checked now, with the install command if missing
        self._backward_scale, self._norm_factor = _fp16_wrapper_kind(engine, self.wrapper)
        refuse_unscaled_fp16_step(engine, self.wrapper)
        self.loss_scale = 1.0

    def record_backward_scale(self) -> None:
        self.loss_scale = self._backward_scale(self.wrapper)

    def grad_sqr_is_part(self, capture: MicroGradCapture) -> bool:
        return False

    def take_grad_sqr(self, capture: MicroGradCapture) -> tuple[torch.Tensor, torch.Tensor]:
        norm = global_grad_norm(self.wrapper)
        if norm is None:
            raise RuntimeError(
                "AdaScale needs DeepSpeed's gradient norm, but it was not computed: remove "
                '"compute_grad_norm": false from zero_optimization' + see("deepspeed-gradient-norm-not-computed")
            )
        # loss_scale: the backward passes' scale; _loss_scale(wrapper): after the wrapper's update.
        factor = self._norm_factor(self.loss_scale, _loss_scale(self.wrapper))
        norm = torch.as_tensor(norm, dtype=torch.float64, device=capture.device) * factor
        return norm.square().reshape(1), torch.zeros(0, dtype=torch.float64, device=capture.device)


_FP16_WRAPPERS = {
    # Not a ZeROOptimizer: the engine never scales its loss (only its unused backward() would), so the
    # gradients and their norm are unscaled while loss_scale grows (its "norm*scale" comment is moot).
    ("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer"): (
        lambda wrapper: 1.0,
        lambda backward, now: 1.0 / backward,
    ),
    # Scaled by loss_scaler; the norm is divided by prev_scale, the backward passes' scale.
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"): (
        _loss_scale,
        lambda backward, now: 1.0,
    ),
    # Scaled by loss_scaler; the norm is divided by the scale after _update_scale (new on a growth).
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"): (
        _loss_scale,
        lambda backward, now: now / backward,
    ),
}




def _fp16_wrapper_kind(engine: Any, wrapper: Any) -> tuple[Any, Any]:
    """The :data:`_FP16_WRAPPERS` entry of the class whose ``step()`` the wrapper runs. Without
    fp16 nothing is scaled; with fp16 an unknown wrapper is refused rather than guessed."""
    owner = next((cls for cls in type(wrapper).__mro__ if "step" in vars(cls)), type(wrapper))
    kind = _FP16_WRAPPERS.get((owner.__module__, owner.__qualname__))
    if kind is not None:
        return kind
    if engine.fp16_enabled():
        raise RuntimeError(
            f"AdaScale does not know how DeepSpeed's {type(wrapper).__name__} (step() of "
            f"{owner.__module__}.{owner.__qualname__}) scales the gradients and their norm under fp16 "
            f"loss scaling, so its gain would be wrong. Install a tested DeepSpeed version: {DEEPSPEED_INSTALL}, "
            "or train in bf16" + see("unknown-deepspeed-fp16-wrapper")
        )
    return (lambda wrapper: 1.0), (lambda backward, now: 1.0)


def refuse_unscaled_fp16_step(engine: Any, wrapper: Any) -> None:
    """Refuse DeepSpeed 0.19's ZeRO-0 fp16 path for optimizers other than FusedAdam: the engine
    never scales the loss of ``FP16_UnfusedOptimizer`` (not a ``ZeROOptimizer``), yet its ``step()``
    divides the gradients by the loss scale, so every update would be ``loss_scale`` times too small,
    with or without AdaScale (docs/deepspeed-fp16.md)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    unfused = any(
        cls.__module__ == "deepspeed.runtime.fp16.unfused_optimizer" and cls.__qualname__ == "FP16_UnfusedOptimizer"
        for cls in type(wrapper).__mro__
    )
    if engine.fp16_enabled() and unfused and not isinstance(wrapper, ZeROOptimizer):
        raise ValueError(
            "AdaScale refuses DeepSpeed ZeRO stage 0 with fp16: DeepSpeed wraps every optimizer but "
            "FusedAdam in FP16_UnfusedOptimizer, whose step() divides the gradients by a loss scale "
            f"(now {_loss_scale(wrapper):g}) that engine.backward() never applied, so each update would "
            "be that many times too small. Use \"zero_optimization\": {\"stage\": 1} (or 2, 3) with "
            "fp16, or \"bf16\": {\"enabled\": true} (docs/deepspeed-fp16.md#zero-0)" + see("zero-0-with-fp16-refused")
        )
