"""Pure math of AdaScale: estimates, their averages and the gain (no ``torch.distributed``).

Symbols follow Johnson et al., "AdaScale SGD" (ICML 2020). ``N`` micro-gradients ``g_i`` of an
update average to ``G``; the user's schedule was tuned at a base batch ``S`` times smaller than
the global batch::

    A        = (1/N) sum_i ||g_i||^2
    B        = ||G||^2
    var_micro = N/(N-1) (A - B)          unbiased trace of one micro-gradient's covariance
    sqr       = B - var_micro / N        unbiased ||grad F||^2
    var       = var_micro * S / N        variance of a base-batch gradient
    gain      = (var + sqr) / (var / S + sqr)   in [1, S]

Every function takes and returns Python floats, so it can be checked against hand-computed
values and property-tested without a model. This module holds what the optimizer's estimator
needs; the batch-size advisor's prediction math, built on it, is in :mod:`adascale_shard.advisor.model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "Estimate",
    "estimate",
    "default_smoothing",
    "ema_update",
    "clamp_averages",
    "gain",
    "noise_scale",
]

DEFAULT_MIN_RELATIVE_VAR = 1e-6


@dataclass(frozen=True)
class Estimate:
    """Unbiased one-update estimates, before any averaging or clamping.

    ``grad_var`` is the trace of the covariance of a base-batch gradient (``sigma^2`` of the
    paper at the base batch); ``grad_sqr`` is ``||grad F||^2`` (``mu^2``). Either may be negative:
    they are unbiased, not clamped.
    """

    grad_var: float
    grad_sqr: float


def estimate(micro_sqr_mean: float, grad_sqr: float, num_micro: int, scale: float) -> Estimate:
    """Unbiased variance and squared-mean estimates of one update.

    Args:
        micro_sqr_mean (float): ``A = (1/N) sum_i ||g_i||^2`` over the ``N`` micro-gradients.
        grad_sqr (float): ``B = ||G||^2``, the squared norm of their mean.
        num_micro (int): ``N``, at least 2 (one gradient carries no variance information).
        scale (float): ``S = global_batch / base_batch``, at least 1.
    """
    if num_micro < 2:
        raise ValueError(
            f"estimate() needs at least 2 micro-gradients, got num_micro={num_micro}: "
            "one gradient carries no variance information"
        )
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    n = float(num_micro)
    var_micro = n / (n - 1.0) * (micro_sqr_mean - grad_sqr)
    sqr = grad_sqr - var_micro / n
    return Estimate(grad_var=var_micro * scale / n, grad_sqr=sqr)


def default_smoothing(scale: float) -> float:
    """EMA weight on the old average for one update at scale ``S``: ``0.999 ** S``.

    One update at scale ``S`` does the work of ``S`` base steps, so the average forgets at the
    same rate per base step (time constant of about 1000 base steps) whatever the scale.
    """
    return 0.999**scale


def ema_update(average: float, weight: float, value: float, smoothing: float) -> tuple[float, float]:
    """One step of a bias-corrected exponential moving average.

    Returns the new ``(average, weight)``; the corrected value is ``average / weight``. Keeping the
    unnormalised weight (instead of a step count) lets ``smoothing`` change between updates, as
    it does when the scale changes on resume.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    return smoothing * average + (1.0 - smoothing) * value, smoothing * weight + (1.0 - smoothing)


def clamp_averages(
    grad_var: float, grad_sqr: float, min_relative_var: float = DEFAULT_MIN_RELATIVE_VAR
) -> tuple[float, float]:
    """Clamp averaged estimates to the values the gain formula accepts.

    ``grad_sqr`` is clamped at 0 and ``grad_var`` at ``min_relative_var * grad_sqr``: a floor
    relative to the magnitudes, so multiplying the loss by any constant leaves the gain as it is.
    Clamping happens after averaging: clamping each update's noisy estimate first biases the
    gain downward when the noise is high.
    """
    sqr = max(grad_sqr, 0.0)
    var = max(grad_var, min_relative_var * sqr)
    return var, sqr


def gain(grad_var: float, grad_sqr: float, scale: float) -> float:
    """The gain ratio ``r = (var + sqr) / (var / S + sqr)``, in ``[1, S]``.

    Takes clamped values (see :func:`clamp_averages`). Zero or non-finite statistics carry no
    information and give ``1.0`` (identity scaling, the safe side).
    """
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    numerator = grad_var + grad_sqr
    denominator = grad_var / scale + grad_sqr
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0.0:
        return 1.0
    # Rounding can step a hair outside [1, S]; the bound is part of the contract.
    return min(max(numerator / denominator, 1.0), float(scale))


def noise_scale(grad_var: float, grad_sqr: float) -> float:
    """The gradient noise scale ``var / sqr`` in base batches (``inf`` when ``sqr <= 0``, ``nan``
    when both are 0 or either is not finite)."""
    if not (math.isfinite(grad_var) and math.isfinite(grad_sqr)) or (grad_var == 0.0 and grad_sqr == 0.0):
        return math.nan
    if grad_sqr <= 0.0:
        return math.inf
    return max(grad_var, 0.0) / grad_sqr
