"""Accelerate: find AdaScale behind ``accelerator.prepare``, and carry its estimator through
``accelerator.save_state`` / ``load_state`` on every engine.

``accelerator.prepare`` hides the AdaScale instance behind wrappers that differ per engine:

* DDP and FSDP2 (and one process): an ``AcceleratedOptimizer`` whose ``.optimizer`` is AdaScale;
* DeepSpeed (``DummyOptim`` with ``"optimizer": {"type": "AdaScale"}`` in the JSON, or an AdaScale
  passed in): a ``DeepSpeedOptimizerWrapper`` around DeepSpeed's ZeRO/bf16 wrapper around
  AdaScale; AdaScale is also ``engine.basic_optimizer``, the engine being the prepared model or
  ``accelerator.deepspeed_engine_wrapped.engine``.

:func:`find_adascale` takes any of these (the prepared optimizer, the prepared DeepSpeed model, or
the ``Accelerator``) and returns the AdaScale instance, for ``tau``, ``budget_spent``, ``stats`` and
``ScaleInvariantScheduler``.

Checkpoints: what ``save_state`` does with AdaScale's estimator (``tau``, the averages) depends on
the engine. DDP: Accelerate saves ``optimizer.state_dict()``, which carries it. DeepSpeed:
``engine.save_checkpoint`` carries it in its ``client_state`` (the patch installed by ``import
adascale_shard``). FSDP2: Accelerate goes through torch's ``get_optimizer_state_dict``, which keeps
only ``state`` and ``param_groups`` and drops it. :class:`AdaScaleCheckpoint` is a small
``Stateful`` holding the estimator alone (plain floats, identical on every rank)::

    accelerator.register_for_checkpointing(AdaScaleCheckpoint(optimizer))

Accelerate then writes it next to its own files (``custom_checkpoint_<i>.pkl``, from the main
process) and restores it in ``load_state`` after the model and the optimizer. Register it on every
engine, so one script checkpoints the same way everywhere (where the engine already carries the
estimator, both copies hold the same values); ``load_state`` expects the same registered objects as
``save_state`` had.

This module never imports Accelerate or DeepSpeed: it reads the objects it is given.
"""

from __future__ import annotations

import sys
from typing import Any

from ..optimizer import AdaScale

__all__ = ["find_adascale", "AdaScaleCheckpoint"]

_MAX_DEPTH = 8


def _walk_optimizers(obj: Any) -> list[Any]:
    """``obj``, ``obj.optimizer``, ``obj.optimizer.optimizer``, ... (Accelerate's and DeepSpeed's
    wrappers all keep the wrapped optimizer in ``.optimizer``)."""
    chain = [obj]
    for _ in range(_MAX_DEPTH):
        inner = getattr(chain[-1], "optimizer", None)
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
    return chain


def _is_accelerator(obj: Any) -> bool:
    """True for an ``accelerate.Accelerator``, without importing Accelerate (if it was never
    imported, no Accelerator can exist)."""
    module = sys.modules.get("accelerate")
    return module is not None and isinstance(obj, module.Accelerator)


def find_adascale(obj: Any) -> AdaScale:
    """The :class:`~adascale_shard.AdaScale` instance behind an object ``accelerator.prepare``
    returned, for every engine.

    Args:
        obj: the prepared optimizer (``AcceleratedOptimizer``, ``DeepSpeedOptimizerWrapper``), the
            prepared model under DeepSpeed (a ``DeepSpeedEngine``: its ``basic_optimizer``), the
            ``Accelerator`` itself (its DeepSpeed engine, else its one prepared AdaScale), or an
            AdaScale.

    Raises:
        TypeError: no AdaScale is there (the optimizer was not built as AdaScale, or DeepSpeed's
            JSON has another optimizer type), or the ``Accelerator`` holds several.

    Example::

        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        >>> adascale = find_adascale(optimizer)      # DDP, FSDP2, DeepSpeed alike
        >>> while not adascale.budget_spent(1000): ...
    """
    if isinstance(obj, AdaScale):
        return obj
    if _is_accelerator(obj):
        wrapped = getattr(obj, "deepspeed_engine_wrapped", None)  # set under DeepSpeed only
        if wrapped is not None:
            return find_adascale(wrapped.engine)
        found = []
        for prepared in obj._optimizers:
            try:
                adascale = find_adascale(prepared)
            except TypeError:
                continue
            if not any(adascale is seen for seen in found):
                found.append(adascale)
        if len(found) == 1:
            return found[0]
        if not found:
            raise TypeError(
                "find_adascale: the Accelerator has no prepared AdaScale optimizer. Call "
                "accelerator.prepare(model, optimizer, ...) first, with optimizer = "
                "AdaScale(torch.optim.SGD(...)) (DDP, FSDP2) or accelerate.utils.DummyOptim and "
                '"optimizer": {"type": "AdaScale"} in the DeepSpeed JSON'
            )
        raise TypeError(
            f"find_adascale: the Accelerator holds {len(found)} AdaScale optimizers; pass the "
            "prepared optimizer you mean instead of the Accelerator"
        )
    basic = getattr(obj, "basic_optimizer", None)  # a DeepSpeedEngine
    if isinstance(basic, AdaScale):
        return basic
    chain = _walk_optimizers(obj)
    for item in chain:
        if isinstance(item, AdaScale):
            return item
    names = " -> ".join(type(item).__name__ for item in chain)
    if basic is not None:
        names += f" (DeepSpeed basic_optimizer: {type(basic).__name__})"
    raise TypeError(
        f"find_adascale found no AdaScale in {names}. Build the optimizer as "
        "AdaScale(torch.optim.SGD(model.parameters(), ...)) before accelerator.prepare, or, with "
        'DeepSpeed, use accelerate.utils.DummyOptim with "optimizer": {"type": "AdaScale"} in the '
        "DeepSpeed JSON (and import adascale_shard before accelerator.prepare)"
    )


class AdaScaleCheckpoint:
    """AdaScale's estimator as a ``Stateful`` for ``accelerator.register_for_checkpointing``.

    ``state_dict()`` is :meth:`AdaScale.estimator_state_dict` (``tau``, ``gain``, the averages,
    counters, config: plain Python values, the same on every rank), without the base optimizer's
    state, which Accelerate's engine-specific path saves and restores (and which, under ZeRO-3,
    only DeepSpeed can read: between steps the base optimizer's ``param_groups`` do not list the
    tensors its state is keyed by). ``load_state_dict`` restores the estimator alone.

    Args:
        optimizer: anything :func:`find_adascale` accepts (the prepared optimizer, the DeepSpeed
            engine, the ``Accelerator``, an AdaScale).
    """

    def __init__(self, optimizer: Any) -> None:
        self.adascale = find_adascale(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.adascale.estimator_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "format_version" not in state_dict:
            raise ValueError(
                "AdaScaleCheckpoint.load_state_dict expects the AdaScale estimator state that "
                "AdaScaleCheckpoint.state_dict() saved; this checkpoint holds something else at "
                "this position. Register the same objects, in the same order, before "
                "accelerator.load_state as before accelerator.save_state"
            )
        self.adascale.load_estimator_state_dict(state_dict)
