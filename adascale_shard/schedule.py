"""Learning-rate schedules read at scale-invariant steps ``floor(tau)``: one mechanism, :func:`follow_tau`."""

from __future__ import annotations

import inspect
import math
import weakref
from typing import Any

from ._docs import see
from .optimizer import AdaScale
from .unwrap import find

__all__ = ["follow_tau"]

_FOLLOWS_TAU = "_adascale_follows_tau"
_TAU_OF: weakref.WeakKeyDictionary[Any, AdaScale] = weakref.WeakKeyDictionary()  # scheduler -> its AdaScale
_FOLLOWING: dict[type, type] = {}  # scheduler class -> its tau-following subclass


def _iteration_argument(cls: type) -> str | None:
    # DeepSpeed's JSON schedulers take the iteration in step(): WarmupLR, WarmupDecayLR and
    # WarmupCosineLR as last_batch_iteration, OneCycle and LRRangeTest as batch_iteration.
    try:
        parameters = inspect.signature(cls.step).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("last_batch_iteration", "batch_iteration") if name in parameters), None)


def _counts_steps(scheduler: Any) -> bool:
    return hasattr(scheduler, "last_epoch") and type(scheduler).__name__ != "ReduceLROnPlateau"


def _step_to_tau(self: Any, *args: Any, **kwargs: Any) -> None:
    """Move the schedule to ``floor(tau)``, however often it is called per update."""
    target = math.floor(_TAU_OF[self].tau)
    base_step = super(type(self), self).step
    iteration_argument = type(self)._adascale_iteration_argument
    if iteration_argument is not None:
        base_step(**{iteration_argument: target - 1})  # DeepSpeed's convention after `target` steps
        return
    while self.last_epoch < target:
        base_step()


def _reduce_following(self: Any, protocol: int) -> tuple:
    # The subclass is made at run time: a copy (pickle, deepcopy) is the user's own scheduler class,
    # which follow_tau() can make follow an AdaScale again (the AdaScale itself does not pickle).
    return _rebuild, (type(self).__bases__[0], dict(self.__dict__))


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    scheduler = cls.__new__(cls)
    scheduler.__dict__.update(state)
    return scheduler


def follow_tau(scheduler: Any, optimizer: AdaScale) -> Any:
    """Make ``scheduler`` read its schedule at ``floor(optimizer.tau)``; returns it.

    After this, each ``scheduler.step()`` moves the schedule to ``floor(tau)`` instead of one step
    on, whoever calls it and however often per update (your loop, the HF Trainer, DeepSpeed's
    engine, Accelerate's wrapper): one update at gain ``r`` moves the schedule ``r`` base steps
    on, so a schedule tuned at the base batch is followed in scale-invariant steps. Works with
    every ``torch.optim.lr_scheduler`` that counts steps (``LambdaLR`` and so the HF schedules,
    ``StepLR``, ``CosineAnnealingLR``, ``OneCycleLR``, ``SequentialLR``, ...) and DeepSpeed's JSON
    schedulers; not with ``ReduceLROnPlateau``, which counts metrics. Idempotent. The scheduler's
    ``state_dict`` is unchanged; a copy (pickle, deepcopy) is the scheduler's own class again.

    Example::

        >>> opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        >>> sched = follow_tau(torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000), opt)
        >>> ...; opt.step(); sched.step()
    """
    if not isinstance(optimizer, AdaScale):
        raise TypeError(
            f"follow_tau needs an AdaScale optimizer, got {type(optimizer).__name__}: wrap the optimizer "
            "with AdaScale(...) first" + see("scheduler-needs-an-adascale-optimizer")
        )
    cls = type(scheduler)
    if getattr(cls, _FOLLOWS_TAU, False):
        _TAU_OF[scheduler] = optimizer
        return scheduler
    if not (_iteration_argument(cls) is not None or _counts_steps(scheduler)):
        raise TypeError(
            f"AdaScale cannot drive {cls.__name__} by floor(tau): it does not count steps in last_epoch. "
            "Use a step-counting torch.optim.lr_scheduler (LambdaLR, the HF schedules, StepLR, ...)"
            + see("cannot-drive-a-scheduler-by-floor-tau")
        )
    inner = getattr(scheduler, "optimizer", None)  # AdaScale, its base optimizer, or a wrapper of either
    if inner is not None and inner is not optimizer.optimizer and find(inner) is not optimizer and _counts_steps(scheduler):
        raise ValueError(
            "the scheduler was built on another optimizer: build it on the AdaScale optimizer "
            "(or on the optimizer AdaScale wraps)" + see("scheduler-built-on-another-optimizer")
        )
    following = _FOLLOWING.get(cls)
    if following is None:
        namespace = {
            "step": _step_to_tau,
            "__reduce_ex__": _reduce_following,
            _FOLLOWS_TAU: True,
            "_adascale_iteration_argument": _iteration_argument(cls),
        }
        following = type(cls.__name__, (cls,), {**namespace, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _FOLLOWING[cls] = following
    # A subclass, not an instance attribute: schedulers save their whole __dict__ in state_dict().
    scheduler.__class__ = following
    _TAU_OF[scheduler] = optimizer
    return scheduler
