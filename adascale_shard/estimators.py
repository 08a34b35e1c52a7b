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
from typing import Any

from ._docs import see

__all__ = [
    "Estimate",
    "estimate",
    "default_smoothing",
    "ema_update",
    "clamp_averages",
    "gain",
    "noise_scale",
    "Estimator",
    "STATE_FORMAT_VERSION",
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
            "one gradient carries no variance information" + see("estimator-function-arguments")
        )
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1, got {scale}" + see("estimator-function-arguments"))
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
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}" + see("estimator-function-arguments"))
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
        raise ValueError(f"scale must be >= 1, got {scale}" + see("estimator-function-arguments"))
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


STATE_FORMAT_VERSION = 2  # 2: one average weight per group (1: one for the model)


class Estimator:
    """AdaScale's estimator, torch-free: the per-group averages, the gain, ``tau`` and counters.

    Fed once per update with the normalised statistics (:meth:`update`), it keeps the
    bias-corrected exponential averages of the unbiased ``var`` and ``sqr`` estimates per group,
    each with its own weight (a group added later starts from its own first estimate), the gain
    from the clamped averages, and ``tau`` advanced by the gain of every applied update.

    Args:
        num_groups: statistics groups (parameter groups, or one for an engine's whole-model norm).
        min_relative_var: floor of the variance relative to the squared norm.
    """

    def __init__(self, num_groups: int, min_relative_var: float = DEFAULT_MIN_RELATIVE_VAR) -> None:
        self.min_relative_var = min_relative_var
        self.tau = 0.0
        self.gain = 1.0
        self.updates = 0
        self.nonfinite_updates = 0
        self.last_nonfinite = False
        self.num_micro = 0
        self.scale = 1.0
        self.grad_var_avg = [0.0] * num_groups
        self.grad_sqr_avg = [0.0] * num_groups
        self.avg_weights = [0.0] * num_groups

    @property
    def num_groups(self) -> int:
        return len(self.grad_var_avg)

    def add_group(self) -> None:
        self.grad_var_avg.append(0.0)
        self.grad_sqr_avg.append(0.0)
        self.avg_weights.append(0.0)

    def reset_groups(self, num_groups: int) -> None:
        """Restart the averages with ``num_groups`` groups (an engine regrouped the statistics)."""
        self.grad_var_avg = [0.0] * num_groups
        self.grad_sqr_avg = [0.0] * num_groups
        self.avg_weights = [0.0] * num_groups

    def update(
        self, micro_sqr_mean: list[float], grad_sqr: list[float], num_micro: int, scale: float, smoothing: float | None
    ) -> bool:
        """Fold one update's statistics in and set the gain; ``False`` if they were not finite
        (then the averages are unchanged). ``micro_sqr_mean`` and ``grad_sqr`` are per group, in
        the units of the applied gradient; ``num_micro >= 2``."""
        self.num_micro, self.scale = num_micro, scale
        self.last_nonfinite = not all(math.isfinite(v) for v in [*micro_sqr_mean, *grad_sqr])
        if self.last_nonfinite:
            self.nonfinite_updates += 1
        else:
            if smoothing is None:
                smoothing = default_smoothing(scale)
            for index in range(self.num_groups):
                est = estimate(micro_sqr_mean[index], grad_sqr[index], num_micro, scale)
                weight = self.avg_weights[index]
                self.grad_var_avg[index], _ = ema_update(self.grad_var_avg[index], weight, est.grad_var, smoothing)
                self.grad_sqr_avg[index], self.avg_weights[index] = ema_update(
                    self.grad_sqr_avg[index], weight, est.grad_sqr, smoothing
                )
        self.gain = gain(*self.averages(range(self.num_groups)), scale)
        return not self.last_nonfinite

    def no_variance_update(self, num_micro: int, scale: float) -> None:
        """An update of one micro-gradient (``N = 1``, ``S = 1``): nothing to estimate, gain 1."""
        self.num_micro, self.scale = num_micro, scale
        self.gain = 1.0

    def advance(self) -> None:
        """An update was applied at the current gain: ``tau`` moves on by it."""
        self.tau += self.gain
        self.updates += 1

    def averages(self, groups) -> tuple[float, float]:
        """The clamped ``(var, sqr)`` of the given groups, summed."""
        indices = [i for i in groups if self.avg_weights[i] > 0.0]  # a group with no estimate yet adds 0
        var = sum(self.grad_var_avg[i] / self.avg_weights[i] for i in indices)
        sqr = sum(self.grad_sqr_avg[i] / self.avg_weights[i] for i in indices)
        return clamp_averages(var, sqr, self.min_relative_var)

    def stats(self) -> dict[str, float]:
        """The whole model's ``gain, tau, var, sqr, noise_scale, efficiency, N, S``, the counters,
        and ``group{i}/var, sqr, gain`` per group."""
        var, sqr = self.averages(range(self.num_groups))
        out = {
            "gain": self.gain,
            "tau": self.tau,
            "var": var,
            "sqr": sqr,
            "noise_scale": var / sqr if sqr > 0 else math.inf,
            "efficiency": self.gain / self.scale,
            "N": float(self.num_micro),
            "S": float(self.scale),
            "updates": float(self.updates),
            "nonfinite_updates": float(self.nonfinite_updates),
            "last_update_nonfinite": float(self.last_nonfinite),
        }
        for index in range(self.num_groups):
            g_var, g_sqr = self.averages([index])
            out[f"group{index}/var"] = g_var
            out[f"group{index}/sqr"] = g_sqr
            out[f"group{index}/gain"] = gain(g_var, g_sqr, self.scale)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``format_version, tau, gain, updates, nonfinite_updates``, the per-group un-normalised
        averages ``grad_var_avg, grad_sqr_avg`` and their weights ``avg_weights``, the last
        ``num_micro`` and ``scale``."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "tau": self.tau,
            "gain": self.gain,
            "updates": self.updates,
            "nonfinite_updates": self.nonfinite_updates,
            "grad_var_avg": list(self.grad_var_avg),
            "grad_sqr_avg": list(self.grad_sqr_avg),
            "avg_weights": list(self.avg_weights),
            "num_micro": self.num_micro,
            "scale": self.scale,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Load :meth:`state_dict` (format 2, or format 1 with one model-wide weight)."""
        version = saved.get("format_version")
        if version == 1:  # one model-wide average weight: every group had it
            saved = {**saved, "avg_weights": [saved["avg_weight"]] * len(saved["grad_var_avg"])}
        elif version != STATE_FORMAT_VERSION:
            raise ValueError(
                f"AdaScale state format_version {version!r} is not supported by this version "
                f"(reads 1 and {STATE_FORMAT_VERSION}): load it with the adascale-shard release that "
                "saved it" + see("state-format-version-not-supported")
            )
        if len(saved["grad_var_avg"]) != self.num_groups:
            raise ValueError(
                f"AdaScale state has {len(saved['grad_var_avg'])} parameter groups but the "
                f"optimizer has {self.num_groups}: build the optimizer with the same groups as the run "
                "that saved it" + see("state-has-a-different-number-of-groups")
            )
        self.tau = float(saved["tau"])
        self.gain = float(saved["gain"])
        self.updates = int(saved["updates"])
        self.nonfinite_updates = int(saved["nonfinite_updates"])
        self.grad_var_avg = [float(v) for v in saved["grad_var_avg"]]
        self.grad_sqr_avg = [float(v) for v in saved["grad_sqr_avg"]]
        self.avg_weights = [float(w) for w in saved["avg_weights"]]
        self.num_micro = int(saved["num_micro"])
        self.scale = float(saved["scale"])
