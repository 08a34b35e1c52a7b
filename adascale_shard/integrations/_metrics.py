"""The ``adascale/*`` values every integration adds to its logs (Trainer reporters, ``accelerator.log``)."""

from __future__ import annotations

import math

from ..optimizer import AdaScale

__all__ = ["LOG_KEYS", "adascale_metrics"]

LOG_KEYS = ("gain", "tau", "var", "sqr", "noise_scale", "efficiency", "S", "lr", "effective_lr", "updates")


def adascale_metrics(adascale: AdaScale) -> dict[str, float]:
    """``adascale/<key>`` for each of :data:`LOG_KEYS` that is finite (``var`` and ``sqr`` are not
    before the first estimate)."""
    stats = adascale.stats()
    return {f"adascale/{key}": stats[key] for key in LOG_KEYS if math.isfinite(stats[key])}
