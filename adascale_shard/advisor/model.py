"""The advisor's prediction: what AdaScale would do at another scale, from one run's statistics.

Pure Python floats (no torch), built on the estimator math of :mod:`adascale_shard.estimators`.

With ``r = var / sqr`` (the gradient noise scale in base batches,
:func:`adascale_shard.estimators.noise_scale`) the gain is::

    gain(S) = (r + 1) / (r / S + 1)

and the efficiency, the fraction of the linear speed-up ``S`` that one update at scale ``S``
delivers in scale-invariant steps, is::

    efficiency(S) = gain(S) / S = (r + 1) / (r + S)

1 at ``S = 1``, decreasing in ``S``, 1/2 at ``S = r + 2`` (the critical batch of McCandlish et al.
2018, "An Empirical Model of Large-Batch Training", in base batches).

AdaScale's own averaging: the logged ``var`` and ``sqr`` are exponential averages with a time
constant of about 1000 base batches of data: ``1000 / S`` updates, i.e. about ``1000 * gain / S``
scale-invariant steps. At small ``S`` that spans most of a run, so the logged ratio trails the
current noise scale far behind, while a run at a large ``S`` averages over a much shorter stretch
of ``tau``. Predicting what AdaScale would do at another scale therefore (1) undoes the source
run's averaging (:func:`interval_statistics`) and (2) replays AdaScale's averaging at the target
scale (:func:`simulate_taus`); :class:`Model` puts the two together for one run's log.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

from .._docs import see
from ..estimators import clamp_averages, default_smoothing, ema_update, gain, noise_scale

__all__ = [
    "gain_at",
    "efficiency",
    "scale_for_efficiency",
    "noise_scale_from_gain",
    "predicted_updates",
    "interval_statistics",
    "simulate_taus",
    "RunLog",
    "Model",
]


def gain_at(noise: float, scale: float) -> float:
    """The gain at scale ``S`` of a gradient whose noise scale (base batches) is ``noise``:
    ``(r + 1) / (r / S + 1)``; ``r = inf`` gives ``S``, ``r <= 0`` gives 1. ``nan`` gives 1, as
    :func:`~adascale_shard.estimators.gain` does for statistics that carry no information."""
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1, got {scale}" + see("estimator-function-arguments"))
    if math.isnan(noise) or noise <= 0.0:
        return 1.0
    if math.isinf(noise):
        return float(scale)
    return min(max((noise + 1.0) / (noise / scale + 1.0), 1.0), float(scale))


def efficiency(grad_var: float, grad_sqr: float, scale: float) -> float:
    """``gain(S) / S``, in ``(0, 1]``: the fraction of the linear speed-up ``S`` that an update at
    scale ``S`` turns into progress (scale-invariant steps per update over ``S``).

    For a user with one ``AdaScale.stats()`` record in hand: ``efficiency(stats["var"],
    stats["sqr"], S)`` is what an update at scale ``S`` would deliver *now*, with no averaging lag
    (``var`` is per base batch, so it does not depend on the scale it was measured at); at the
    run's own scale it equals ``stats()["efficiency"]``. The command's per-phase prediction
    (:class:`Model`) accounts for AdaScale's averaging and is the better guide over a whole run.
    """
    return gain(grad_var, grad_sqr, scale) / float(scale)


def scale_for_efficiency(grad_var: float, grad_sqr: float, target: float) -> float:
    """The scale whose efficiency is ``target``: ``S = (r + 1) / target - r`` (at least 1;
    ``inf`` when the noise scale is infinite, 1 when there is no noise).

    The inverse of :func:`efficiency`, for a user who wants the largest scale that still keeps,
    e.g., 80 % of the linear speed-up from one ``AdaScale.stats()`` record:
    ``scale_for_efficiency(stats["var"], stats["sqr"], 0.8)``. Like :func:`efficiency` it assumes
    no averaging lag, so it bounds from above what AdaScale delivers while the noise scale grows
    (the report's ``r + 2 (bound)`` column is its value at ``target = 0.5``).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target efficiency must be in (0, 1], got {target}" + see("estimator-function-arguments"))
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
        raise ValueError(
            f"the gain at scale {scale} carries no noise information: need scale > 1"
            + see("estimator-function-arguments")
        )
    if math.isnan(observed_gain):
        return math.nan
    if observed_gain <= 1.0:
        return 0.0
    if observed_gain >= scale:
        return math.inf
    return scale * (observed_gain - 1.0) / (scale - observed_gain)


def predicted_updates(points, scale: float, start: float = 0.0, end: float | None = None) -> float:
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
        raise ValueError(
            "predicted_updates needs at least one (tau, noise_scale) point" + see("estimator-function-arguments")
        )
    if end is None:
        end = knots[-1][0]
    if end < start:
        raise ValueError(f"end ({end}) is before start ({start})" + see("estimator-function-arguments"))
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


def interval_statistics(records, smoothing: float | None = None) -> list[tuple[float, float, float, float]]:
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


def simulate_taus(
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
        raise ValueError(f"scale must be >= 1, got {scale}" + see("estimator-function-arguments"))
    cuts = sorted(intervals, key=lambda iv: iv[1])
    if not cuts:
        raise ValueError("simulate_taus needs at least one interval" + see("estimator-function-arguments"))
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


# -- one run's log ------------------------------------------------------------------------------
@dataclass
class RunLog:
    """What the advisor takes from a log file (read by :func:`adascale_shard.advisor.load_run`)."""

    source: Path
    points: list[tuple[float, float]]  # (tau, logged averaged noise scale r)
    averaged: list[tuple[float, float, float, float, float]]  # (tau, updates, var, sqr, S), for Model
    scales: list[float]  # logged S values
    gains: list[float]  # logged gains
    inverted: int  # records whose r came from inverting the gain (no var/sqr)


class Model:
    """Predicted update counts at any scale, from one run's logs.

    ``kind == "averaging"`` (logs with ``tau, updates, var, sqr, S``): the logged averages are
    undone between records and AdaScale is replayed at each scale with that scale's averaging.
    ``kind == "instantaneous"``: ``integral dtau / gain_S`` on the logged (averaged) noise scale.
    """

    def __init__(self, log: RunLog, smoothing: float | None = None) -> None:
        self.points = log.points
        self.smoothing = smoothing
        self.end = log.points[-1][0]
        self.intervals = interval_statistics(log.averaged, smoothing) if len(log.averaged) >= 2 else []
        self.kind = "averaging" if self.intervals else "instantaneous"
        self._trajectories: dict[float, list[float]] = {}

    def trajectory(self, scale: float, end: float | None = None) -> list[float]:
        """``tau`` after each replayed update at ``scale`` until ``end`` (averaging model)."""
        end = self.end if end is None else end
        known = self._trajectories.get(scale)
        if known is None or known[-1] < end:
            known = simulate_taus(self.intervals, scale, max(end, self.end), self.smoothing)
            self._trajectories[scale] = known
        return known

    def _count(self, scale: float, tau: float) -> float:
        """Updates (fractional) the replay at ``scale`` takes to reach ``tau``."""
        if tau <= 0.0:
            return 0.0
        taus = self.trajectory(scale, tau)
        i = bisect.bisect_left(taus, tau)
        before = taus[i - 1] if i > 0 else 0.0
        return i + (tau - before) / (taus[i] - before)

    def updates(self, scale: float, start: float = 0.0, end: float | None = None) -> float:
        """Predicted updates to advance ``tau`` from ``start`` to ``end`` (default: the run's end)."""
        end = self.end if end is None else end
        if self.kind == "instantaneous":
            return predicted_updates(self.points, scale, start, end)
        return self._count(scale, end) - self._count(scale, start)

    def updates_to_reach(self, scale: float, end: float) -> int:
        """Whole updates until ``tau >= end``, as AdaScale counts them (``budget_spent``)."""
        if self.kind == "instantaneous":
            return math.ceil(predicted_updates(self.points, scale, 0.0, end) - 1e-9)
        return bisect.bisect_left(self.trajectory(scale, end), end) + 1

    def efficiency(self, scale: float, start: float, end: float) -> float:
        if end <= start:
            return gain_at(self.noise_scale(start, end), scale) / scale
        return (end - start) / (scale * self.updates(scale, start, end))

    def noise_scale(self, start: float, end: float) -> float:
        """``var / sqr`` over ``[start, end]``: of the de-averaged interval means, weighted by their
        overlap (averaging model), or the median logged value (instantaneous model)."""
        if self.kind == "averaging":
            var = sqr = 0.0
            for a, b, v, q in self.intervals:
                overlap = min(b, end) - max(a, start)
                if overlap > 0:
                    var, sqr = var + v * overlap, sqr + q * overlap
            if var or sqr:
                return noise_scale(var, sqr)
        inside = [r for t, r in self.points if start <= t <= end]
        if not inside:
            inside = [min(self.points, key=lambda p: abs(p[0] - end))[1]]
        return _median(inside)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
