"""The AdaScale optimizer in one process: construction, the update protocol, state."""

import copy
import logging
import math
import subprocess
import sys

import pytest
import torch

from adascale_shard import AdaScale, follow_tau


def make_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model


def micro_batches(update, k, size=8, seed=1234):
    gen = torch.Generator().manual_seed(seed + update)
    return [(torch.randn(size, 6, generator=gen), torch.randn(size, 1, generator=gen)) for _ in range(k)]


def accumulate(model, batches, loss_scale=1.0):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y) / len(batches)
        (loss * loss_scale).backward()


def train(model, opt, updates, k=4, start=0, clip=None, loss_scale=1.0):
    trace = []
    for u in range(start, start + updates):
        accumulate(model, micro_batches(u, k), loss_scale)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        trace.append((opt.gain(), opt.tau))
    return trace


# -- construction --------------------------------------------------------------------------------
def test_wrap_and_params_first_build_the_same_optimizer():
    m1, m2 = make_model(), make_model()
    a = AdaScale(torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9))
    b = AdaScale(m2.parameters(), optimizer="sgd", lr=0.1, momentum=0.9)
    assert isinstance(b.optimizer, torch.optim.SGD)
    assert b.param_groups[0]["momentum"] == 0.9
    assert train(m1, a, 3) == train(m2, b, 3)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_params_first_defaults_to_sgd_and_accepts_classes_and_groups():
    m = make_model()
    opt = AdaScale(m.parameters(), lr=0.1)
    assert type(opt.optimizer) is torch.optim.SGD
    groups = [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.01}]
    opt = AdaScale(groups, optimizer=torch.optim.AdamW, lr=1e-3, scale=2)
    assert type(opt.optimizer) is torch.optim.AdamW and len(opt.param_groups) == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"optimizer": "Lion"}, ValueError, "not a torch.optim optimizer.*SGD"),
        ({"optimizer": "AdaScale"}, ValueError, "cannot wrap itself"),
        ({"optimizer": 3}, TypeError, "torch.optim name"),
        ({"optimizer": "SGD", "lr": 0.1, "betas": (0.9, 0.99)}, TypeError, "could not build the base optimizer SGD"),
        ({"lr": 0.1, "scale": 0.5}, ValueError, "scale=0.5 is impossible"),
        ({"lr": 0.1, "scale": "4"}, TypeError, "scale must be a number"),
        ({"lr": 0.1, "scale": math.inf}, ValueError, "finite number >= 1"),
        ({"lr": 0.1, "smoothing": 1.0}, ValueError, r"smoothing=1.0 is out of range.*\[0, 1\)"),
        ({"lr": 0.1, "lr_scaling": "linear"}, ValueError, "lr_scaling='linear' is unknown"),
        ({"lr": 0.1, "min_relative_var": -1}, ValueError, "min_relative_var"),
    ],
)
def test_bad_input_names_the_setting(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaScale(make_model().parameters(), **kwargs)


def test_wrapping_an_instance_refuses_base_kwargs_and_double_wrapping():
    sgd = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="set them on the instance"):
        AdaScale(sgd, lr=0.2)
    with pytest.raises(TypeError, match="cannot wrap another AdaScale"):
        AdaScale(AdaScale(sgd))
    with pytest.raises(TypeError, match="single tensor"):
        AdaScale(torch.zeros(2, requires_grad=True))


def test_frozen_model_is_refused():
    m = make_model()
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires a gradient"):
        AdaScale(m.parameters(), lr=0.1)


def test_import_is_light():
    code = "import sys, adascale_shard; print(sorted(m for m in ('deepspeed','transformers','accelerate','datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- one optimizer for everybody -----------------------------------------------------------------
def test_param_groups_and_state_are_the_base_optimizers():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    assert opt.param_groups is opt.optimizer.param_groups
    train(m, opt, 1)
    assert opt.state is opt.optimizer.state and len(opt.state) == 4
    new_groups = [dict(g) for g in opt.param_groups]  # ZeRO assigns param_groups
    opt.param_groups = new_groups
    assert opt.optimizer.param_groups is new_groups
    assert isinstance(opt, torch.optim.Optimizer)


