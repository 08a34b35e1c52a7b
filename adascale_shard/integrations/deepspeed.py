"""DeepSpeed: ``"optimizer": {"type": "AdaScale"}`` in a DeepSpeed JSON, on ZeRO stages 0-3.

DeepSpeed has no optimizer registry: an unknown ``"type"`` falls through to
``getattr(torch.optim, name)``, and ZeRO refuses optimizers outside its tested list. ``import
adascale_shard`` therefore installs a small, idempotent patch of ``DeepSpeedEngine``, applied
when ``deepspeed.runtime.engine`` is imported (now, or later: ``import adascale_shard`` never
imports DeepSpeed itself). The patch

* builds :class:`~adascale_shard.AdaScale` when the JSON type is ``"AdaScale"``
  (case-insensitive) from the JSON ``params``: ``optimizer`` names the base optimizer (any
  ``torch.optim`` name, default ``"SGD"``), AdaScale's own settings (``scale``, ``smoothing``,
  ``lr_scaling``, ``min_relative_var``) are taken out, the rest goes to the base optimizer;
* lists AdaScale among ZeRO's supported optimizers (no ``zero_allow_untested_optimizer``);
* connects the AdaScale instance to the engine once the engine has wrapped it (below);
* drops the statistics of an update the engine skipped (fp16 overflow);
* reads the engine's scheduler at ``floor(tau)`` (see :func:`_follow_tau`);
* puts AdaScale's estimator into ``save_checkpoint``'s ``client_state`` and restores it in
  ``load_checkpoint``, so it survives checkpoint formats that keep only per-parameter optimizer
  state (ZeRO's ``elastic_checkpoint``, universal checkpoints).

Where the statistics come from (``../shared/design/ALGORITHM.md``):

* local micro-gradients: tensor hooks on the model's parameters, which fire before DeepSpeed's
  own reduction hooks in every stage (ZeRO-3 keeps the same ``Parameter`` objects);
* ``||G||^2``: with a ZeRO, bf16 or fp16 wrapper, the wrapper's pre-clip
  ``_global_grad_norm`` (already reduced over ranks) read when the wrapper calls AdaScale's
  ``step()``; the statistics then cover the whole model as one group (DeepSpeed reports one
  norm). With ZeRO-0 in fp32 (no wrapper) it is taken from the reduced ``.grad`` right after
  the engine's all-reduce and before its clipping.
* fp16: the hooked squares are divided by the square of the loss scale the engine gave the
  window's backward passes, and ``||G||^2`` is unscaled from the same scale; both depend on the
  wrapper kind (:data:`_FP16_WRAPPERS`), and an fp16 wrapper of an unknown kind is refused at
  ``initialize``. An overflowed update never calls ``step()`` and its statistics are dropped.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.machinery
import logging
import math
import sys
from typing import Any

import torch

from ..config import AdaScaleConfig
from ..optimizer import AdaScale
from ..schedule import follow_tau

__all__ = ["install", "TESTED_VERSIONS", "OPTIMIZER_TYPE"]

logger = logging.getLogger(__name__)

OPTIMIZER_TYPE = "adascale"
CLIENT_STATE_KEY = "adascale"  # AdaScale's estimator in DeepSpeed checkpoints
TESTED_VERSIONS = ((0, 19, 8), (0, 20, 0))  # [low, high)
_ENGINE_MODULE = "deepspeed.runtime.engine"
_PATCHED = "_adascale_shard_patched"
_BACKWARD_SCALE = "_adascale_backward_loss_scale"  # set on the engine by _attach_wrapper
_REQUIRED_ENGINE_METHODS = (
    "_configure_basic_optimizer",
    "_configure_optimizer",
    "_is_supported_optimizer",
    "_configure_lr_scheduler",
    "_take_model_step",
    "allreduce_gradients",
    "save_checkpoint",
    "load_checkpoint",
    "optimizer_name",
    "optimizer_params",
)


def install() -> None:
    """Patch DeepSpeed now if it is imported, else as soon as its engine module is imported."""
    module = sys.modules.get(_ENGINE_MODULE)
    if module is not None:
        patch_engine(module)
    elif not any(isinstance(f, _EngineImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _EngineImportHook())


class _EngineImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`patch_engine` right after ``deepspeed.runtime.engine`` executes."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != _ENGINE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):  # noqa: ANN001
            exec_module(module)
            patch_engine(module)

        loader.exec_module = exec_and_patch
        return spec


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_version(version: str) -> None:
    """Warn outside the tested range (the patch still checks the internals it needs)."""
    low, high = TESTED_VERSIONS
    if not low <= _version_tuple(version) < high:
        logger.warning(
            "adascale_shard was tested with deepspeed >=%s,<%s; found %s. If AdaScale misbehaves, "
            "install a tested version: pip install 'adascale-shard[deepspeed]'",
            ".".join(map(str, low)),
            ".".join(map(str, high)),
            version,
        )


def patch_engine(module: Any) -> None:
    """Install the AdaScale patch on ``module.DeepSpeedEngine`` (idempotent)."""
    engine_cls = module.DeepSpeedEngine
    if getattr(engine_cls, _PATCHED, False):
        return
    # deepspeed/__init__.py may still be executing (it imports the engine): ask the metadata.
    version = importlib.metadata.version("deepspeed")
    missing = [name for name in _REQUIRED_ENGINE_METHODS if not hasattr(engine_cls, name)]
    if missing:
        raise RuntimeError(
            f"adascale_shard cannot register 'AdaScale' with deepspeed {version}: "
            f"DeepSpeedEngine no longer has {missing}. Install a tested DeepSpeed version: "
            "pip install 'adascale-shard[deepspeed]' (deepspeed>=0.19.8,<0.20)"
        )
    check_version(version)
    from deepspeed.runtime.zero import utils as zero_utils

    if AdaScale not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(AdaScale)

    is_supported = engine_cls._is_supported_optimizer
    configure_basic = engine_cls._configure_basic_optimizer
    configure_optimizer = engine_cls._configure_optimizer
    configure_scheduler = engine_cls._configure_lr_scheduler
    take_model_step = engine_cls._take_model_step
    save_checkpoint = engine_cls.save_checkpoint
    load_checkpoint = engine_cls.load_checkpoint

    def _is_supported_optimizer(self, optimizer_name):  # noqa: ANN001
        return str(optimizer_name).lower() == OPTIMIZER_TYPE or is_supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):  # noqa: ANN001
        if str(self.optimizer_name()).lower() == OPTIMIZER_TYPE:
            return build_optimizer(model_parameters, self.optimizer_params())
        return configure_basic(self, model_parameters)

    def _configure_optimizer(self, client_optimizer, model_parameters):  # noqa: ANN001
        configure_optimizer(self, client_optimizer, model_parameters)
        if isinstance(getattr(self, "basic_optimizer", None), AdaScale):
            attach(self, self.basic_optimizer)

    def _configure_lr_scheduler(self, *args, **kwargs):  # noqa: ANN002, ANN003
        configure_scheduler(self, *args, **kwargs)
        adascale = getattr(self, "basic_optimizer", None)
        if isinstance(adascale, AdaScale) and self.lr_scheduler is not None:
            _follow_tau(self, adascale)

    def _take_model_step(self, *args, **kwargs):  # noqa: ANN002, ANN003
        adascale = getattr(self, "basic_optimizer", None)
        if not isinstance(adascale, AdaScale):
            return take_model_step(self, *args, **kwargs)
        # The loss scale of this window's backward passes: the wrapper may change it in step().
        backward_scale = getattr(self, _BACKWARD_SCALE, None)
        adascale._capture.loss_scale = backward_scale() if backward_scale is not None else 1.0
        result = take_model_step(self, *args, **kwargs)
        if adascale._capture.passes:  # the wrapper skipped AdaScale's step (overflow)
            logger.info("AdaScale: DeepSpeed skipped this update (overflow); its statistics are dropped")
            adascale._drop_window()
        return result

    def _save_checkpoint(self, save_dir, tag=None, client_state=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # Some ZeRO checkpoint formats (elastic, universal) keep only the base optimizer's
        # per-parameter state: the estimator travels in the engine's client_state as well.
        adascale = getattr(self, "basic_optimizer", None)
        client_state = dict(client_state or {})
        if isinstance(adascale, AdaScale):
            client_state[CLIENT_STATE_KEY] = adascale.estimator_state_dict()
        return save_checkpoint(self, save_dir, tag, client_state, *args, **kwargs)

    def _load_checkpoint(self, load_dir, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        load_path, client_state = load_checkpoint(self, load_dir, *args, **kwargs)
        adascale = getattr(self, "basic_optimizer", None)
        load_optimizer = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        if isinstance(adascale, AdaScale) and client_state and load_optimizer:
            saved = client_state.pop(CLIENT_STATE_KEY, None)
            if saved is None:
                logger.warning(
                    "AdaScale: the DeepSpeed checkpoint %s holds no AdaScale state (saved without "
                    "adascale_shard imported?); tau and the averages start fresh",
                    load_path,
                )
            else:
                adascale.load_estimator_state_dict(saved)
        return load_path, client_state

    engine_cls.save_checkpoint = _save_checkpoint
    engine_cls.load_checkpoint = _load_checkpoint
    engine_cls._is_supported_optimizer = _is_supported_optimizer
    engine_cls._configure_basic_optimizer = _configure_basic_optimizer
    engine_cls._configure_optimizer = _configure_optimizer
    engine_cls._configure_lr_scheduler = _configure_lr_scheduler
    engine_cls._take_model_step = _take_model_step
    setattr(engine_cls, _PATCHED, True)


def build_optimizer(model_parameters: Any, params: dict[str, Any] | None) -> AdaScale:
    """AdaScale from a DeepSpeed JSON ``"params"`` block."""
    params = dict(params or {})
    if "max_grad_norm" in params:
        raise ValueError(
            "AdaScale JSON params: 'max_grad_norm' is not an optimizer parameter in DeepSpeed; set "
            "the top-level \"gradient_clipping\" instead"
        )
    lr = params.get("lr")
    if isinstance(lr, str):
        raise ValueError(
            f"AdaScale JSON params: lr={lr!r} was not resolved. \"auto\" is filled in by the HF "
            "Trainer's DeepSpeed integration; with deepspeed.initialize give a number"
        )
    own, rest = AdaScaleConfig.split_kwargs(params)
    return AdaScale(model_parameters, **{k: getattr(own, k) for k in AdaScaleConfig.field_names()}, **rest)


def _loss_scale(wrapper: Any) -> float:
    scale = getattr(wrapper, "loss_scale", None)
    if scale is None:
        scale = getattr(wrapper, "cur_scale", 1.0)
    scale = float(scale)
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def attach(engine: Any, adascale: AdaScale) -> None:
    """Connect an AdaScale instance to the engine that wraps it (called by the patch)."""
    if engine.zero_optimization() and getattr(engine, "zero_cpu_offload", lambda: False)():
        raise ValueError(
            "AdaScale does not support ZeRO-Offload yet (zero_optimization.offload_optimizer): "
            "remove offload_optimizer from the DeepSpeed config"
        )
    if engine.optimizer is adascale:
        _attach_replicated(engine, adascale)
    else:
        _attach_wrapper(engine, adascale)


def _attach_replicated(engine: Any, adascale: AdaScale) -> None:
    """ZeRO-0 in fp32: every rank holds the full reduced ``.grad`` right after the engine's
    all-reduce, before the engine clips them in ``_take_model_step``."""
    capture = adascale._capture
    capture.snapshot_on_close = False  # autograd returns before DeepSpeed reduces
    capture.detect_reset = False  # the engine ends windows (see _take_model_step)
    allreduce = engine.allreduce_gradients

    def allreduce_gradients(*args, **kwargs):  # noqa: ANN002, ANN003
        result = allreduce(*args, **kwargs)
        if engine.is_gradient_accumulation_boundary() and capture.passes:
            capture.snapshot_grad_sqr()
        return result

    engine.allreduce_gradients = allreduce_gradients


def _attach_wrapper(engine: Any, adascale: AdaScale) -> None:
    """ZeRO-1/2/3, bf16, fp16: the wrapper computes the pre-clip global norm before it
    calls AdaScale's ``step()``; the statistics become one whole-model group."""
    wrapper = engine.optimizer
    if not hasattr(wrapper, "_global_grad_norm"):
        raise RuntimeError(
            f"AdaScale cannot read the gradient norm of DeepSpeed's {type(wrapper).__name__}: it has no "
            "_global_grad_norm. Install a tested DeepSpeed version (deepspeed>=0.19.8,<0.20)"
        )
    backward_scale, norm_factor = _fp16_wrapper_kind(engine, wrapper)
    refuse_unscaled_fp16_step(engine, wrapper)
    setattr(engine, _BACKWARD_SCALE, lambda: backward_scale(wrapper))
    capture = adascale._capture
    capture.merge_groups()  # the hooks AdaScale placed stay (no second gather under ZeRO-3 zero.Init)
    capture.snapshot_on_close = False
    capture.detect_reset = False  # ZeRO frees .grad after each pass; the engine ends windows
    device = capture.device

    def global_grad_sqr() -> torch.Tensor:
        norm = wrapper._global_grad_norm
        if norm is None:
            raise RuntimeError(
                "AdaScale needs DeepSpeed's gradient norm, but it was not computed: remove "
                '"compute_grad_norm": false from zero_optimization'
            )
        # capture.loss_scale: the backward passes' scale; _loss_scale(wrapper): after the wrapper's update.
        factor = norm_factor(capture.loss_scale, _loss_scale(wrapper))
        norm = torch.as_tensor(norm, dtype=torch.float64, device=device) * factor
        return norm.square().reshape(1)

    capture.grad_sqr_fn = global_grad_sqr
    adascale._replace_capture(capture)


