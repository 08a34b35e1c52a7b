"""Accelerate loops under ``import adascale_shard``: the budget and the metrics for a loop that was not
written for AdaScale (``python -m adascale_shard.run`` with a DeepSpeed JSON ``"type": "AdaScale"``).

A custom loop counts its own updates (``for epoch ...: for batch in dataloader: ...``), so with
AdaScale it would run past the budget it was tuned for: ``tau`` grows by the gain per update. The
patch wraps ``Accelerator.prepare``, ``Accelerator.log`` and the iteration of Accelerate's prepared
data loaders (when ``accelerate.accelerator`` is imported; this module never imports Accelerate):

* the budget is the ``total_num_steps`` of the prepared DeepSpeed JSON scheduler (``WarmupDecayLR``,
  ``WarmupCosineLR``, filled from ``DummyScheduler(total_num_steps=...)`` as the HF ``no_trainer``
  examples do), the number of steps the schedule was tuned for;
* a prepared data loader that has fed AdaScale updates ends once ``tau`` reached that budget, so
  the loop ends where a base-batch run would, and runs its own code after the loop (save, eval);
  data loaders that fed no update (evaluation) are never cut;
* ``accelerator.log(values)`` receives ``adascale/*`` (as the Trainer's reporters do).

A loop that stops itself with ``adascale.budget_spent(...)`` is unchanged: it stops at the same
update. Under the runner, AdaScale with no known budget logs a warning naming the fix.
``ADASCALE_NO_ACCELERATE_PATCH=1`` switches the patch off; :func:`unpatch` undoes it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import weakref
from types import ModuleType
from typing import Any

import torch.utils.data

from .._compat import accelerator_optimizers, accelerator_schedulers
from .._docs import see
from ..optimizer import AdaScale
from ..unwrap import find
from ._metrics import adascale_metrics
from ._post_import import forget, when_imported

__all__ = ["install", "unpatch", "budget_of", "leave_to_trainer", "NO_PATCH_ENV", "RUNNER_ENV"]

logger = logging.getLogger(__name__)

NO_PATCH_ENV = "ADASCALE_NO_ACCELERATE_PATCH"
RUNNER_ENV = "ADASCALE_RUNNER"  # set by python -m adascale_shard.run: the script was not written for AdaScale
_MODULE = "accelerate.accelerator"
_ORIGINALS = "_adascale_shard_originals"
_LOADER_CLASSES = ("DataLoaderShard", "DataLoaderDispatcher")  # what prepare() returns for a DataLoader


def install() -> None:
    """Wrap ``Accelerator.prepare`` and ``log`` now if Accelerate is imported, else when it is."""
    if os.environ.get(NO_PATCH_ENV, "") == "1":
        logger.info("adascale_shard: %s=1, Accelerate is not patched", NO_PATCH_ENV)
        return
    when_imported(_MODULE, patch_accelerator)


def patch_accelerator(module: ModuleType) -> None:
    """Wrap ``module.Accelerator.prepare`` and ``.log`` (idempotent)."""
    accelerator_cls = module.Accelerator
    if _ORIGINALS in vars(accelerator_cls):
        return
    prepare, log = accelerator_cls.prepare, accelerator_cls.log

    @functools.wraps(prepare)
    def prepare_and_watch(self, *args, **kwargs):
        result = prepare(self, *args, **kwargs)
        _watch(self, result if isinstance(result, tuple) else (result,))
        return result

    @functools.wraps(log)
    def log_with_adascale(self, values, *args, **kwargs):
        return log(self, _with_metrics(self, values), *args, **kwargs)

    setattr(accelerator_cls, _ORIGINALS, {"prepare": prepare, "log": log})
    accelerator_cls.prepare = prepare_and_watch
    accelerator_cls.log = log_with_adascale
    data_loader = sys.modules["accelerate.data_loader"]  # imported by accelerate.accelerator
    for name in _LOADER_CLASSES:
        loader_cls = getattr(data_loader, name)
        original_iter = loader_cls.__iter__

        def iter_to_budget(self, _original=original_iter):
            return _iter_to_budget(self, _original)

        setattr(loader_cls, _ORIGINALS, {"__iter__": original_iter})
        loader_cls.__iter__ = functools.wraps(original_iter)(iter_to_budget)


def unpatch() -> None:
    """Give ``Accelerator`` its own methods back; an Accelerate imported later is not patched."""
    forget(_MODULE)
    classes = [getattr(sys.modules.get(_MODULE), "Accelerator", None)]
    classes += [getattr(sys.modules.get("accelerate.data_loader"), name, None) for name in _LOADER_CLASSES]
    for cls in classes:
        if cls is not None and _ORIGINALS in vars(cls):
            for name, method in vars(cls)[_ORIGINALS].items():
                setattr(cls, name, method)
            delattr(cls, _ORIGINALS)


def _adascale_of(accelerator: Any) -> AdaScale | None:
    for optimizer in accelerator_optimizers(accelerator):
        adascale = find(optimizer)
        if adascale is not None:
            return adascale
    return None


def budget_of(accelerator: Any) -> int | None:
    """The ``total_num_steps`` of the accelerator's prepared scheduler (DeepSpeed's JSON schedulers
    that decay have one), or ``None``."""
    for scheduler in accelerator_schedulers(accelerator):
        for _ in range(8):  # AcceleratedScheduler / DeepSpeedSchedulerWrapper keep it in .scheduler
            total = getattr(scheduler, "total_num_steps", None)
            if isinstance(total, int) and total > 0:
                return total
            scheduler = getattr(scheduler, "scheduler", None)
            if scheduler is None:
                break
    return None


def leave_to_trainer(accelerator: Any) -> None:
    """The HF Trainer drives this accelerator's AdaScale (budget, schedule, metrics): no cut, no check."""
    accelerator._adascale_trainer_flow = True