def test_lr_times_gain_is_applied_and_lr_is_left_alone():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1))
    accumulate(m, micro_batches(0, 4))
    before = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1
    assert opt.gain() > 1.0
    for p, p0, g in zip(m.parameters(), before, grads):
        torch.testing.assert_close(p0 - p, 0.1 * opt.gain() * g)
    assert opt.stats()["effective_lr"] == pytest.approx(0.1 * opt.gain())


def test_sqrt_rule_uses_the_square_root_of_the_gain():
    m1, m2 = make_model(), make_model()
    a = AdaScale(torch.optim.AdamW(m1.parameters(), lr=1e-2))
    b = AdaScale(torch.optim.AdamW(m2.parameters(), lr=1e-2), lr_scaling="sqrt")
    train(m1, a, 1)
    train(m2, b, 1)
    assert a.gain() == pytest.approx(b.gain())
    assert b.lr_factor() == pytest.approx(math.sqrt(b.gain()))
    assert b.stats()["effective_lr"] == pytest.approx(1e-2 * math.sqrt(b.gain()))


@pytest.mark.parametrize("lr_scaling", ["gain", "sqrt"])
def test_decoupled_weight_decay_advances_with_tau(lr_scaling):
    """Under either lr rule an update worth `gain` base steps decays the weights by
    lr * weight_decay * gain (AdamW), and the groups' settings are left as they were."""
    lr, wd = 1e-2, 0.5
    m = make_model()
    opt = AdaScale(torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd), lr_scaling=lr_scaling)
    train(m, opt, 2)  # Adam state exists; the next step is a typical one
    accumulate(m, micro_batches(7, 4))
    shadow = copy.deepcopy(m)
    reference = torch.optim.AdamW(shadow.parameters(), lr=lr, weight_decay=wd)
    reference.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    for p, q in zip(m.parameters(), shadow.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    gain, factor = opt.gain(), opt.lr_factor()
    assert gain > 1.5 and factor == pytest.approx(gain if lr_scaling == "gain" else math.sqrt(gain))
    for group in reference.param_groups:  # the plain AdamW step such an update must equal
        group["lr"], group["weight_decay"] = lr * factor, wd * gain / factor
    reference.step()
    for p, q in zip(m.parameters(), shadow.parameters()):
        torch.testing.assert_close(p, q)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(lr, wd)] * len(opt.param_groups)


def test_coupled_weight_decay_is_left_to_the_gradient():
    """Adam's (coupled, L2) weight decay is part of the gradient: the sqrt rule does not touch it."""
    m = make_model()
    opt = AdaScale(torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.5), lr_scaling="sqrt")
    train(m, opt, 2)
    accumulate(m, micro_batches(7, 4))
    shadow = copy.deepcopy(m)
    reference = torch.optim.Adam(shadow.parameters(), lr=1e-2, weight_decay=0.5)
    reference.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    for p, q in zip(m.parameters(), shadow.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    for group in reference.param_groups:
        group["lr"] = 1e-2 * opt.lr_factor()
    reference.step()
    for p, q in zip(m.parameters(), shadow.parameters()):
        torch.testing.assert_close(p, q)


def test_lr_scheduler_and_grad_scaler_see_one_optimizer():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for u in range(2):
        for x, y in micro_batches(u, 4):
            scaler.scale(torch.nn.functional.mse_loss(m(x), y) / 4).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
    assert opt.stats()["updates"] == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)


# -- the update protocol -------------------------------------------------------------------------
def test_step_without_backward_changes_nothing():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1))
    train(m, opt, 2)
    before = copy.deepcopy(opt.state_dict()["adascale"])
    accumulate(m, micro_batches(9, 2))
    opt.step()
    tau, gain = opt.tau, opt.gain()
    opt.step()  # again, no new backward (ZeRO's per-group calls, DCP's zero-grad step)
    opt.zero_grad()
    opt.step()
    assert (opt.tau, opt.gain()) == (tau, gain)
    assert opt.stats()["updates"] == before["updates"] + 1


