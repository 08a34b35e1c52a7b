"""The pure math against hand-computed values, and its properties under hypothesis."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adascale_shard import estimators as est


def test_estimate_hand_computed():
    # N=4, A=3, B=1: var_micro = 4/3 * 2 = 8/3, sqr = 1 - (8/3)/4 = 1/3, var_base = 8/3 * 4/4.
    e = est.estimate(micro_sqr_mean=3.0, grad_sqr=1.0, num_micro=4, scale=4.0)
    assert e.grad_var == pytest.approx(8 / 3)
    assert e.grad_sqr == pytest.approx(1 / 3)
    # The gain: (8/3 + 1/3) / (8/3/4 + 1/3) = 3 / 1 = 3.
    assert est.gain(e.grad_var, e.grad_sqr, 4.0) == pytest.approx(3.0)


def test_estimate_converts_variance_to_the_base_batch():
    # Same micro statistics, base batch twice the micro-batch (S = N/2): variance of a base
    # batch is half that of a micro-batch.
    micro = est.estimate(3.0, 1.0, num_micro=4, scale=4.0)
    base = est.estimate(3.0, 1.0, num_micro=4, scale=2.0)
    assert base.grad_var == pytest.approx(micro.grad_var / 2)
    assert base.grad_sqr == pytest.approx(micro.grad_sqr)


def test_estimate_refuses_one_micro_gradient():
    with pytest.raises(ValueError, match="at least 2 micro-gradients"):
        est.estimate(1.0, 1.0, num_micro=1, scale=1.0)


def test_gain_limits():
    assert est.gain(0.0, 1.0, 8.0) == 1.0  # no noise: identity scaling
    assert est.gain(1.0, 0.0, 8.0) == 8.0  # pure noise: linear scaling
    assert est.gain(0.0, 0.0, 8.0) == 1.0  # no information
    assert est.gain(math.nan, 1.0, 8.0) == 1.0
    with pytest.raises(ValueError):
        est.gain(1.0, 1.0, 0.5)


def test_clamp_is_relative_to_the_magnitudes():
    var, sqr = est.clamp_averages(-1.0, 4.0, min_relative_var=1e-6)
    assert (var, sqr) == (4e-6, 4.0)
    var, sqr = est.clamp_averages(2.0, -3.0)
    assert (var, sqr) == (2.0, 0.0)
    # Scaling both by c^2 (a loss scale c) scales the clamped values and keeps the gain.
    c2 = 1e8
    v1, s1 = est.clamp_averages(-1.0, 4.0)
    v2, s2 = est.clamp_averages(-1.0 * c2, 4.0 * c2)
    assert est.gain(v1, s1, 16) == pytest.approx(est.gain(v2, s2, 16), rel=1e-12)


def test_ema_bias_correction_is_exact_for_a_constant():
    avg, weight = 0.0, 0.0
    for _ in range(5):
        avg, weight = est.ema_update(avg, weight, 7.0, 0.9)
        assert avg / weight == pytest.approx(7.0, rel=1e-12)
    with pytest.raises(ValueError):
        est.ema_update(avg, weight, 1.0, 1.0)


def test_default_smoothing_forgets_per_base_step():
    # Two updates at S=1 forget as much as one at S=2.
    assert est.default_smoothing(1) ** 2 == pytest.approx(est.default_smoothing(2))


finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.0, max_value=1e30, allow_nan=False, allow_infinity=False)
scales = st.floats(min_value=1.0, max_value=1e4, allow_nan=False)


@given(var=finite, sqr=finite, scale=scales)
def test_gain_is_in_1_to_scale_and_never_nan(var, sqr, scale):
    v, s = est.clamp_averages(var, sqr)
    r = est.gain(v, s, scale)
    assert not math.isnan(r)
    assert 1.0 <= r <= scale


@given(a=positive, b=positive, n=st.integers(min_value=2, max_value=4096), scale=scales)
def test_estimates_finite_from_finite_input(a, b, n, scale):
    e = est.estimate(a, b, n, scale)
    assert math.isfinite(e.grad_var) and math.isfinite(e.grad_sqr)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=16),
    dim=st.integers(min_value=1, max_value=6),
    noise=st.floats(min_value=0.05, max_value=5.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_estimators_are_unbiased_on_synthetic_gradient_streams(n, dim, noise, seed):
    """Draw N micro-gradients g_i = mu + noise, many times; the mean of each estimate must match
    the truth within 5 standard errors."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=dim)
    stds = noise * rng.uniform(0.2, 1.0, size=dim)
    trials = 4000
    g = mu + stds * rng.normal(size=(trials, n, dim))
    a = (g**2).sum(-1).mean(-1)
    b = (g.mean(1) ** 2).sum(-1)
    scale = float(n)
    var = np.empty(trials)
    sqr = np.empty(trials)
    for t in range(trials):
        e = est.estimate(float(a[t]), float(b[t]), n, scale)
        var[t], sqr[t] = e.grad_var, e.grad_sqr
    true_var = float((stds**2).sum())  # base batch = one micro-batch (S = N)
    true_sqr = float((mu**2).sum())
    for values, truth in ((var, true_var), (sqr, true_sqr)):
        stderr = values.std(ddof=1) / math.sqrt(trials)
        assert abs(values.mean() - truth) <= 5 * stderr + 1e-12
