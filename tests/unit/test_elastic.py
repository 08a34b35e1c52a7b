"""Elastic change of scale on a problem with known statistics: the averages describe the model,
the data and the base batch, so a resume at another scale carries them over unchanged and the
gain jumps at once to the true gain of the new scale.

fairscale's ``set_scale`` rescales its variance average by old/new scale, which on such a
problem gives a wrong gain after the change (computed below as the counterfactual)."""

import copy

import pytest
import torch

from adascale_shard import AdaScale, estimators
from tests.unit.test_closed_form import MICRO_BATCH, SAMPLES, LeastSquares, problem, true_gain


def run(opt, model, x, y, updates, num_micro, gen):
    for _ in range(updates):
        idx = torch.randint(SAMPLES, (num_micro, MICRO_BATCH), generator=gen)
        for k in range(num_micro):
            (0.5 * (model(x[idx[k]]) - y[idx[k]]).pow(2).mean() / num_micro).backward()
        opt.step()
        opt.zero_grad()


def test_resume_at_another_scale_keeps_the_averages_and_uses_the_new_scale():
    x, y, w0 = problem(seed=3)
    gen = torch.Generator().manual_seed(7)
    model = LeastSquares(w0)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.0), smoothing=0.999)
    run(opt, model, x, y, 2000, num_micro=4, gen=gen)  # S = N = 4: averages converge
    saved = copy.deepcopy(opt.state_dict())
    truth4, truth16 = (true_gain(x, y, w0, MICRO_BATCH, s) for s in (4, 16))
    assert opt.gain() == pytest.approx(truth4, rel=0.03)

    # Resume with 16 micro-batches per update (e.g. 4x the ranks): S = N = 16.
    resumed_model = LeastSquares(w0)
    resumed = AdaScale(torch.optim.SGD(resumed_model.parameters(), lr=0.0), smoothing=0.999)
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["adascale"]["grad_var_avg"] == saved["adascale"]["grad_var_avg"]
    run(resumed, resumed_model, x, y, 1, num_micro=16, gen=gen)
    assert resumed.stats()["S"] == 16
    error = abs(resumed.gain() - truth16) / truth16
    print(f"\nelastic 4 -> 16: gain {resumed.gain():.3f} right after the change, true {truth16:.3f} ({error:.2%})")
    assert error < 0.05

    # The counterfactual: rescaling the variance average by old/new scale (fairscale set_scale).
    weight = saved["adascale"]["avg_weights"][0]
    var = saved["adascale"]["grad_var_avg"][0] / weight * 4 / 16
    sqr = saved["adascale"]["grad_sqr_avg"][0] / weight
    rescaled = estimators.gain(*estimators.clamp_averages(var, sqr), 16)
    print(f"rescaled-average gain would be {rescaled:.3f} ({abs(rescaled - truth16) / truth16:.0%} off)")
    assert abs(rescaled - truth16) / truth16 > 0.2  # the problem tells the two apart


def test_set_scale_when_the_global_batch_grows():
    """Explicit scale: 4 micro-batches at scale 4, then the global batch doubles (8 micro-batches,
    same base batch) and the launcher calls set_scale(8)."""
    x, y, w0 = problem(seed=4)
    gen = torch.Generator().manual_seed(8)
    model = LeastSquares(w0)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.0), scale=4, smoothing=0.999)
    run(opt, model, x, y, 1500, num_micro=4, gen=gen)
    before = copy.deepcopy(opt.state_dict()["adascale"])
    opt.set_scale(8)
    assert opt.state_dict()["adascale"]["grad_var_avg"] == before["grad_var_avg"]
    run(opt, model, x, y, 1, num_micro=8, gen=gen)
    truth8 = true_gain(x, y, w0, MICRO_BATCH, 8)
    assert opt.gain() == pytest.approx(truth8, rel=0.05)
    with pytest.raises(ValueError, match="impossible"):
        opt.set_scale(0.5)


def test_a_summed_loss_changes_the_units_not_the_gain(caplog):
    """A loss summed over the micro-batches (not divided by their number) makes the applied
    gradient G, and with it the statistics, K times the mean gradient. The gain is a ratio, so at
    a fixed K it is the mean-loss gain; at an elastic change of K the averages carry over in the
    old units, so the history weighs (K_old/K_new)^2 as much as the new estimates (a shorter
    memory, not a biased gain), and the change is logged with where the docs explain it."""
    x, y, w0 = problem(seed=3)
    smoothing = 0.999

    def run_loss(opt, model, updates, num_micro, gen, summed):
        for _ in range(updates):
            idx = torch.randint(SAMPLES, (num_micro, MICRO_BATCH), generator=gen)
            for k in range(num_micro):
                loss = 0.5 * (model(x[idx[k]]) - y[idx[k]]).pow(2).mean()
                (loss if summed else loss / num_micro).backward()
            opt.step()
            opt.zero_grad()

    runs = {}
    for summed in (False, True):
        model = LeastSquares(w0)
        opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.0), smoothing=smoothing)
        gen = torch.Generator().manual_seed(7)  # the same micro-batches in both runs
        run_loss(opt, model, 1000, 4, gen, summed)
        before = (opt.stats(), opt.estimator_state_dict())
        with caplog.at_level("INFO", logger="adascale_shard.optimizer"):
            caplog.clear()
            run_loss(opt, model, 300, 16, gen, summed)
            note = [r.getMessage() for r in caplog.records if "micro-gradients per update" in r.getMessage()]
        runs[summed] = (before, (opt.stats(), opt.estimator_state_dict()), note)

    ((mean_stats0, mean0), (mean_stats1, mean1), mean_note), ((sum_stats0, _), (sum_stats1, sum1), sum_note) = (
        runs[False],
        runs[True],
    )
    assert sum_stats0["gain"] == pytest.approx(mean_stats0["gain"], rel=1e-9)
    assert sum_stats0["var"] == pytest.approx(16 * mean_stats0["var"], rel=1e-9)  # units: K^2 = 16
    # The summed run's average: the mean run's history in units 4^2, its new estimates in 16^2.
    for key in ("grad_var_avg", "grad_sqr_avg"):
        history = mean0[key][0] * smoothing**300
        assert sum1[key][0] == pytest.approx(16 * history + 256 * (mean1[key][0] - history), rel=1e-6)
    truth16 = true_gain(x, y, w0, MICRO_BATCH, 16)
    assert mean_stats1["gain"] == pytest.approx(truth16, rel=0.05)
    assert sum_stats1["gain"] == pytest.approx(truth16, rel=0.05)
    assert len(mean_note) == len(sum_note) == 1
    assert "16 micro-gradients per update, 4 before" in sum_note[0] and "loss-normalisation" in sum_note[0]