@pytest.mark.parametrize("reset", ["set_to_none", "zeros", "model_zero_grad"])
def test_a_skipped_step_drops_its_window(reset):
    """Backward, gradients reset without step() (a skipped step), backward, step: only the second
    window counts, as if the first never happened."""
    m1, m2 = make_model(), make_model()
    skipped = AdaScale(torch.optim.SGD(m1.parameters(), lr=0.1))
    clean = AdaScale(torch.optim.SGD(m2.parameters(), lr=0.1))
    accumulate(m1, micro_batches(100, 4))
    if reset == "set_to_none":
        skipped.zero_grad(set_to_none=True)
    elif reset == "zeros":
        skipped.zero_grad(set_to_none=False)
    else:
        m1.zero_grad()
    assert skipped.tau == 0.0
    train(m1, skipped, 2)
    train(m2, clean, 2)
    assert (skipped.gain(), skipped.tau) == (clean.gain(), clean.tau)
    assert skipped.stats()["dropped_windows"] == 1
    assert skipped.stats()["N"] == 4


def test_grad_scaler_skipped_step_leaves_tau_and_averages():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train(m, opt, 2)
    saved = copy.deepcopy(opt.state_dict()["adascale"])
    x, y = micro_batches(50, 1)[0]
    x[0, 0] = math.inf  # overflow: GradScaler finds inf and skips step()
    for xb, yb in [(x, y)] + micro_batches(51, 1):
        scaler.scale(torch.nn.functional.mse_loss(m(xb), yb)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert scaler.get_scale() < 2.0**10  # the step was skipped
    now = opt.state_dict()["adascale"]
    assert now == saved
    train(m, opt, 1, start=60)  # the next window is clean and counted
    assert opt.stats()["N"] == 4 and opt.stats()["nonfinite_updates"] == 0
    assert opt.stats()["dropped_windows"] == 1


def test_nonfinite_statistics_are_never_folded(caplog):
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1))
    train(m, opt, 2)
    averages = copy.deepcopy(opt.state_dict()["adascale"])
    batches = micro_batches(70, 4)
    batches[1][0][0, 0] = math.nan

    def poisoned_update():
        accumulate(m, batches)
        for p in m.parameters():  # the gradients are sanitised; the hooks saw the NaN
            p.grad.nan_to_num_(0.0, posinf=0.0, neginf=0.0)
        opt.step()
        opt.zero_grad()

    with caplog.at_level(logging.WARNING):
        poisoned_update()
        poisoned_update()
    after = opt.state_dict()["adascale"]
    assert after["grad_var_avg"] == averages["grad_var_avg"]
    assert after["avg_weights"] == averages["avg_weights"]
    assert after["nonfinite_updates"] == 2
    assert opt.stats()["last_update_nonfinite"] == 1.0
    assert math.isfinite(opt.gain()) and opt.gain() == averages["gain"]
    assert sum("non-finite" in r.message for r in caplog.records) == 1  # logged once
    train(m, opt, 1, start=80)
    assert opt.stats()["last_update_nonfinite"] == 0.0


def test_clipping_between_backward_and_step_leaves_the_statistics():
    m1, m2 = make_model(), make_model()
    a = AdaScale(torch.optim.SGD(m1.parameters(), lr=0.1))
    b = AdaScale(torch.optim.SGD(m2.parameters(), lr=0.1))
    accumulate(m1, micro_batches(0, 4))
    accumulate(m2, micro_batches(0, 4))
    norm = torch.nn.utils.clip_grad_norm_(m2.parameters(), 1e-3)
    assert norm > 1e-2  # the clip really changed the gradients
    a.step()
    b.step()
    sa, sb = a.stats(), b.stats()
    # ||G||^2 is taken at step() and the clip factor recovered from two probe gradients: equal up
    # to float32 rounding of the clipped probes (a post-clip norm would be off by a factor > 100).
    for key in ("gain", "tau", "var", "sqr"):
        assert sa[key] == pytest.approx(sb[key], rel=1e-6)


