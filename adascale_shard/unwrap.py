"""Find the AdaScale optimizer behind whatever wraps it: one function for every engine and launcher."""

from __future__ import annotations

import sys
from typing import Any

from ._compat import accelerator_optimizers
from ._docs import see
from .optimizer import AdaScale

__all__ = ["unwrap"]

_MAX_DEPTH = 8


def _optimizer_chain(obj: Any) -> list[Any]:
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
    # Without importing Accelerate: if it was never imported, no Accelerator can exist.
    module = sys.modules.get("accelerate")
    return module is not None and isinstance(obj, module.Accelerator)


def _from_accelerator(accelerator: Any) -> AdaScale:
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)  # set under DeepSpeed only
    if wrapped is not None:
        return unwrap(wrapped.engine)
    found: list[AdaScale] = []
    for prepared in accelerator_optimizers(accelerator):
        adascale = find(prepared)
        if adascale is not None and not any(adascale is seen for seen in found):
            found.append(adascale)
    if len(found) == 1:
        return found[0]
    if not found:
        raise TypeError(
            "unwrap: the Accelerator has no prepared AdaScale optimizer. Call "
            "accelerator.prepare(model, optimizer, ...) first, with optimizer = "
            "AdaScale(torch.optim.SGD(...)) (DDP, FSDP2) or accelerate.utils.DummyOptim and "
            '"optimizer": {"type": "AdaScale"} in the DeepSpeed JSON' + see("accelerator-has-no-adascale-optimizer")
        )
    raise TypeError(
        f"unwrap: the Accelerator holds {len(found)} AdaScale optimizers; pass the "
        "prepared optimizer you mean instead of the Accelerator" + see("accelerator-holds-several-adascale-optimizers")
    )


def find(obj: Any) -> AdaScale | None:
    """:func:`unwrap`, or ``None`` where there is no AdaScale (an Accelerator is not searched)."""
    basic = getattr(obj, "basic_optimizer", None)  # a DeepSpeedEngine
    if isinstance(basic, AdaScale):
        return basic
    return next((item for item in _optimizer_chain(obj) if isinstance(item, AdaScale)), None)


def unwrap(obj: Any) -> AdaScale:
    """The :class:`~adascale_shard.AdaScale` behind ``obj``, for every engine and launcher.

    Args:
        obj: an AdaScale; any optimizer wrapper that keeps the wrapped one in ``.optimizer``
            (Accelerate's ``AcceleratedOptimizer``, DeepSpeed's ZeRO/bf16/fp16 wrappers, the HF
            Trainer's ``trainer.optimizer``); a ``DeepSpeedEngine`` (its ``basic_optimizer``); or an
            ``accelerate.Accelerator`` (its DeepSpeed engine, else its one prepared AdaScale).

    Raises:
        TypeError: no AdaScale is there (the optimizer was not built as AdaScale, or DeepSpeed's
            JSON has another optimizer type), or the ``Accelerator`` holds several.

    Example::

        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        >>> adascale = unwrap(optimizer)      # DDP, FSDP2, DeepSpeed alike
        >>> while not adascale.budget_spent(1000): ...
    """
    if _is_accelerator(obj):
        return _from_accelerator(obj)
    adascale = find(obj)
    if adascale is not None:
        return adascale
    names = " -> ".join(type(item).__name__ for item in _optimizer_chain(obj))
    basic = getattr(obj, "basic_optimizer", None)
    if basic is not None:
        names += f" (DeepSpeed basic_optimizer: {type(basic).__name__})"
    raise TypeError(
        f"unwrap found no AdaScale in {names}. Build the optimizer as "
        "AdaScale(torch.optim.SGD(model.parameters(), ...)) before accelerator.prepare, or, with "
        'DeepSpeed, use accelerate.utils.DummyOptim with "optimizer": {"type": "AdaScale"} in the '
        "DeepSpeed JSON (and import adascale_shard before accelerator.prepare)" + see("unwrap-found-no-adascale")
    )
