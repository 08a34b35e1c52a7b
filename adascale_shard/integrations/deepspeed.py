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
* reads the engine's scheduler at ``floor(tau)`` (:func:`~adascale_shard.follow_tau`: DeepSpeed's
  JSON schedulers and torch schedulers alike);
* puts AdaScale's estimator into ``save_checkpoint``'s ``client_state`` and restores it in
  ``load_checkpoint``, so it survives checkpoint formats that keep only per-parameter optimizer
  state (ZeRO's ``elastic_checkpoint``, universal checkpoints).

Where the statistics come from on each stage: :mod:`adascale_shard.engines.deepspeed`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from typing import Any

import torch

from .._compat import (
    DEEPSPEED_ENGINE_METHODS,
    deepspeed_adam_configuration,
    deepspeed_engine_methods,
    deepspeed_method_names,
)
from .._docs import see
from ..config import AdaScaleConfig
from ..engines import deepspeed as engines_deepspeed
from ..optimizer import AdaScale
from ..schedule import follow_tau
from ._post_import import forget, when_imported

__all__ = ["install", "unpatch", "TESTED_VERSIONS", "OPTIMIZER_TYPE", "NO_PATCH_ENV"]

logger = logging.getLogger(__name__)

OPTIMIZER_TYPE = "adascale"
CLIENT_STATE_KEY = "adascale"  # AdaScale's estimator in DeepSpeed checkpoints
TESTED_VERSIONS = ((0, 19, 8), (0, 20, 0))  # [low, high)
_ENGINE_MODULE = "deepspeed.runtime.engine"
_PATCHED = "_adascale_shard_patched"
_ORIGINALS = "_adascale_shard_originals"  # the engine's own methods, for unpatch()
NO_PATCH_ENV = "ADASCALE_NO_DEEPSPEED_PATCH"
_REQUIRED_ENGINE_METHODS = (
    *DEEPSPEED_ENGINE_METHODS.values(),
    "allreduce_gradients",
    "save_checkpoint",
    "load_checkpoint",
    "optimizer_name",
    "optimizer_params",
)


def install() -> None:
    """Patch DeepSpeed now if it is imported, else as soon as its engine module is imported.
    ``ADASCALE_NO_DEEPSPEED_PATCH=1`` in the environment switches the patch off."""
    if os.environ.get(NO_PATCH_ENV, "") == "1":
        logger.info("adascale_shard: %s=1, DeepSpeed is not patched (no \"type\": \"AdaScale\")", NO_PATCH_ENV)
        return
    when_imported(_ENGINE_MODULE, patch_engine)


def unpatch() -> None:
    """Undo :func:`install`: DeepSpeed's engine gets its own methods back, AdaScale leaves ZeRO's
    supported optimizers, and a DeepSpeed imported later is not patched. Engines already built
    with AdaScale keep working as they were built."""
    forget(_ENGINE_MODULE)
    module = sys.modules.get(_ENGINE_MODULE)
    engine_cls = getattr(module, "DeepSpeedEngine", None)
    originals = getattr(engine_cls, _ORIGINALS, None) if engine_cls is not None else None
    if originals is None:
        return
    for name, original in originals.items():
        setattr(engine_cls, name, original)
    delattr(engine_cls, _ORIGINALS)
    config_module = sys.modules["deepspeed.runtime.config"]
    config_module.get_optimizer_name = getattr(
        config_module.get_optimizer_name, _ORIGINALS, config_module.get_optimizer_name
    )
    delattr(engine_cls, _PATCHED)
    from deepspeed.runtime.zero import utils as zero_utils

    while AdaScale in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.remove(AdaScale)


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
            "install a tested version: pip install -e '.[deepspeed]' in a clone of adascale-shard"
            + see("deepspeed-outside-the-tested-range"),
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
            "pip install -e '.[deepspeed]' in a clone of adascale-shard (deepspeed>=0.19.8,<0.20)" + see("deepspeed-engine-lost-a-method")
        )
    check_version(version)
    from deepspeed.runtime.zero import utils as zero_utils

    if AdaScale not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(AdaScale)

    originals = deepspeed_engine_methods(engine_cls)
    is_supported = originals["is_supported_optimizer"]
    configure_basic = originals["configure_basic_optimizer"]
    configure_optimizer = originals["configure_optimizer"]
    configure_scheduler = originals["configure_lr_scheduler"]
    take_model_step = originals["take_model_step"]
    save_checkpoint = engine_cls.save_checkpoint
    load_checkpoint = engine_cls.load_checkpoint

    def _is_supported_optimizer(self, optimizer_name):
        return str(optimizer_name).lower() == OPTIMIZER_TYPE or is_supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):
        if str(self.optimizer_name()).lower() == OPTIMIZER_TYPE:
            return build_optimizer(model_parameters, self.optimizer_params(), engine=self)
        return configure_basic(self, model_parameters)

    def _configure_optimizer(self, client_optimizer, model_parameters):
        client_adascale = isinstance(client_optimizer, AdaScale)
        if client_adascale or (client_optimizer is None and str(self.optimizer_name()).lower() == OPTIMIZER_TYPE):
            engines_deepspeed.check_offload(self)  # before DeepSpeed builds its offload buffers
        if client_adascale and self.zero_use_cpu_optimizer():
            # ZeRO-Offload refuses a client optimizer that is not DeepSpeedCPUAdam unless the JSON has
            # "zero_force_ds_cpu_optimizer": false; AdaScale steps its base optimizer on the CPU.
            self.zero_force_ds_cpu_optimizer = lambda: False
            try:
                configure_optimizer(self, client_optimizer, model_parameters)
            finally:
                del self.zero_force_ds_cpu_optimizer
        else:
            configure_optimizer(self, client_optimizer, model_parameters)
        if isinstance(getattr(self, "basic_optimizer", None), AdaScale):
            engines_deepspeed.check_zero_layout(self)
            engines_deepspeed.attach(self, self.basic_optimizer)

    def _configure_lr_scheduler(self, *args, **kwargs):
        configure_scheduler(self, *args, **kwargs)
        adascale = getattr(self, "basic_optimizer", None)
        if isinstance(adascale, AdaScale) and self.lr_scheduler is not None:
            follow_tau(self.lr_scheduler, adascale)

    def _take_model_step(self, *args, **kwargs):
        adascale = getattr(self, "basic_optimizer", None)
        if not isinstance(adascale, AdaScale):
            return take_model_step(self, *args, **kwargs)
        engines_deepspeed.before_model_step(adascale)  # the wrapper may change the loss scale in step()
        result = take_model_step(self, *args, **kwargs)
        if adascale._capture.passes:  # the wrapper skipped AdaScale's step (overflow)
            logger.info("AdaScale: DeepSpeed skipped this update (overflow); its statistics are dropped")
            adascale._drop_window()
        return result

    def _save_checkpoint(self, save_dir, tag=None, client_state=None, *args, **kwargs):
        # Some ZeRO checkpoint formats (elastic, universal) keep only the base optimizer's
        # per-parameter state: the estimator travels in the engine's client_state as well.
        adascale = getattr(self, "basic_optimizer", None)
        client_state = dict(client_state or {})
        if isinstance(adascale, AdaScale):
            client_state[CLIENT_STATE_KEY] = adascale.estimator_state_dict()
        return save_checkpoint(self, save_dir, tag, client_state, *args, **kwargs)

    def _load_checkpoint(self, load_dir, *args, **kwargs):
        load_path, client_state = load_checkpoint(self, load_dir, *args, **kwargs)
        adascale = getattr(self, "basic_optimizer", None)
        load_optimizer = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        if isinstance(adascale, AdaScale) and client_state and load_optimizer:
            saved = client_state.pop(CLIENT_STATE_KEY, None)
            if saved is None:
                logger.warning(
                    "AdaScale: the DeepSpeed checkpoint %s holds no AdaScale state (saved without "
                    "adascale_shard imported?); tau and the averages start fresh"
                    + see("deepspeed-checkpoint-holds-no-adascale-state"),
                    load_path,
                )
            else:
                adascale.load_estimator_state_dict(saved)
        return load_path, client_state

    patched = {
        "save_checkpoint": _save_checkpoint,
        "load_checkpoint": _load_checkpoint,
        **deepspeed_method_names(
            {
                "is_supported_optimizer": _is_supported_optimizer,
                "configure_basic_optimizer": _configure_basic_optimizer,
                "configure_optimizer": _configure_optimizer,
                "configure_lr_scheduler": _configure_lr_scheduler,
                "take_model_step": _take_model_step,
            }
        ),
    }
    setattr(engine_cls, _ORIGINALS, {name: getattr(engine_cls, name) for name in patched})
    for name, method in patched.items():
        setattr(engine_cls, name, method)
    _patch_config_parsing()
    setattr(engine_cls, _PATCHED, True)