def test_loss_scale_does_not_change_the_gain():
    m1, m2 = make_model(), make_model()
    a = AdaScale(torch.optim.SGD(m1.parameters(), lr=0.0))
    b = AdaScale(torch.optim.SGD(m2.parameters(), lr=0.0))
    ta = train(m1, a, 3)
    tb = train(m2, b, 3, loss_scale=4096.0)
    for (ga, _), (gb, _) in zip(ta, tb):
        assert ga == pytest.approx(gb, rel=1e-5)
    assert b.stats()["var"] == pytest.approx(4096.0**2 * a.stats()["var"], rel=1e-5)


def test_frozen_and_unused_parameters_do_not_change_the_count():
    torch.manual_seed(0)
    model = make_model()
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    unused = torch.nn.Parameter(torch.ones(3))
    opt = AdaScale([{"params": list(model.parameters()) + [frozen, unused]}], lr=0.1)
    ref_model = make_model()
    ref = AdaScale(ref_model.parameters(), lr=0.1)
    assert train(model, opt, 2, k=3) == train(ref_model, ref, 2, k=3)
    assert opt.stats()["N"] == 3


def test_one_micro_gradient():
    m = make_model()
    opt = AdaScale(m.parameters(), lr=0.1)
    train(m, opt, 3, k=1)
    assert opt.gain() == 1.0 and opt.tau == 3.0 and opt.stats()["S"] == 1.0
    m = make_model()
    opt = AdaScale(m.parameters(), lr=0.1, scale=4)
    accumulate(m, micro_batches(0, 1))
    with pytest.raises(ValueError, match="only one micro-gradient per update.*at least two micro-batches"):
        opt.step()


def test_explicit_scale_converts_to_the_base_batch():
    m1, m2 = make_model(), make_model()
    a = AdaScale(m1.parameters(), lr=0.0)  # S = N = 4
    b = AdaScale(m2.parameters(), lr=0.0, scale=2.0)  # base batch = two micro-batches
    train(m1, a, 1)
    train(m2, b, 1)
    assert b.stats()["S"] == 2.0
    assert b.stats()["var"] == pytest.approx(a.stats()["var"] / 2)
    assert b.stats()["sqr"] == pytest.approx(a.stats()["sqr"])
    assert 1.0 <= b.gain() <= 2.0


def test_add_param_group_is_hooked():
    m = make_model()
    opt = AdaScale(m[0].parameters(), lr=0.1)
    opt.add_param_group({"params": m[2].parameters()})
    train(m, opt, 1)
    state = opt.state_dict()["adascale"]
    assert len(state["grad_var_avg"]) == 2 and all(v != 0.0 for v in state["grad_var_avg"])
    assert opt.stats()["group1/var"] > 0


def test_a_group_added_after_training_started_is_averaged_from_its_first_estimate():
    """fairscale's AdaScale tests unfreeze a layer mid-run: the new group's zero-initialised
    averages must not be debiased with the weight the other groups accumulated."""
    m, ref = make_model(), make_model()
    m[2].requires_grad_(False)  # frozen, then unfrozen and added
    opt = AdaScale(m[0].parameters(), lr=0.0, smoothing=0.99)
    train(m, opt, 100)
    m[2].requires_grad_(True)
    opt.add_param_group({"params": m[2].parameters()})
    train(m, opt, 1, start=100)
    # The same update on a fresh optimizer over the new group only: its first estimate.
    fresh = AdaScale(ref[2].parameters(), lr=0.0, smoothing=0.99)
    ref[0].requires_grad_(False)
    train(ref, fresh, 1, start=100)
    got, want = opt.stats(), fresh.stats()
    assert got["group1/var"] == pytest.approx(want["group0/var"], rel=1e-9)
    assert got["group1/sqr"] == pytest.approx(want["group0/sqr"], rel=1e-9)
    assert got["group1/gain"] == pytest.approx(want["group0/gain"], rel=1e-9)


