"""Hugging Face Trainer: AdaScale as the optimizer, the schedule at ``floor(tau)``, the budget in
scale-invariant steps, and ``adascale/*`` metrics in the Trainer's reporters.

One call after building the Trainer::

    from adascale_shard.integrations.hf import enable_adascale

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    enable_adascale(trainer, base_batch_size=32, optimizer="SGD", momentum=0.9)
    trainer.train()

With ``--deepspeed`` and a JSON ``"optimizer": {"type": "AdaScale"}`` block DeepSpeed builds the
optimizer; call ``enable_adascale(trainer, base_batch_size=...)`` without optimizer arguments.
Without DeepSpeed the optimizer is built by the Trainer from ``optimizer_cls_and_kwargs``, which
``enable_adascale`` sets; an optimizer *instance* passed to the Trainer is replaced or rejected by
the Trainer under DeepSpeed and FSDP, so it is not a supported path.

What the Trainer's settings mean under AdaScale (``TrainingArguments``):

* ``max_steps``: the budget in scale-invariant steps, i.e. the number of steps the schedule was
  tuned for at the base batch. Training stops at the first update where ``tau >= max_steps``.
* ``num_train_epochs`` (when ``max_steps`` is not set): epochs *at the base batch*; converted to
  ``max_steps = ceil(epochs * len(train_dataset) / base_batch_size)``. AdaScale then sees more
  data than that many epochs of the large batch (the paper's protocol).
* ``warmup_steps`` / ``warmup_ratio`` and the decay: the Trainer's schedule over ``max_steps``,
  read at ``floor(tau)``.
* ``logging_steps``, ``eval_steps``, ``save_steps``: scale-invariant steps: an action happens at
  the first update whose ``floor(tau)`` reaches the next multiple, so runs at different scales log,
  evaluate and save at the same points of the schedule. ``state.global_step`` (checkpoint names,
  the ``step`` of log records) still counts real updates.
* The progress bar counts scale-invariant steps up to ``max_steps`` and shows the gain.
* Metrics: ``adascale/gain, tau, var, sqr, noise_scale, efficiency, S, effective_lr, updates`` are
  added to every log record before any reporter (TensorBoard, ...) receives it, and to
  ``state.log_history``; ``python -m adascale_shard.advisor OUTPUT_DIR`` reads them back.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .._docs import see
from ..optimizer import AdaScale
from ..schedule import follow_tau
from ..unwrap import find
from . import hf_patch
from ._metrics import LOG_KEYS, adascale_metrics
from .accelerate_patch import leave_to_trainer

try:  # the Trainer's callback types; the module is imported only by users of the Trainer
    from transformers import TrainerCallback
    from transformers.trainer_callback import DefaultFlowCallback, ProgressCallback
    from transformers.trainer_utils import IntervalStrategy
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "adascale_shard.integrations.hf needs the Hugging Face Trainer: pip install -e '.[transformers]' in a clone of adascale-shard"
        + see("transformers-not-installed")
    ) from err

__all__ = ["enable_adascale", "AdaScaleArguments", "AdaScaleCallback", "run_summary", "LOG_KEYS"]

logger = logging.getLogger(__name__)



def _innermost_scheduler(scheduler: Any) -> Any:
    # Accelerate's AcceleratedScheduler and DeepSpeedSchedulerWrapper keep it in `.scheduler`.
    for _ in range(8):
        inner = getattr(scheduler, "scheduler", None)
        if inner is None:
            return scheduler
        scheduler = inner
    return scheduler


def _global_batch(args: Any) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def enable_adascale(
    trainer: Any,
    *,
    base_batch_size: int | None = None,
    optimizer: str | type[torch.optim.Optimizer] | None = None,
    **optimizer_kwargs: Any,
) -> "AdaScaleCallback":
    """Turn a ``transformers.Trainer`` into an AdaScale run (call before ``trainer.train()``).

    With ``import adascale_shard`` this also happens by itself at ``trainer.train()`` whenever
    AdaScale is the Trainer's optimizer or an :class:`AdaScaleCallback` is among its callbacks.

    Args:
        trainer: the Trainer (or a subclass, e.g. TRL's).
        base_batch_size (int, optional): the global batch, in samples, at which the learning rate
            and ``max_steps`` were tuned; ``S = global_batch / base_batch_size``. ``None``: the
            per-device micro-batch is the base batch (``S = N`` micro-batches per update), or the
            JSON's ``"scale"`` under DeepSpeed.
        optimizer (str or type, optional): the base optimizer (a ``torch.optim`` name or class),
            built by the Trainer through ``optimizer_cls_and_kwargs`` with
            ``lr=args.learning_rate``. ``None``: the optimizer the Trainer would build itself
            (``optimizer_cls_and_kwargs`` if set, else ``--optim``, AdamW by default, with its
            ``betas``, ``eps`` and ``--weight_decay`` groups). Not allowed with ``--deepspeed`` and
            an AdaScale JSON block (the JSON names it there).
        **optimizer_kwargs: the base optimizer's other arguments (``momentum=0.9``, ...) and
            AdaScale's (``smoothing``, ``lr_scaling``).

    Returns:
        The :class:`AdaScaleCallback` (its ``adascale`` attribute is the optimizer once training
        started).
    """
    return _enable(trainer, AdaScaleCallback(base_batch_size, optimizer=optimizer, **optimizer_kwargs))


def prepare_train(trainer: Any) -> None:
    """What ``Trainer.train`` does first under ``import adascale_shard`` (:mod:`.hf_patch`): the
    whole AdaScale flow when AdaScale is or will be the optimizer, else a check that refuses an
    AdaScale optimizer appearing later without it."""
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(c, AdaScaleFlowCallback) for c in callbacks):
        return  # enable_adascale() ran
    given = next((c for c in callbacks if isinstance(c, AdaScaleCallback)), None)
    source = "an AdaScaleCallback among the callbacks" if given is not None else _adascale_source(trainer)
    if source is None:
        if not any(isinstance(c, _FlowCheck) for c in callbacks):
            callbacks.append(_FlowCheck())
        return
    _enable(trainer, given if given is not None else AdaScaleCallback())
    logger.info(
        "AdaScale is the Trainer's optimizer (%s): max_steps=%d is the budget in scale-invariant steps, "
        "the schedule is read at floor(tau), adascale/* metrics are logged (docs/trainer.md)",
        source,
        trainer.args.max_steps,
    )


def _adascale_source(trainer: Any) -> str | None:
    deepspeed_config = getattr(trainer.args, "hf_deepspeed_config", None)
    block = deepspeed_config.config.get("optimizer") if deepspeed_config is not None else None
    if isinstance(block, dict) and str(block.get("type", "")).lower() == "adascale":
        return 'the DeepSpeed JSON "optimizer" block'
    if _builds_adascale(getattr(trainer, "optimizer_cls_and_kwargs", None)):
        return "optimizer_cls_and_kwargs"
    if find(trainer.optimizer) is not None:
        return "the optimizer given to the Trainer"
    return None


def _builds_adascale(cls_and_kwargs: Any) -> bool:
    """Whether the Trainer's ``optimizer_cls_and_kwargs`` names AdaScale (or a subclass)."""
    return cls_and_kwargs is not None and isinstance(cls_and_kwargs[0], type) and issubclass(cls_and_kwargs[0], AdaScale)


def _enable(trainer: Any, main: "AdaScaleCallback") -> "AdaScaleCallback":
    args = trainer.args
    base_batch_size = main.base_batch_size
    if base_batch_size is not None:
        if isinstance(base_batch_size, bool) or not isinstance(base_batch_size, int) or base_batch_size < 1:
            raise ValueError(
                f"base_batch_size={base_batch_size!r} must be a positive number of samples"
                + see("base-batch-size-not-positive")
            )
        if base_batch_size > _global_batch(args):
            raise ValueError(
                f"base_batch_size={base_batch_size} is larger than the global batch "
                f"{_global_batch(args)} (per_device_train_batch_size {args.per_device_train_batch_size} x "
                f"gradient_accumulation_steps {args.gradient_accumulation_steps} x {args.world_size} "
                "processes): AdaScale only scales up. Lower base_batch_size or raise the batch"
                + see("base-batch-size-larger-than-the-global-batch")
            )
    _check_world(args)
    main._base_note = _set_optimizer(trainer, main.optimizer, main.optimizer_kwargs)
    if args.max_steps is None or args.max_steps <= 0:
        args.max_steps = _epochs_to_steps(trainer, base_batch_size)
    main._trainer = weakref.ref(trainer)
    if getattr(trainer, "accelerator", None) is not None:
        leave_to_trainer(trainer.accelerator)  # the Trainer's own flow stops at the budget
    handler = trainer.callback_handler
    for cls, replacement in ((DefaultFlowCallback, AdaScaleFlowCallback(main)), (ProgressCallback, None)):
        for index, callback in enumerate(handler.callbacks):
            if type(callback) is cls:
                handler.callbacks[index] = replacement or AdaScaleProgressCallback(main)
    handler.callbacks[:] = [c for c in handler.callbacks if c is not main and not isinstance(c, _FlowCheck)]
    handler.callbacks.insert(0, main)  # before the reporters, so they receive adascale/* in on_log
    return main


@dataclass
class AdaScaleArguments:
    """AdaScale's settings for scripts in the style of the HF examples (``HfArgumentParser``)."""

    base_batch_size: int | None = field(
        default=None,
        metadata={"help": "Global batch (samples) the lr and max_steps were tuned at; default: one micro-batch."},
    )
    adascale_optimizer: str = field(default="SGD", metadata={"help": "Base optimizer (torch.optim name)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    smoothing: float | None = field(default=None, metadata={"help": "AdaScale's EMA weight per update."})
    plot: bool = field(default=True, metadata={"help": "Write adascale.png in output_dir at the end."})

    def enable(self, trainer: Any) -> "AdaScaleCallback":
        """:func:`enable_adascale` with these settings. With ``--deepspeed`` the JSON block names
        the base optimizer and its arguments, so only ``base_batch_size`` applies."""
        if trainer.args.deepspeed:
            return enable_adascale(trainer, base_batch_size=self.base_batch_size)
        extra: dict[str, Any] = {"momentum": self.momentum} if self.adascale_optimizer.lower() == "sgd" else {}
        if self.smoothing is not None:
            extra["smoothing"] = self.smoothing
        return enable_adascale(
            trainer, base_batch_size=self.base_batch_size, optimizer=self.adascale_optimizer, **extra
        )


def run_summary(trainer: Any, callback: "AdaScaleCallback") -> dict[str, Any]:
    """What a finished AdaScale run did: updates, ``tau``, the final gain, ``S``, ``N``, the budget,
    and the engine and optimizer that ran it."""
    adascale = callback.adascale
    stats = adascale.stats()
    return {
        "updates": trainer.state.global_step,
        "tau": adascale.tau,
        "gain": adascale.gain(),
        "S": stats["S"],
        "N": stats["N"],
        "max_steps": trainer.state.max_steps,
        "engine": type(trainer.model_wrapped).__name__,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
    }


def _check_world(args: Any) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != args.world_size:
        raise ValueError(
            f"the Trainer sees {args.world_size} process(es) but torch.distributed runs {dist.get_world_size()}: "
            "every rank would train on the same data and AdaScale's S would be wrong. On a machine "
            "without GPUs pass --use_cpu true (TrainingArguments(use_cpu=True)) so that Accelerate "
            "shards the data over the gloo ranks" + see("trainer-sees-fewer-processes")
        )


def _set_optimizer(trainer: Any, optimizer: Any, optimizer_kwargs: dict[str, Any]) -> str | None:
    """Make the Trainer build AdaScale; returns where the base optimizer comes from (for the INFO
    line AdaScale logs at its first update), ``None`` when something else says it."""
    deepspeed_config = getattr(trainer.args, "hf_deepspeed_config", None)
    json_optimizer = None
    if deepspeed_config is not None:
        json_optimizer = deepspeed_config.config.get("optimizer", {}).get("type")
    if json_optimizer is not None:
        if str(json_optimizer).lower() != "adascale":
            raise ValueError(
                f"the DeepSpeed config builds optimizer type {json_optimizer!r}, not AdaScale: set "
                '"optimizer": {"type": "AdaScale", "params": {...}} in the DeepSpeed JSON'
                + see("deepspeed-config-builds-another-optimizer")
            )
        if optimizer is not None or optimizer_kwargs:
            raise ValueError(
                "with --deepspeed the JSON \"optimizer\" block builds AdaScale: put the base optimizer and "
                "its arguments in its params, not in enable_adascale()" + see("optimizer-arguments-with-deepspeed")
            )
        _warn_ignored_optim(trainer.args, deepspeed_config.config["optimizer"].get("params"))
        return None  # the JSON's params say it (adascale_shard.integrations.deepspeed.build_optimizer)
    if trainer.optimizer is not None and not isinstance(trainer.optimizer, AdaScale):
        raise ValueError(
            f"the Trainer was given a {type(trainer.optimizer).__name__} instance: let enable_adascale() "
            "set optimizer_cls_and_kwargs instead (the Trainer replaces or rejects instances under "
            "DeepSpeed and FSDP)" + see("trainer-given-an-optimizer-instance")
        )
    if trainer.optimizer is not None:
        return "the AdaScale instance given to the Trainer"
    current = trainer.optimizer_cls_and_kwargs
    is_adascale = _builds_adascale(current)
    if is_adascale and optimizer is None and not optimizer_kwargs:
        return "the Trainer's optimizer_cls_and_kwargs"
    if optimizer is not None:
        trainer.optimizer_cls_and_kwargs = (
            AdaScale,
            {"optimizer": optimizer, "lr": trainer.args.learning_rate, **optimizer_kwargs},
        )
        return "named by enable_adascale/AdaScaleCallback"
    # The optimizer the Trainer would build without AdaScale: the user's class, or --optim's.
    user_cls = current is not None and not is_adascale
    base_cls, base_kwargs = current if user_cls else trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    trainer.optimizer_cls_and_kwargs = (AdaScale, {"optimizer": base_cls, **base_kwargs, **optimizer_kwargs})
    origin = "the Trainer's optimizer_cls_and_kwargs" if user_cls else f"--optim {_optim_name(trainer.args)}"
    shown = ", ".join(f"{k}={v!r}" for k, v in base_kwargs.items() if k != "lr")
    return f"the optimizer the Trainer would build ({origin}{'; ' + shown if shown else ''})"


def _optim_name(args: Any) -> str:
    return str(getattr(args.optim, "value", args.optim))


# --optim values that build no other optimizer than the JSON's AdamW, and the torch.optim class
# nearest to some others (what to name in the AdaScale params instead).
_DEFAULT_OPTIMS = ("adamw_torch", "adamw_torch_fused")
_TORCH_EQUIVALENT = {"adafactor": "Adafactor", "sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop"}


def _warn_ignored_optim(args: Any, params: Any) -> None:
    """``--optim`` beside a JSON AdaScale block: the Trainer ignores it (DeepSpeed builds the
    optimizer from the JSON), so say which setting wins, once (the main process)."""
    from .deepspeed import json_base_optimizer

    optim = _optim_name(args)
    base = json_base_optimizer(params if isinstance(params, dict) else {})
    wanted = _TORCH_EQUIVALENT.get(optim)
    if optim in _DEFAULT_OPTIMS or (wanted is not None and wanted.lower() == base.lower()):
        return
    if getattr(args, "process_index", 0) != 0:
        return
    fix = f'"optimizer": "{wanted}"' if wanted else '"optimizer": "<a torch.optim name>"'
    logger.warning(
        '--optim %s is ignored: the DeepSpeed JSON "optimizer" block ("type": "AdaScale") builds the '
        "optimizer, and its params make AdaScale wrap %s. To train with %s, set %s in that block's "
        "params; otherwise remove --optim" + see("optim-ignored-beside-a-deepspeed-adascale-block"),
        optim,
        base,
        wanted or optim,
        fix,
    )


def _epochs_to_steps(trainer: Any, base_batch_size: int | None) -> int:
    args = trainer.args
    dataset = trainer.train_dataset
    try:
        samples = len(dataset)
    except TypeError as err:
        raise ValueError(
            "AdaScale needs max_steps (the budget in scale-invariant steps) when the training set has "
            "no length: set TrainingArguments(max_steps=...)" + see("max-steps-needed")
        ) from err
    base = base_batch_size or args.per_device_train_batch_size
    return max(1, math.ceil(args.num_train_epochs * samples / base))


class AdaScaleCallback(TrainerCallback):
    """The whole AdaScale flow in the Trainer, as a callback (see the module doc).

    ``Trainer(..., callbacks=[AdaScaleCallback()])`` is enough under ``import adascale_shard``: at
    ``train()`` AdaScale wraps the optimizer the Trainer would build (or the DeepSpeed JSON builds
    it), ``max_steps`` becomes the budget in scale-invariant steps, the flow, progress bar and
    schedule follow ``floor(tau)``. The arguments are those of :func:`enable_adascale`, which adds
    this callback itself. It runs first, so the metrics it adds in ``on_log`` reach every reporter.
    """

    def __init__(
        self,
        base_batch_size: int | None = None,
        *,
        optimizer: str | type[torch.optim.Optimizer] | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        self.base_batch_size = base_batch_size
        self.optimizer = optimizer
        self.optimizer_kwargs = optimizer_kwargs
        self.adascale: AdaScale | None = None
        self._base_note: str | None = None  # where the base optimizer comes from (set by _enable)
        self._trainer: Any = lambda: None  # a weak reference, set when the Trainer turns the flow on

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        adascale = find(optimizer)
        if adascale is None:
            raise RuntimeError(
                f"AdaScaleCallback: the Trainer's optimizer is {type(optimizer).__name__}, not AdaScale. Call "
                "enable_adascale(trainer, ...) before train(), or import adascale_shard before train() "
                f"with its Trainer patch on ({hf_patch.NO_PATCH_ENV} unset)"
                + see("trainer-optimizer-is-not-adascale")
            )
        trainer = self._trainer()
        if adascale.base_note is None:
            adascale.base_note = self._base_note
        _check_data_parallel(args, trainer)
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is not None:  # fp16 without DeepSpeed: Accelerate's GradScaler scales the loss
            adascale.attach_grad_scaler(scaler)
        if self.base_batch_size is not None:  # else S = N, or the JSON's "scale"
            adascale.set_scale(_global_batch(args) / self.base_batch_size)
        if trainer is not None and (getattr(trainer, "model_accepts_loss_kwargs", False) or trainer.compute_loss_func):
            # The Trainer's own test for passing num_items_in_batch: a token-normalised loss.
            logger.info(
                "AdaScale: the loss is divided by the label tokens of the whole update, so micro-batches "
                "weigh by their token counts; with unequal counts the gain is an approximation "
                "(|error| <= CV^2 of the counts; docs/trainer.md#variable-length-batches-sft)"
            )
        if model is not None and _is_sharded(model):  # FSDP2 or FSDP1: hook before the first forward
            adascale.attach(model)
        elif getattr(args, "fsdp", None) and args.world_size > 1:
            # Accelerate applies FSDP only on accelerator devices; on CPU the Trainer runs DDP.
            logger.warning(
                "AdaScale: --fsdp was given but the model is not sharded (Accelerate runs FSDP only on "
                "accelerator devices; on CPU the Trainer fell back to DDP). AdaScale uses DDP statistics"
                + see("fsdp-given-but-model-not-sharded")
            )
        if lr_scheduler is not None:
            follow_tau(_innermost_scheduler(lr_scheduler), adascale)
        self.adascale = adascale

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.adascale is None or logs is None or "loss" not in logs:
            return
        extra = adascale_metrics(self.adascale)
        if "learning_rate" in logs:
            # The Trainer reads the scheduler, already moved on to the next update; the record is
            # of the update just taken, whose effective_lr is this lr times its gain.
            extra["learning_rate"] = extra["adascale/lr"]
        logs.update(extra)
        if state.log_history:  # the Trainer appended a copy before calling the callbacks
            state.log_history[-1].update(extra)


class _FlowCheck(TrainerCallback):
    """Added by :func:`prepare_train` when AdaScale was not seen before training: refuses an
    AdaScale optimizer that appears later (a ``create_optimizer`` override) without the flow."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if find(optimizer) is not None:
            raise RuntimeError(
                "the Trainer's optimizer is AdaScale, but it was built inside train() (a create_optimizer "
                "override?), after the budget and schedule were set: AdaScale's flow (budget in tau, "
                "schedule at floor(tau), metrics) would be missing. Call enable_adascale(trainer) before "
                "trainer.train(), or pass callbacks=[AdaScaleCallback()]" + see("adascale-built-inside-train")
            )


def _check_data_parallel(args: Any, trainer: Any) -> None:
    """Several processes but a bare model: every rank would train its own copy and AdaScale would
    see no variance between them. (transformers 5.23 / accelerate 1.15 do this when
    ``trainer.evaluate()`` runs before ``train()``: the bare model is then marked prepared.)"""
    if trainer is None or args.world_size <= 1 or getattr(trainer, "is_deepspeed_enabled", False):
        return
    wrapped = getattr(trainer, "model_wrapped", None)
    if wrapped is None or _is_sharded(wrapped) or isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return
    raise RuntimeError(
        f"the Trainer runs {args.world_size} processes but its model is not wrapped for data parallelism "
        f"({type(wrapped).__name__}): each rank would train its own copy. A known cause is calling "
        "trainer.evaluate() before trainer.train(); evaluate after training, or build a new Trainer"
        + see("model-not-wrapped-for-data-parallelism")
    )


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``fully_shard``) or FSDP1 (``FullyShardedDataParallel``)."""
    from .._compat import fsdp1_modules, is_fsdp_module

    return any(is_fsdp_module(m) for m in model.modules()) or bool(fsdp1_modules(model))


class AdaScaleFlowCallback(DefaultFlowCallback):
    """The Trainer's flow (log, evaluate, save, stop) in scale-invariant steps."""

    def __init__(self, main: AdaScaleCallback) -> None:
        self.main = main
        self._last_step = 0  # floor(tau) at the previous update

    def on_train_begin(self, args, state, control, **kwargs):
        adascale = self.main.adascale
        self._last_step = math.floor(adascale.tau) if adascale is not None else 0

    def on_step_end(self, args, state, control, **kwargs):
        adascale = self.main.adascale
        if adascale is None:
            return super().on_step_end(args, state, control, **kwargs)
        previous, current = self._last_step, math.floor(adascale.tau)
        self._last_step = current

        def reached(every: float) -> bool:
            return every > 0 and current // every > previous // every

        if state.global_step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == IntervalStrategy.STEPS and reached(state.logging_steps):
            control.should_log = True
        evaluate_steps = args.eval_strategy == IntervalStrategy.STEPS and args.eval_delay <= current
        if evaluate_steps and reached(state.eval_steps):
            control.should_evaluate = True
        save_steps = args.save_strategy == "steps"  # SaveStrategy and IntervalStrategy are str enums
        if save_steps and state.save_steps > 0 and reached(state.save_steps):
            control.should_save = True
        if adascale.budget_spent(state.max_steps) or state.global_step >= state.max_steps:
            control.should_training_stop = True
            control.should_log = True
            if evaluate_steps and not control.should_evaluate:
                control.should_evaluate = True
            if save_steps:
                control.should_save = True
        return control


class AdaScaleProgressCallback(ProgressCallback):
    """The Trainer's progress bar, counting scale-invariant steps to ``max_steps``."""

    def __init__(self, main: AdaScaleCallback, max_str_len: int = 100) -> None:
        super().__init__(max_str_len=max_str_len)
        self.main = main

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("tau")
        adascale = self.main.adascale
        self.current_step = math.floor(adascale.tau) if adascale is not None else 0
        if self.training_bar is not None and self.current_step:
            self.training_bar.update(self.current_step)

    def on_step_end(self, args, state, control, **kwargs):
        adascale = self.main.adascale
        if self.training_bar is None or adascale is None:
            return
        target = min(math.floor(adascale.tau), state.max_steps)
        self.training_bar.update(target - self.current_step)
        self.current_step = target
        self.training_bar.set_postfix(gain=f"{adascale.gain():.2f}", updates=state.global_step, refresh=False)
