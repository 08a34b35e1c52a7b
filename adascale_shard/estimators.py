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
values and property-tested without a model.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

__all__ = [
    "Estimate",
    "estimate",
    "default_smoothing",
    "ema_update",
    "clamp_averages",
    "gain",
    "gain_at",
    "noise_scale",
    "noise_scale_samples",
    "efficiency",
    "predicted_efficiency",
    "scale_for_efficiency",
    "noise_scale_from_gain",
    "predicted_updates",
    "interval_statistics",
    "simulate_taus",
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


# -- the batch-size advisor -------------------------------------------------------------------
# With r = var / sqr (the gradient noise scale in base batches) the gain is
#     gain(S) = (r + 1) / (r / S + 1)
# and the efficiency, the fraction of the linear speed-up S that one update at scale S delivers
# in scale-invariant steps, is
#     efficiency(S) = gain(S) / S = (r + 1) / (r + S),
# 1 at S = 1, decreasing in S, 1/2 at S = r + 2 (the critical batch of McCandlish et al. 2018,
# "An Empirical Model of Large-Batch Training", in base batches).


def noise_scale(grad_var: float, grad_sqr: float) -> float:
    """The gradient noise scale ``var / sqr`` in base batches (``inf`` when ``sqr <= 0``, ``nan``
    when both are 0 or either is not finite)."""
    if not (math.isfinite(grad_var) and math.isfinite(grad_sqr)) or (grad_var == 0.0 and grad_sqr == 0.0):
        return math.nan
    if grad_sqr <= 0.0:
        return math.inf
    return max(grad_var, 0.0) / grad_sqr


def noise_scale_samples(grad_var: float, grad_sqr: float, base_batch_size: float) -> float:
    """``B_noise = tr(Sigma_1) / |G|^2`` in samples (McCandlish et al. 2018).

    ``var`` is the variance of a *mean over the base batch* of ``B0`` samples, i.e. the
    per-sample variance divided by ``B0``; so the per-sample noise scale is ``B0 * var / sqr``.
    """
    if not base_batch_size > 0:
        raise ValueError(f"base_batch_size must be > 0 samples, got {base_batch_size}")
    return base_batch_size * noise_scale(grad_var, grad_sqr)


def gain_at(noise: float, scale: float) -> float:
    """The gain at scale ``S`` of a gradient whose noise scale (base batches) is ``noise``:
    ``(r + 1) / (r / S + 1)``; ``r = inf`` gives ``S``, ``r <= 0`` gives 1. ``nan`` gives 1, as
    :func:`gain` does for statistics that carry no information."""
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if math.isnan(noise) or noise <= 0.0:
        return 1.0
    if math.isinf(noise):
        return float(scale)
    return min(max((noise + 1.0) / (noise / scale + 1.0), 1.0), float(scale))


def efficiency(grad_var: float, grad_sqr: float, scale: float) -> float:
    """``gain(S) / S``, in ``(0, 1]``: the fraction of the linear speed-up ``S`` that an update at
    scale ``S`` turns into progress (scale-invariant steps per update over ``S``)."""
    return gain(grad_var, grad_sqr, scale) / float(scale)


def predicted_efficiency(grad_var: float, grad_sqr: float, scales) -> list[float]:  # noqa: ANN001
    """:func:`efficiency` at each scale of ``scales``, from statistics measured at any scale
    (``var`` is per base batch, so it does not depend on the scale it was measured at)."""
    return [efficiency(grad_var, grad_sqr, s) for s in scales]


def scale_for_efficiency(grad_var: float, grad_sqr: float, target: float) -> float:
    """The scale whose efficiency is ``target``: ``S = (r + 1) / target - r`` (at least 1;
    ``inf`` when the noise scale is infinite, 1 when there is no noise)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target efficiency must be in (0, 1], got {target}")
    r = noise_scale(grad_var, grad_sqr)
    if math.isnan(r) or r <= 0.0:
        return 1.0
    if math.isinf(r):
        return math.inf
    return max(1.0, (r + 1.0) / target - r)


def noise_scale_from_gain(observed_gain: float, scale: float) -> float:
    """Invert the gain: the noise scale ``r = var / sqr`` that gives ``observed_gain`` at ``scale``.

    ``g = (r + 1) / (r / S + 1)``  =>  ``g r / S + g = r + 1``  =>  ``r = S (g - 1) / (S - g)``.
    ``g <= 1`` gives 0 and ``g >= S`` gives ``inf`` (the gain is clamped to ``[1, S]``, so those
    ends only bound ``r``). A run at ``S = 1`` has gain 1 whatever the noise: it cannot be inverted.
    """
    if not scale > 1:
        raise ValueError(f"the gain at scale {scale} carries no noise information: need scale > 1")
    if math.isnan(observed_gain):
        return math.nan
    if observed_gain <= 1.0:
        return 0.0
    if observed_gain >= scale:
        return math.inf
    return scale * (observed_gain - 1.0) / (scale - observed_gain)


def predicted_updates(points, scale: float, start: float = 0.0, end: float | None = None) -> float:  # noqa: ANN001
    """Updates AdaScale at ``scale`` needs to advance ``tau`` from ``start`` to ``end``:
    ``integral of dtau / gain_S(r(tau))``, where ``points`` are ``(tau, r)`` pairs (the noise
    scale in base batches measured along ``tau``, at any scale).

    ``1 / gain`` is interpolated linearly in ``tau`` between the points and held constant before
    the first and after the last; ``end`` defaults to the last point's ``tau``. Each update
    advances ``tau`` by its gain, so this is the continuous limit of the update count; the
    realized average speed-up over the range is ``(end - start) / predicted_updates``.
    """
    knots = sorted((float(t), float(r)) for t, r in points)
    if not knots:
        raise ValueError("predicted_updates needs at least one (tau, noise_scale) point")
    if end is None:
        end = knots[-1][0]
    if end < start:
        raise ValueError(f"end ({end}) is before start ({start})")
    taus = [t for t, _ in knots]
    inv = [1.0 / gain_at(r, scale) for _, r in knots]

    def at(tau: float) -> float:
        if tau <= taus[0]:
            return inv[0]
        if tau >= taus[-1]:
            return inv[-1]
        i = bisect.bisect_right(taus, tau)
        t0, t1 = taus[i - 1], taus[i]
        w = 0.0 if t1 == t0 else (tau - t0) / (t1 - t0)
        return inv[i - 1] + w * (inv[i] - inv[i - 1])

    xs = [start] + [t for t in taus if start < t < end] + [end]
    total = 0.0
    for a, b in zip(xs, xs[1:]):
        total += 0.5 * (b - a) * (at(a) + at(b))
    return total


# -- the advisor's model of AdaScale's own averaging ---------------------------------------------
# The logged ``var`` and ``sqr`` are exponential averages with a time constant of about 1000 base
# batches of data: 1000 / S updates, i.e. about 1000 * gain / S scale-invariant steps. At small S
# that spans most of a run, so the logged ratio trails the current noise scale far behind, while
# a run at a large S averages over a much shorter stretch of tau. Predicting what AdaScale would do
# at another scale therefore (1) undoes the source run's averaging (:func:`interval_statistics`)
# and (2) replays AdaScale's averaging at the target scale (:func:`simulate_taus`).


def interval_statistics(records, smoothing: float | None = None) -> list[tuple[float, float, float, float]]:  # noqa: ANN001
    """Undo the exponential averaging of logged statistics: the mean raw ``var`` and ``sqr``
    estimates of the updates between consecutive log records.

    ``records`` are ``(tau, updates, var, sqr, scale)`` tuples in update order: the bias-corrected
    averages that ``AdaScale.stats()`` reports after ``updates`` updates at ``scale``. With ``beta``
    the per-update smoothing (``default_smoothing(scale)`` unless ``smoothing`` is given), the
    unnormalised average is ``a = c * w`` with ``w`` the bias-correction weight, and over ``k``
    updates ``a_new = beta^k a_old + (1 - beta^k) m``, so ``m`` (a ``beta``-weighted mean of the
    ``k`` raw estimates, unbiased like them) is recovered exactly; clamped averages (a negative
    average logged as 0) and updates skipped for non-finite statistics (counted in ``updates``,
    not averaged) are the exceptions, where the recovery is approximate. Returns
    ``(tau_start, tau_end, var_mean, sqr_mean)`` per interval, ``tau_start`` of the first being 0;
    records that add no update are skipped.
    """
    out: list[tuple[float, float, float, float]] = []
    avg_var = avg_sqr = weight = 0.0
    prev_updates, prev_tau = 0.0, 0.0
    for tau, updates, var, sqr, scale in records:
        k = float(updates) - prev_updates
        if k <= 0:
            continue
        beta = default_smoothing(scale) if smoothing is None else smoothing
        decay = beta**k
        new_weight = decay * weight + (1.0 - decay)
        new_var, new_sqr = var * new_weight, sqr * new_weight
        mean_var = (new_var - decay * avg_var) / (1.0 - decay)
        mean_sqr = (new_sqr - decay * avg_sqr) / (1.0 - decay)
        out.append((prev_tau, float(tau), mean_var, mean_sqr))
        avg_var, avg_sqr, weight = new_var, new_sqr, new_weight
        prev_updates, prev_tau = float(updates), float(tau)
    return out


def simulate_taus(  # noqa: ANN001
    intervals, scale: float, end: float, smoothing: float | None = None, max_updates: int = 1_000_000
) -> list[float]:
    """Replay AdaScale at ``scale`` on statistics measured along ``tau``: ``tau`` after each update
    until it reaches ``end``.

    ``intervals`` are ``(tau_start, tau_end, var, sqr)`` (from :func:`interval_statistics`), taken
    as constant over each interval and held at the last value past the end. The update at ``tau``
    sees the mean of ``var`` and ``sqr`` over ``[tau, tau + previous gain]`` (the stretch of the
    source run its gradients stand for), folds them into the exponential averages with the
    per-update smoothing ``default_smoothing(scale)`` (or ``smoothing``), clamps, and advances
    ``tau`` by the gain, as :class:`~adascale_shard.AdaScale` does. The number of updates to reach
    ``end`` is ``len(result)``.
    """
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    cuts = sorted(intervals, key=lambda iv: iv[1])
    if not cuts:
        raise ValueError("simulate_taus needs at least one interval")
    edges = [0.0] + [float(iv[1]) for iv in cuts]
    values = [(float(iv[2]), float(iv[3])) for iv in cuts]
    cum_var, cum_sqr = [0.0], [0.0]
    for (a, b), (v, q) in zip(zip(edges, edges[1:]), values):
        cum_var.append(cum_var[-1] + v * (b - a))
        cum_sqr.append(cum_sqr[-1] + q * (b - a))

    def integral(tau: float) -> tuple[float, float]:
        i = min(max(bisect.bisect_right(edges, tau) - 1, 0), len(values) - 1)
        v, q = values[i]
        return cum_var[i] + v * (tau - edges[i]), cum_sqr[i] + q * (tau - edges[i])

    beta = default_smoothing(scale) if smoothing is None else smoothing
    avg_var = avg_sqr = weight = 0.0
    tau, step_gain = 0.0, 1.0
    taus: list[float] = []
    while tau < end and len(taus) < max_updates:
        (v0, q0), (v1, q1) = integral(tau), integral(tau + step_gain)
        var, sqr = (v1 - v0) / step_gain, (q1 - q0) / step_gain
        avg_var, weight = ema_update(avg_var, weight, var, beta)
        avg_sqr = beta * avg_sqr + (1.0 - beta) * sqr
        step_gain = gain(*clamp_averages(avg_var / weight, avg_sqr / weight), scale)
        tau += step_gain
        taus.append(tau)
    return taus