def test_one_host_synchronisation_per_update(monkeypatch):
    """The update reads the all-reduced sums, ||G||^2 and the probe norms in one transfer, also
    when a clip between backward and step() must be undone."""
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1))
    syncs = []
    for name in ("tolist", "item", "__float__", "__bool__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: syncs.append(_n) or _f(self, *a, **k)
        )
    for replicas in [(0, 1), (1, 2)]:  # ||G||^2 whole (one process), or a DDP rank's share of it
        opt._engine.replicas = lambda replicas=replicas: replicas
        accumulate(m, micro_batches(0, 4))
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)  # a clip the probes undo
        syncs.clear()
        opt.step()
        assert syncs == ["tolist"], replicas
        opt.zero_grad()


# -- state ---------------------------------------------------------------------------------------
def test_a_format_1_state_dict_still_loads():
    """Format 1 (before one average weight per group) kept one weight for the whole model."""
    m = make_model()
    opt = AdaScale([{"params": m[0].parameters()}, {"params": m[2].parameters()}], lr=0.1)
    train(m, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    old = dict(saved["adascale"], format_version=1, avg_weight=saved["adascale"]["avg_weights"][0])
    del old["avg_weights"]
    resumed = AdaScale([{"params": m[0].parameters()}, {"params": m[2].parameters()}], lr=0.1)
    resumed.load_state_dict({**saved, "adascale": old})
    assert resumed.stats() == opt.stats()
    assert resumed.state_dict()["adascale"]["format_version"] == 2


def test_state_dict_round_trip_continues_identically():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    train(m, opt, 3)
    saved_model = copy.deepcopy(m.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    uninterrupted = train(m, opt, 3, start=3)

    m2 = make_model(seed=99)
    m2.load_state_dict(saved_model)
    opt2 = AdaScale(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9))
    opt2.load_state_dict(saved_opt)
    assert opt2.state_dict()["adascale"] == saved_opt["adascale"]
    resumed = train(m2, opt2, 3, start=3)
    assert resumed == uninterrupted  # bitwise
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    keys = set(saved_opt["adascale"])
    assert {"format_version", "tau", "gain", "grad_var_avg", "grad_sqr_avg", "avg_weights"} <= keys


def test_saving_in_the_middle_of_an_accumulation_window():
    """A checkpoint taken after 2 of an update's 4 backward passes holds the state of the last
    update (pending statistics, like the pending .grad, are not saved) and does not disturb the
    window: the saving run goes on unchanged, and a run resumed from it that replays the whole
    window ends bitwise equal to the uninterrupted one."""
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    reference_model = copy.deepcopy(m)
    reference_opt = AdaScale(torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9))
    uninterrupted = train(reference_model, reference_opt, 4)

    trace = train(m, opt, 2)
    batches = micro_batches(2, 4)

    def backward(x, y):  # one micro-batch of a 4-micro-batch update, as train() does it
        (torch.nn.functional.mse_loss(m(x), y) / 4).backward()

    for x, y in batches[:2]:  # the window of update 2 is half done: 2 passes pending
        backward(x, y)
    saved_model, saved_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["adascale"]["updates"] == 2 and saved_opt["adascale"]["tau"] == trace[-1][1]
    for x, y in batches[2:]:  # the saving run finishes the window as if nothing happened
        backward(x, y)
    opt.step()
    opt.zero_grad()
    trace.append((opt.gain(), opt.tau))
    trace += train(m, opt, 1, start=3)
    assert trace == uninterrupted

    m2 = make_model(seed=99)
    m2.load_state_dict(saved_model)
    opt2 = AdaScale(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9))
    opt2.load_state_dict(saved_opt)
    resumed = train(m2, opt2, 2, start=2)  # replays update 2 from its first micro-batch
    assert resumed == uninterrupted[2:]
    for p, q in zip(reference_model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_errors_and_plain_optimizer_state():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    train(m, opt, 1)
    plain = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9).state_dict()
    tau = opt.tau
    opt.load_state_dict(plain)  # migrating from a run without AdaScale: base state replaced
    assert opt.tau == tau and len(opt.state) == 0
    bad = opt.state_dict()
    bad["adascale"]["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        opt.load_state_dict(bad)
    two_groups = AdaScale([{"params": m[0].parameters()}, {"params": m[2].parameters()}], lr=0.1)
    with pytest.raises(ValueError, match="parameter groups"):
        two_groups.load_state_dict(opt.state_dict())


# -- schedules -----------------------------------------------------------------------------------
def test_scheduler_is_read_at_floor_tau():
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=1.0))
    lam = lambda step: 0.9**step
    sched = follow_tau(torch.optim.lr_scheduler.LambdaLR(opt, lam), opt)
    seen = []
    for u in range(5):
        assert opt.param_groups[0]["lr"] == pytest.approx(lam(math.floor(opt.tau)))
        accumulate(m, micro_batches(u, 4))
        opt.step()
        opt.zero_grad()
        sched.step()
        seen.append(sched.last_epoch)
        assert sched.last_epoch == math.floor(opt.tau)
    assert seen[-1] > 5  # gains > 1 moved the schedule faster than the updates
    assert sched.get_last_lr()[0] == pytest.approx(lam(seen[-1]))