def _patch_config_parsing() -> None:
    """``"optimizer": "AdaScale"`` (a string, not a block) fails inside DeepSpeed's config parsing
    with a bare ``AttributeError``: name the fix instead. Other configs parse as before."""
    config_module = sys.modules["deepspeed.runtime.config"]  # imported by the engine module
    get_optimizer_name = config_module.get_optimizer_name
    if hasattr(get_optimizer_name, _ORIGINALS):
        return

    def checked_get_optimizer_name(param_dict):
        check_optimizer_block(param_dict)
        return get_optimizer_name(param_dict)

    setattr(checked_get_optimizer_name, _ORIGINALS, get_optimizer_name)
    config_module.get_optimizer_name = checked_get_optimizer_name


def check_optimizer_block(config: Any) -> None:
    """Refuse ``"optimizer": "AdaScale"`` given as a string instead of a block (DeepSpeed's and the
    HF Trainer's config parsing would stop with a bare ``AttributeError``)."""
    block = config.get("optimizer") if isinstance(config, dict) else None
    if isinstance(block, str) and block.lower() == OPTIMIZER_TYPE:
        raise ValueError(
            f'DeepSpeed config: "optimizer": "{block}" must be a block: "optimizer": {{"type": '
            f'"{block}", "params": {{"optimizer": "SGD", "lr": 0.1, ...}}}}' + see("optimizer-given-as-a-string")
        )


