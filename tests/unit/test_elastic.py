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