def test_scheduler_adapter_checks_its_inputs():
    m = make_model()
    opt = AdaScale(m.parameters(), lr=0.1)
    sgd = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="AdaScale"):
        follow_tau(torch.optim.lr_scheduler.StepLR(sgd, 1), sgd)
    with pytest.raises(ValueError, match="another optimizer"):
        follow_tau(torch.optim.lr_scheduler.StepLR(sgd, 1), opt)
    with pytest.raises(TypeError, match="count steps"):
        follow_tau(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), opt)


def test_a_tau_following_scheduler_pickles_deep_copies_and_saves_as_before():
    import pickle

    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=1.0))
    base = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(make_model().parameters(), lr=1.0), 3)
    sched = follow_tau(torch.optim.lr_scheduler.StepLR(opt.optimizer, 3), opt)  # on the base optimizer
    assert follow_tau(sched, opt) is sched  # idempotent
    assert set(sched.state_dict()) == set(base.state_dict())  # nothing of AdaScale's is saved
    for _ in range(3):
        accumulate(m, micro_batches(0, 4))
        opt.step()
        opt.zero_grad()
        sched.step()
    assert sched.last_epoch == math.floor(opt.tau) > 3
    for copied in (pickle.loads(pickle.dumps(sched)), copy.deepcopy(sched)):
        assert type(copied) is torch.optim.lr_scheduler.StepLR  # the user's class again
        assert copied.state_dict() == sched.state_dict()
        with pytest.raises(ValueError, match="another optimizer"):  # it drives a copy of the SGD
            follow_tau(copied, opt)


def test_budget():
    m = make_model()
    opt = AdaScale(m.parameters(), lr=0.05)
    updates = 0
    while not opt.budget_spent(20):
        train(m, opt, 1, start=updates)
        updates += 1
    assert opt.tau >= 20 and updates < 20


def test_autograd_grad_probe_is_not_a_micro_batch():
    """torch.autograd.grad (gradient penalties, norm probes) computes gradients without
    accumulating them into .grad: it must not count as a micro-gradient."""
    m1, m2 = make_model(), make_model()
    probed = AdaScale(m1.parameters(), lr=0.1)
    clean = AdaScale(m2.parameters(), lr=0.1)
    batches = micro_batches(0, 2)
    accumulate(m1, batches)
    x, y = batches[0]
    torch.autograd.grad(torch.nn.functional.mse_loss(m1(x), y), list(m1.parameters()))
    accumulate(m2, batches)
    probed.step()
    clean.step()
    assert probed.stats()["N"] == 2
    assert probed.gain() == clean.gain()


