"""Every setting a user can get wrong gives an error (or, for DeepSpeed's version, a warning) that
names the setting and the fix. Single process, torch only; the errors that need DeepSpeed,
Transformers or Accelerate are in ``tests/integrations/test_bad_input.py``, those that need two
ranks in ``tests/distributed/test_bad_input_2ranks.py``. Covered elsewhere, not repeated here:
the base optimizer and AdaScale's arguments (``test_optimizer.py::test_bad_input_names_the_setting``),
one micro-gradient with ``scale > 1``, the state format and group count of ``load_state_dict``,
the scheduler adapter, ``enable_adascale``'s ``base_batch_size`` (``test_hf_enable.py``), the JSON
block through ``deepspeed.initialize`` on 2 ranks (``test_deepspeed.py``), FSDP2's ``attach``
errors (``test_fsdp2.py``).
"""

from __future__ import annotations

import logging
import math
import types

import pytest
import torch

from adascale_shard import AdaScale
from adascale_shard.integrations.deepspeed import build_optimizer, check_version


def params():
    torch.manual_seed(0)
    return list(torch.nn.Linear(3, 1).parameters())


def make():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, AdaScale(torch.optim.SGD(model.parameters(), lr=0.1))


# -- the DeepSpeed JSON "params" block (build_optimizer needs no DeepSpeed) ----------------------
@pytest.mark.parametrize(
    "block, error, pieces",
    [
        ({"lr": "auto"}, ValueError, ["['lr'] are \"auto\", which only the HF Trainer", "give numbers"]),
        ({"lr": "1e-3"}, ValueError, ["lr='1e-3' is not a number"]),
        ({"lr": 0.1, "max_grad_norm": 1.0}, ValueError, ["'max_grad_norm'", '"gradient_clipping"']),
        ({"optimizer": "Lion", "lr": 0.1}, ValueError, ["optimizer='Lion' is not a torch.optim optimizer", "SGD"]),
        ({"optimizer": "AdaScale", "lr": 0.1}, ValueError, ["cannot wrap itself", "'SGD'"]),
        ({"optimizer": "SGD", "lr": 0.1, "betas": [0.9, 0.99]}, TypeError, ["base optimizer SGD", "betas", "AdaScale's own are"]),
        ({"lr": 0.1, "scale": 0.5}, ValueError, ["scale=0.5 is impossible", "scale=None"]),
        ({"lr": 0.1, "scale": "4"}, TypeError, ["scale must be a number", "global_batch / base_batch"]),
        ({"lr": 0.1, "smoothing": 1.5}, ValueError, ["smoothing=1.5 is out of range", "[0, 1)"]),
        ({"lr": 0.1, "smoothing": "0.99"}, TypeError, ["smoothing must be a number or None"]),
        ({"lr": 0.1, "lr_scaling": "linear"}, ValueError, ["lr_scaling='linear' is unknown", "'gain'"]),
        ({"lr": 0.1, "min_relative_var": 2}, ValueError, ["min_relative_var=2", "[0, 1)"]),
    ],
)
def test_json_params_errors_name_the_setting_and_the_fix(block, error, pieces):
    with pytest.raises(error) as info:
        build_optimizer(params(), block)
    for piece in pieces:
        assert piece in str(info.value), str(info.value)


# -- AdaScale's own settings: the values test_optimizer.py does not try ----------------------------
@pytest.mark.parametrize(
    "kwargs, error, pieces",
    [
        ({"scale": True}, TypeError, ["scale must be a number or None, got bool True"]),
        ({"scale": math.nan}, ValueError, ["scale=nan is impossible", "finite number >= 1"]),
        ({"scale": -4}, ValueError, ["scale=-4 is impossible", "smaller learning rate"]),
        ({"smoothing": True}, TypeError, ["smoothing must be a number or None, got True"]),
        ({"smoothing": -0.1}, ValueError, ["smoothing=-0.1 is out of range", "0.999 ** scale"]),
        ({"smoothing": math.nan}, ValueError, ["smoothing=nan is out of range"]),
        ({"min_relative_var": 1.0}, ValueError, ["min_relative_var=1.0 must be a number in [0, 1)"]),
        ({"lr_scaling": None}, ValueError, ["lr_scaling=None is unknown"]),
    ],
)
def test_adascale_settings_name_the_setting_and_the_fix(kwargs, error, pieces):
    with pytest.raises(error) as info:
        AdaScale(params(), lr=0.1, **kwargs)
    for piece in pieces:
        assert piece in str(info.value), str(info.value)