def _watch(accelerator: Any, prepared: tuple[Any, ...]) -> None:
    if getattr(accelerator, "_adascale_trainer_flow", False):
        return
    loaders = [obj for obj in prepared if _is_data_loader(obj)]
    for loader in loaders:
        _cut_at_budget(loader, accelerator)
    adascale = _adascale_of(accelerator)
    if adascale is None or getattr(accelerator, "_adascale_budget_checked", False):
        return
    if not any(obj is not None and find(obj) is adascale for obj in prepared):
        return
    accelerator._adascale_budget_checked = True
    budget = budget_of(accelerator)
    if budget is not None:
        logger.info(
            "AdaScale: the budget is the scheduler's total_num_steps=%d scale-invariant steps; the "
            "training data ends once tau reaches it",
            budget,
        )
    elif os.environ.get(RUNNER_ENV) == "1":
        logger.warning(
            "AdaScale: this loop's budget is unknown (its scheduler has no total_num_steps), so it runs "
            "its own number of updates while tau grows by the gain per update, past the schedule it was "
            'tuned for. Use a DeepSpeed JSON "scheduler" with total_num_steps (WarmupDecayLR, '
            "WarmupCosineLR; DummyScheduler(total_num_steps=...)), or stop the loop with "
            "adascale_shard.unwrap(optimizer).budget_spent(steps)" + see("accelerate-loop-budget-unknown")
        )


def _is_data_loader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


def _cut_at_budget(loader: Any, accelerator: Any) -> None:
    if type(loader).__name__ in _LOADER_CLASSES:  # type(): Accelerate's loaders report DataLoader as __class__
        loader._adascale_accelerator = weakref.ref(accelerator)
        loader._adascale_feeds_updates = False


def _iter_to_budget(self: Any, original: Any):
    reference = self.__dict__.get("_adascale_accelerator")
    accelerator = reference() if reference is not None else None
    adascale = _adascale_of(accelerator) if accelerator is not None else None
    budget = budget_of(accelerator) if adascale is not None else None
    iterator = original(self)
    if budget is None:
        yield from iterator
        return
    tau = adascale.tau  # grows by the gain (>= 1) at every update: a cheap update counter
    for batch in iterator:
        self._adascale_feeds_updates = self._adascale_feeds_updates or adascale.tau > tau
        tau = adascale.tau
        if self._adascale_feeds_updates and adascale.budget_spent(budget):
            iterator.close()
            end = getattr(self, "end", None)  # Accelerate's data loaders leave the gradient state
            if end is not None:
                end()
            logger.info("AdaScale: tau %.2f reached the budget %d: the training data ends", adascale.tau, budget)
            return
        yield batch


def _with_metrics(accelerator: Any, values: Any) -> Any:
    adascale = _adascale_of(accelerator)
    if adascale is None or not isinstance(values, dict) or any(str(k).startswith("adascale/") for k in values):
        return values
    return {**values, **adascale_metrics(adascale)}