def test_grad_scaler_unscale_keeps_the_gain():
    """unscale_ divides every gradient between the last backward and step(): ||G||^2 must be
    taken in the loss-scaled units the hooks saw (the probes recover the factor)."""
    m1, m2 = make_model(), make_model()
    plain = AdaScale(torch.optim.SGD(m1.parameters(), lr=0.1))
    scaled = AdaScale(torch.optim.SGD(m2.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    for u in range(3):
        accumulate(m1, micro_batches(u, 4))
        plain.step()
        plain.zero_grad()
        for x, y in micro_batches(u, 4):
            scaler.scale(torch.nn.functional.mse_loss(m2(x), y) / 4).backward()
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
        assert scaled.gain() == pytest.approx(plain.gain(), rel=1e-5)


def test_non_uniform_change_before_step_is_warned(caplog):
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=0.1))
    accumulate(m, micro_batches(0, 4))
    m[2].bias.grad.mul_(0.5)  # one gradient scaled, the others not
    with caplog.at_level(logging.WARNING):
        opt.step()
    assert sum("not scaled by one common factor" in r.message for r in caplog.records) == 1


def test_merged_groups_keep_their_hooks_and_sum_into_one():
    """What DeepSpeed's ZeRO wrappers get: one whole-model statistics group, same hooks."""
    m1, m2 = make_model(), make_model()
    grouped = AdaScale([{"params": m1[0].parameters()}, {"params": m1[2].parameters()}], lr=0.1)
    single = AdaScale(m2.parameters(), lr=0.1)
    hooks = grouped._capture.num_hooks
    grouped._install_engine(grouped._engine, merge_groups=True)
    assert grouped._capture.num_hooks == hooks and grouped._estimator.num_groups == 1
    for (g1, t1), (g2, t2) in zip(train(m1, grouped, 2), train(m2, single, 2)):
        assert g1 == pytest.approx(g2, rel=1e-9) and t1 == pytest.approx(t2, rel=1e-9)


def test_a_deepspeed_json_scheduler_is_read_at_floor_tau():
    """DeepSpeed's JSON schedulers take the iteration in step(last_batch_iteration): after
    follow_tau each step() sets it to floor(tau) - 1 (DeepSpeed's convention), whoever calls it."""
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=1.0))
    sched = follow_tau(lr_schedules.WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=50), opt)
    for u in range(4):
        accumulate(m, micro_batches(u, 4))
        opt.step()
        opt.zero_grad()
        sched.step()
        sched.step()  # called twice per update: still at floor(tau)
        assert sched.last_batch_iteration == math.floor(opt.tau) - 1
    assert math.floor(opt.tau) > 4


def test_deepspeeds_one_cycle_is_read_at_floor_tau():
    """OneCycle (and LRRangeTest) take the iteration as step(batch_iteration=...)."""
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    m = make_model()
    opt = AdaScale(torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9))
    cycle = lr_schedules.OneCycle(opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=10, cycle_momentum=False)
    sched = follow_tau(cycle, opt)
    reference = lr_schedules.OneCycle(
        torch.optim.SGD(make_model().parameters(), lr=1.0), cycle_min_lr=0.1, cycle_max_lr=1.0,
        cycle_first_step_size=10, cycle_momentum=False,
    )
    for u in range(4):
        accumulate(m, micro_batches(u, 4))
        opt.step()
        opt.zero_grad()
        sched.step()
        assert sched.last_batch_iteration == math.floor(opt.tau) - 1
        reference.step(batch_iteration=math.floor(opt.tau) - 1)
        assert opt.param_groups[0]["lr"] == reference.get_last_lr()[0]
    assert math.floor(opt.tau) > 4
