"""Learning-rate schedules read at scale-invariant steps ``floor(tau)``."""

from __future__ import annotations

import math
from typing import Any

from .optimizer import AdaScale

__all__ = ["ScaleInvariantScheduler", "follow_tau"]

_FOLLOWS_TAU = "_adascale_follows_tau"


def _counts_steps(scheduler: Any) -> bool:
    return hasattr(scheduler, "last_epoch") and type(scheduler).__name__ != "ReduceLROnPlateau"


def follow_tau(scheduler: Any, optimizer: AdaScale) -> None:
    """Make ``scheduler.step()`` move a step-counting torch scheduler to ``floor(tau)``.

    For schedulers that something else steps once per update (the HF Trainer, DeepSpeed's
    engine, Accelerate's wrapper): after the patch each call steps the scheduler until its
    ``last_epoch`` equals ``floor(optimizer.tau)``, however often it is called per update, so
    the schedule is read at scale-invariant steps. Idempotent.
    """
    cls = type(scheduler)
    if getattr(cls, _FOLLOWS_TAU, False):
        return
    if not _counts_steps(scheduler):
        raise TypeError(
            f"AdaScale cannot drive {cls.__name__} by floor(tau): it does not count steps "
            "in last_epoch. Use a step-counting torch.optim.lr_scheduler (LambdaLR, the HF schedules, ...)"
        )
    step_once = cls.step

    def step(self: Any, *args: Any, **kwargs: Any) -> None:
        target = math.floor(optimizer.tau)
        while self.last_epoch < target:
            step_once(self)

    # A subclass, not an instance attribute: schedulers save their whole __dict__ in state_dict().
    scheduler.__class__ = type(cls.__name__, (cls,), {"step": step, _FOLLOWS_TAU: True, "__module__": cls.__module__})


class ScaleInvariantScheduler:
    """Drives a ``torch.optim.lr_scheduler`` scheduler by ``floor(tau)`` of an :class:`AdaScale`.

    Call :meth:`step` once after each ``optimizer.step()``, as with any scheduler. It steps the
    wrapped scheduler until its ``last_epoch`` equals ``floor(tau)``: one update at gain ``r``
    moves the schedule ``r`` base steps on, so the schedule tuned at the base batch is followed
    in scale-invariant steps. Works with every scheduler that counts steps (``LambdaLR`` and so
    the Hugging Face schedules, ``StepLR``, ``CosineAnnealingLR``, ``OneCycleLR``,
    ``SequentialLR``, ...); not with ``ReduceLROnPlateau``, which counts metrics, not steps.

    Args:
        optimizer (AdaScale): the optimizer whose ``tau`` sets the step.
        scheduler: a scheduler built on ``optimizer`` (or on the optimizer it wraps).

    Example::

        >>> opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        >>> sched = ScaleInvariantScheduler(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000))
    """

    def __init__(self, optimizer: AdaScale, scheduler: Any) -> None:
        if not isinstance(optimizer, AdaScale):
            raise TypeError(
                f"ScaleInvariantScheduler needs an AdaScale optimizer, got {type(optimizer).__name__}: "
                "wrap the optimizer with AdaScale(...) first"
            )
        if not _counts_steps(scheduler):
            raise TypeError(
                f"ScaleInvariantScheduler drives schedulers that count steps (LambdaLR, StepLR, ...); "
                f"{type(scheduler).__name__} does not"
            )
        if scheduler.optimizer is not optimizer and scheduler.optimizer is not optimizer.optimizer:
            raise ValueError(
                "the scheduler was built on another optimizer: build it on the AdaScale optimizer "
                "(or on the optimizer AdaScale wraps)"
            )
        self.optimizer = optimizer
        self.scheduler = scheduler

    @property
    def last_epoch(self) -> int:
        """The scale-invariant step the schedule is at."""
        return self.scheduler.last_epoch

    def step(self) -> None:
        target = math.floor(self.optimizer.tau)
        while self.scheduler.last_epoch < target:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)