def build_optimizer(model_parameters: Any, params: dict[str, Any] | None, engine: Any = None) -> AdaScale:
    """AdaScale from a DeepSpeed JSON ``"params"`` block. Under ZeRO-Offload (``engine`` given, its
    optimizer states on the CPU) an Adam/AdamW base is DeepSpeed's ``DeepSpeedCPUAdam``, as for
    DeepSpeed's own ``"type": "AdamW"``."""
    params = dict(params or {})
    if "max_grad_norm" in params:
        raise ValueError(
            "AdaScale JSON params: 'max_grad_norm' is not an optimizer parameter in DeepSpeed; set "
            "the top-level \"gradient_clipping\" instead" + see("max-grad-norm-in-json-params")
        )
    unresolved = {key: value for key, value in params.items() if isinstance(value, str) and value.lower() == "auto"}
    if unresolved:
        raise ValueError(
            f"AdaScale JSON params: {sorted(unresolved)} are \"auto\", which only the HF Trainer's DeepSpeed "
            "integration fills in; with deepspeed.initialize give numbers" + see("lr-auto-not-resolved")
        )
    if isinstance(params.get("lr"), str):
        raise ValueError(
            f"AdaScale JSON params: lr={params['lr']!r} is not a number" + see("lr-auto-not-resolved")
        )
    torch_adam = bool(params.get("torch_adam", False))  # read before _with_base_optimizer drops it
    params, notes = _with_base_optimizer(params)
    own, rest = AdaScaleConfig.split_kwargs(params)
    settings = {k: getattr(own, k) for k in AdaScaleConfig.field_names()}
    adascale = None
    if engine is not None and engine.zero_use_cpu_optimizer():
        model_parameters = list(model_parameters)
        base, note = _offload_adam(engine, model_parameters, rest, torch_adam)
        notes += [note] if note else []
        if base is not None:
            adascale = AdaScale(base, **settings)
    if adascale is None:
        rest.pop("fp32_optimizer_states", None)  # DeepSpeedCPUAdam's; no torch optimizer takes it
        adascale = AdaScale(model_parameters, **settings, **rest)
    adascale.base_note = "; ".join(['the DeepSpeed JSON "optimizer" block', *notes])
    return adascale


# What DeepSpeedCPUAdam takes besides the parameters (amsgrad only as False).
_CPU_ADAM_KWARGS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "amsgrad", "fp32_optimizer_states")


