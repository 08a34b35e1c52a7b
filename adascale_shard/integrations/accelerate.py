"""Accelerate: carry AdaScale's estimator through ``accelerator.save_state`` / ``load_state`` on
every engine.

``accelerator.prepare`` hides the AdaScale instance behind wrappers that differ per engine:

* DDP and FSDP2 (and one process): an ``AcceleratedOptimizer`` whose ``.optimizer`` is AdaScale;
* DeepSpeed (``DummyOptim`` with ``"optimizer": {"type": "AdaScale"}`` in the JSON, or an AdaScale
  passed in): a ``DeepSpeedOptimizerWrapper`` around DeepSpeed's ZeRO/bf16 wrapper around
  AdaScale; AdaScale is also ``engine.basic_optimizer``, the engine being the prepared model or
  ``accelerator.deepspeed_engine_wrapped.engine``.

:func:`adascale_shard.unwrap` takes any of these (the prepared optimizer, the prepared DeepSpeed
model, or the ``Accelerator``) and returns the AdaScale instance, for ``tau``, ``budget_spent``,
``stats`` and :func:`adascale_shard.follow_tau`.

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

from typing import Any

from .._docs import see
from ..unwrap import unwrap

__all__ = ["AdaScaleCheckpoint"]


class AdaScaleCheckpoint:
    """AdaScale's estimator as a ``Stateful`` for ``accelerator.register_for_checkpointing``.

    ``state_dict()`` is :meth:`AdaScale.estimator_state_dict` (``tau``, ``gain``, the averages,
    counters, config: plain Python values, the same on every rank), without the base optimizer's
    state, which Accelerate's engine-specific path saves and restores (and which, under ZeRO-3,
    only DeepSpeed can read: between steps the base optimizer's ``param_groups`` do not list the
    tensors its state is keyed by). ``load_state_dict`` restores the estimator alone.

    Args:
        optimizer: anything :func:`adascale_shard.unwrap` accepts (the prepared optimizer, the
            DeepSpeed engine, the ``Accelerator``, an AdaScale).
    """

    def __init__(self, optimizer: Any) -> None:
        self.adascale = unwrap(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.adascale.estimator_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "format_version" not in state_dict:
            raise ValueError(
                "AdaScaleCheckpoint.load_state_dict expects the AdaScale estimator state that "
                "AdaScaleCheckpoint.state_dict() saved; this checkpoint holds something else at "
                "this position. Register the same objects, in the same order, before "
                "accelerator.load_state as before accelerator.save_state" + see("adascalecheckpoint-got-something-else")
            )
        self.adascale.load_estimator_state_dict(state_dict)
