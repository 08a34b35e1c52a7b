"""Learning-rate schedules read at scale-invariant steps ``floor(tau)``."""

from __future__ import annotations

import math
from typing import Any

from .optimizer import AdaScale

__all__ = ["ScaleInvariantScheduler"]


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
        if not hasattr(scheduler, "last_epoch") or scheduler.__class__.__name__ == "ReduceLROnPlateau":
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