def _offload_adam(
    engine: Any, model_parameters: list[Any], rest: dict[str, Any], torch_adam: bool
) -> tuple[Any, str | None]:
    """ZeRO-Offload with an Adam/AdamW base: ``DeepSpeedCPUAdam``, built the way DeepSpeed builds it
    for its own ``"type": "AdamW"`` (``get_optimizer_configuration``), with torch's defaults for what
    the JSON leaves out (AdamW's ``weight_decay`` is 0.01 in torch, 0 in DeepSpeedCPUAdam), so
    offloading does not change the training. ``(None, why)``: keep the torch optimizer; the second
    item is said in the INFO line that names what AdaScale wraps."""
    import inspect

    name = str(rest.get("optimizer", "")).lower()
    if name not in ("adam", "adamw"):
        return None, None
    torch_cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    kwargs = {key: value for key, value in rest.items() if key != "optimizer"}
    other = sorted(set(kwargs) - set(_CPU_ADAM_KWARGS)) + (["amsgrad"] if kwargs.get("amsgrad") else [])
    reason = None
    if torch_adam:
        reason = '"torch_adam": true'
    elif other:
        reason = f"DeepSpeedCPUAdam does not take {other}"
    else:
        defaults = inspect.signature(torch_cls).parameters
        for key in ("lr", "betas", "eps", "weight_decay"):
            kwargs.setdefault(key, defaults[key].default)
        kwargs.pop("amsgrad", None)
        adam_kwargs = {"fp32_optimizer_states": kwargs.pop("fp32_optimizer_states")} if "fp32_optimizer_states" in kwargs else {}
        try:
            cls, extra = deepspeed_adam_configuration(engine)(adam_kwargs, name == "adamw")
            base = cls(model_parameters, **kwargs, **extra)
        except RuntimeError as err:  # the cpu_adam op did not build or load
            reason = f"{type(err).__name__}: {err}" + (f" ({err.__cause__})" if err.__cause__ else "")
        else:
            if getattr(base, "adam_w_mode", False):
                for group in base.param_groups:  # AdaScale scales decoupled weight decay (lr_scaling "sqrt")
                    group["decoupled_weight_decay"] = True
            return base, (
                f"under ZeRO-Offload the base optimizer is DeepSpeed's {type(base).__name__} "
                f'({"AdamW" if name == "adamw" else "Adam"}), as for DeepSpeed\'s own "type": "{torch_cls.__name__}"'
            )
    rest.pop("fp32_optimizer_states", None)
    return None, (
        f"under ZeRO-Offload the base optimizer is torch.optim.{torch_cls.__name__}, stepped on the CPU, "
        f"not DeepSpeedCPUAdam: {reason}"
    )


# The params of DeepSpeed's own Adam types that choose an implementation, not a hyper-parameter.
_DEEPSPEED_ADAM_SWITCHES = ("torch_adam", "adam_w_mode")


def _with_base_optimizer(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The JSON the HF docs teach has Adam's params (``betas``, ``eps``) and no ``"optimizer"``:
    it was an AdamW block with one word changed, so AdamW is the base (Adam for
    ``"adam_w_mode": false``). Returns the params with ``"optimizer"`` and what to say about it."""
    if "optimizer" in params:
        for switch in _DEEPSPEED_ADAM_SWITCHES:
            params.pop(switch, None)
        return params, []
    base = json_base_optimizer(params)
    if base == "SGD":
        return params, []
    params.pop("adam_w_mode", None)
    params.pop("torch_adam", None)
    note = (
        f'Adam\'s params (betas, eps) and no "optimizer": the base optimizer is {base} '
        '(set "optimizer": "<torch.optim name>" in the params to choose another)'
    )
    return {"optimizer": base, **params}, [note]


def json_base_optimizer(params: dict[str, Any]) -> str:
    """The name of the base optimizer a JSON AdaScale block's ``params`` build: ``"optimizer"``,
    else AdamW for Adam's params (Adam with ``"adam_w_mode": false``), else SGD."""
    if "optimizer" in params:
        named = params["optimizer"]
        return getattr(named, "__name__", str(named))
    if not ({"betas", "eps", *_DEEPSPEED_ADAM_SWITCHES} & params.keys()):
        return "SGD"
    return "AdamW" if params.get("adam_w_mode", True) else "Adam"
