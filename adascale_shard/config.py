"""AdaScale's settings as data: one keyword-only dataclass, checked on creation.

The fields map one-to-one onto the ``params`` of a DeepSpeed ``"optimizer": {"type":
"AdaScale"}`` block and onto the keyword arguments of :class:`adascale_shard.AdaScale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ._docs import see
from .estimators import DEFAULT_MIN_RELATIVE_VAR

__all__ = ["AdaScaleConfig", "LR_SCALING_RULES"]

LR_SCALING_RULES = ("gain", "sqrt")


@dataclass(frozen=True, kw_only=True)
class AdaScaleConfig:
    """Settings of the AdaScale estimator.

    Args:
        scale (float, optional): ``S = global_batch / base_batch``, where the base batch is the
            batch the learning-rate schedule was tuned with. ``None`` (default) means ``S = N``,
            the number of micro-gradients per update: the base batch is one micro-batch.
        smoothing (float, optional): weight of the old value in the exponential averages of the
            statistics, per update, in ``[0, 1)``. ``None`` (default) uses ``0.999 ** S``.
        lr_scaling (str): ``"gain"`` (default, the paper) applies ``lr * gain``; ``"sqrt"``
            applies ``lr * gain ** 0.5``, a rule proposed for adaptive optimizers, which trained
            worse than ``"gain"`` with AdamW in ``benchmarks/adamw.py`` (README "AdamW").
        min_relative_var (float): floor of the averaged variance relative to the averaged
            squared gradient norm (default ``1e-6``); relative so a loss scale cannot change the
            gain.
    """

    scale: float | None = None
    smoothing: float | None = None
    lr_scaling: str = "gain"
    min_relative_var: float = DEFAULT_MIN_RELATIVE_VAR

    def __post_init__(self) -> None:
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                raise TypeError(
                    f"scale must be a number or None, got {type(self.scale).__name__} "
                    f"{self.scale!r}: pass global_batch / base_batch, or None for S = N" + see("scale-must-be-a-number")
                )
            if not math.isfinite(self.scale) or self.scale < 1:
                raise ValueError(
                    f"scale={self.scale} is impossible: scale is global_batch / base_batch and "
                    "must be a finite number >= 1. A global batch smaller than the base batch "
                    "needs a smaller learning rate, not AdaScale; pass scale=None to use S = N "
                    "(one micro-batch is the base batch)" + see("scale-is-impossible")
                )
        if self.smoothing is not None:
            if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, (int, float)):
                raise TypeError(
                    f"smoothing must be a number or None, got {self.smoothing!r}" + see("smoothing-must-be-a-number")
                )
            if not 0.0 <= self.smoothing < 1.0:
                raise ValueError(
                    f"smoothing={self.smoothing} is out of range: it is the weight of the old "
                    "average per update and must be in [0, 1) (0.99 averages over about 100 "
                    "updates); pass None for the default 0.999 ** scale" + see("smoothing-out-of-range")
                )
        if self.lr_scaling not in LR_SCALING_RULES:
            raise ValueError(
                f"lr_scaling={self.lr_scaling!r} is unknown: use one of {LR_SCALING_RULES} "
                "('gain' multiplies the learning rate by the gain, 'sqrt' by its square root)"
                + see("lr-scaling-unknown")
            )
        if not (isinstance(self.min_relative_var, (int, float)) and 0.0 <= self.min_relative_var < 1.0):
            raise ValueError(
                f"min_relative_var={self.min_relative_var!r} must be a number in [0, 1) "
                "(default 1e-6)" + see("min-relative-var-out-of-range")
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split_kwargs(cls, kwargs: dict[str, Any]) -> tuple["AdaScaleConfig", dict[str, Any]]:
        """Split keyword arguments into this config and the rest (the base optimizer's)."""
        names = cls.field_names()
        own = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**own), rest