# -- hooks that never fired ------------------------------------------------------------------------
def test_gradients_that_no_hook_saw_raise_instead_of_a_silent_gain_of_one():
    """Gradients assigned to .grad directly (torch.autograd.grad, torch.func) never pass AdaScale's
    hooks: without this error tau would stay 0 forever and ``budget_spent`` never come true."""
    model, opt = make()
    for _ in range(2):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for p, g in zip(model.parameters(), grads):
            p.grad = g if p.grad is None else p.grad + g
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "no backward pass was recorded" in message and "backward()" in message
    assert "torch.autograd.grad" in message and "the gain would stay 1" in message
    assert opt.tau == 0.0 and opt.stats()["updates"] == 0


def test_zero_or_missing_gradients_before_the_first_backward_are_fine():
    """DeepSpeed's ZeRO wrappers and torch's distributed checkpoint call step() with zero
    gradients to create the base optimizer's state; a step() with no gradient at all is a no-op."""
    model, opt = make()
    opt.step()  # no .grad at all
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.tau == 0.0 and opt.stats()["updates"] == 0
    opt.zero_grad()
    for _ in range(2):
        (model(torch.randn(4, 3)).pow(2).mean() / 2).backward()
    opt.step()  # the hooks saw these: a normal update
    assert opt.stats()["updates"] == 1 and opt.stats()["N"] == 2


# -- engine integration guards -----------------------------------------------------------------------
def regrouped(opt: AdaScale) -> None:
    """What the DeepSpeed integration does once ZeRO wraps AdaScale: one whole-model group."""
    opt._install_engine(opt._engine, merge_groups=True)


def test_add_param_group_after_an_engine_regrouped_the_statistics_raises_and_changes_nothing():
    model, opt = make()
    regrouped(opt)
    extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="add the group before deepspeed.initialize"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1 and opt._estimator.num_groups == 1  # nothing half-added


def test_capture_cannot_be_replaced_once_training_started():
    model, opt = make()
    for _ in range(2):
        (model(torch.randn(4, 3)).pow(2).mean() / 2).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="only be replaced before the first backward pass.*initialise the engine before training"):
        regrouped(opt)


def test_deepspeed_wrapper_without_a_gradient_norm_names_the_tested_versions():
    """A stand-in for a future DeepSpeed whose ZeRO wrapper no longer has ``_global_grad_norm``
    (the installed one has it; see tests/integrations/test_bad_input.py for the real engine)."""
    from adascale_shard.engines.deepspeed import WrapperNormEngine

    engine = types.SimpleNamespace(optimizer=type("FutureZeroOptimizer", (), {})())
    with pytest.raises(RuntimeError, match=r"FutureZeroOptimizer \(_global_grad_norm\).*deepspeed>=0.19.8,<0.20"):
        WrapperNormEngine(engine)


@pytest.mark.parametrize(
    "version, warns",
    [
        ("0.19.8", False),
        ("0.19.9+cpu", False),
        ("0.19.7", True),
        ("0.18.0", True),
        ("0.20.0", True),
        ("0.20.0rc1", True),
        ("1.0.0", True),
    ],
)
def test_deepspeed_version_outside_the_tested_range_warns_with_the_fix(caplog, version, warns):
    with caplog.at_level(logging.WARNING, logger="adascale_shard"):
        check_version(version)
    if not warns:
        assert not caplog.records
        return
    (record,) = caplog.records
    message = record.getMessage()
    assert f"tested with deepspeed >=0.19.8,<0.20.0; found {version}" in message
    assert "pip install -e '.[deepspeed]' in a clone of adascale-shard" in message


def test_follow_tau_refuses_a_scheduler_that_does_not_count_steps():
    from adascale_shard.schedule import follow_tau

    _, opt = make()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt.optimizer)
    with pytest.raises(TypeError, match=r"cannot drive ReduceLROnPlateau by floor\(tau\).*step-counting"):
        follow_tau(plateau, opt)


def test_gradients_gone_at_step_raise_instead_of_a_silent_gain():
    """Backward passes recorded but no .grad left at step() (set to None in between, or DeepSpeed
    ZeRO holding them while the patch is off): ||G||^2 cannot be measured, so step() refuses."""
    model, opt = make()
    for _ in range(2):
        (model(torch.randn(4, 3)).pow(2).mean() / 2).backward()
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="no parameter has a .grad at step.*ADASCALE_NO_DEEPSPEED_PATCH"):
        opt.step()
    assert opt.tau == 0.0