# DeepSpeed 0.19 wrappers by the class that defines their step() (module, name):
# (1) the loss scale engine.backward()/engine.scale() give the gradients, from the wrapper;
# (2) what _global_grad_norm is multiplied by to be unscaled, from (1) and the wrapper's scale when it
#     calls AdaScale's step() (after its own loss-scale update).
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
            "loss scaling, so its gain would be wrong. Install a tested DeepSpeed version: pip install "
            "'adascale-shard[deepspeed]' (deepspeed>=0.19.8,<0.20), or train in bf16"
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
            "fp16, or \"bf16\": {\"enabled\": true} (docs/deepspeed-fp16.md#zero-0)"
        )


def _follow_tau(engine: Any, adascale: AdaScale) -> None:
    """Make the engine's scheduler read the schedule at ``floor(tau)``.

    The engine steps its scheduler once per applied update. DeepSpeed's JSON schedulers take the
    iteration in ``step(last_batch_iteration)``, so each call is redirected to ``floor(tau) - 1``
    (DeepSpeed's convention after ``floor(tau)`` steps); a ``torch.optim.lr_scheduler`` (a client
    scheduler, the HF Trainer's) is stepped until its ``last_epoch`` is ``floor(tau)``.
    """
    scheduler = engine.lr_scheduler
    step = scheduler.step
    if "last_batch_iteration" in _parameters(step):

        def step_at_tau(*args, **kwargs):  # noqa: ANN002, ANN003
            return step(last_batch_iteration=math.floor(adascale.tau) - 1)

        scheduler.step = step_at_tau
    else:
        follow_tau(scheduler, adascale)  # a torch scheduler: stepped to last_epoch == floor(tau)


def _parameters(fn: Any) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()
