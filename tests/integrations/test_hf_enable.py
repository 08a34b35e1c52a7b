"""enable_adascale in one process: wiring, the meaning of the Trainer's settings, errors."""

import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, ProgressCallback

import adascale_shard.integrations.hf_patch as hf_patch
from adascale_shard import AdaScale
from adascale_shard.integrations.hf import (
    AdaScaleCallback,
    AdaScaleFlowCallback,
    AdaScaleProgressCallback,
    enable_adascale,
)
from adascale_shard.unwrap import find
from tests.integrations.test_hf_trainer import _datasets, _model


def make_trainer(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=0.05, max_steps=12, logging_steps=3, save_strategy="no", report_to=[], seed=0,
    )
    settings.update(overrides)
    train, val = _datasets()
    return Trainer(model=_model(), args=TrainingArguments(**settings), train_dataset=train, eval_dataset=val)


def test_wiring_order_and_optimizer(tmp_path):
    trainer = make_trainer(tmp_path)
    main = enable_adascale(trainer, optimizer="SGD", momentum=0.9)
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[0] is main  # before every reporter
    assert not any(type(c) in (DefaultFlowCallback, ProgressCallback) for c in callbacks)
    assert any(isinstance(c, AdaScaleFlowCallback) for c in callbacks)
    assert trainer.optimizer_cls_and_kwargs == (AdaScale, {"optimizer": "SGD", "lr": 0.05, "momentum": 0.9})


def test_a_short_run_follows_tau(tmp_path):
    trainer = make_trainer(tmp_path, logging_steps=3, warmup_steps=2)
    main = enable_adascale(trainer, base_batch_size=4, optimizer="SGD", momentum=0.9)
    trainer.train()
    adascale = main.adascale
    assert adascale.stats()["S"] == 2.0 and adascale.stats()["N"] == 2.0  # 8 samples / 4
    assert adascale.tau >= 12 and trainer.state.global_step < 12
    inner = trainer.lr_scheduler
    while hasattr(inner, "scheduler"):
        inner = inner.scheduler
    assert inner.last_epoch == math.floor(adascale.tau)  # the schedule is read at floor(tau)
    logged = [r for r in trainer.state.log_history if "adascale/tau" in r]
    assert logged and all("adascale/gain" in r and "adascale/effective_lr" in r for r in logged)
    floors = [math.floor(r["adascale/tau"]) // 3 for r in logged]
    assert floors == sorted(set(floors))  # one log per crossing of a multiple of logging_steps


def test_epochs_become_a_scale_invariant_budget(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=-1, num_train_epochs=0.25)
    enable_adascale(trainer, base_batch_size=4)
    # 0.25 epochs of 256 samples at the base batch of 4: 16 base steps.
    assert trainer.args.max_steps == 16


def test_find_unwraps():
    opt = AdaScale(torch.nn.Linear(2, 1).parameters(), lr=0.1)

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    assert find(Wrapper(Wrapper(opt))) is opt
    assert find(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)) is None


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="base_batch_size=64 is larger than the global batch 8"):
        enable_adascale(make_trainer(tmp_path), base_batch_size=64)
    with pytest.raises(ValueError, match="must be a positive number"):
        enable_adascale(make_trainer(tmp_path), base_batch_size=0)
    trainer = make_trainer(tmp_path)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="instance"):
        enable_adascale(trainer)
    # The callback's own check, reached only with the Trainer patch switched off (hf_patch.unpatch()).
    trainer = make_trainer(tmp_path)
    trainer.add_callback(AdaScaleCallback())
    trainer.callback_handler.callbacks.insert(0, trainer.callback_handler.callbacks.pop())
    hf_patch.unpatch()
    try:
        with pytest.raises(RuntimeError, match="not AdaScale"):
            trainer.train()
    finally:
        hf_patch.install()


def test_progress_bar_counts_tau(tmp_path, capfd):
    trainer = make_trainer(tmp_path, disable_tqdm=False)
    enable_adascale(trainer)
    assert any(isinstance(c, AdaScaleProgressCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    err = capfd.readouterr().err
    assert "tau: 100%" in err and "12/12" in err and "gain=" in err
    assert trainer.state.global_step < 12  # the bar counted tau, not the updates


@pytest.fixture
def environ_restored():
    """TrainingArguments(deepspeed=...) sets ACCELERATE_USE_DEEPSPEED (and more) in os.environ: the
    later tests of this process, and the ranks they launch, must not inherit DeepSpeed."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
    "optim, params, warned",
    [
        ("adafactor", {"lr": "auto", "betas": "auto", "eps": "auto"}, '"optimizer": "Adafactor"'),  # the HF docs' block
        ("sgd", {"optimizer": "SGD", "lr": "auto", "momentum": 0.9}, None),  # the JSON builds what --optim names
        ("adagrad", {"optimizer": "SGD", "lr": "auto"}, '"optimizer": "Adagrad"'),
        ("adamw_torch", {"lr": "auto", "betas": "auto", "eps": "auto"}, None),  # the defaults never warn
        ("adamw_torch_fused", {"optimizer": "SGD", "lr": "auto"}, None),
    ],
)
def test_optim_beside_a_json_adascale_block_is_named_once(tmp_path, caplog, environ_restored, optim, params, warned):
    """--optim is ignored under a DeepSpeed JSON "optimizer" block: a non-default one is warned
    about, naming both settings, which wins and the fix."""
    pytest.importorskip("deepspeed")
    import gc
    import json
    import logging
    from pathlib import Path

    config = json.loads((Path(__file__).parents[2] / "configs" / "zero2.json").read_text())
    config["optimizer"]["params"] = params
    trainer = make_trainer(tmp_path, deepspeed=config, optim=optim)
    with caplog.at_level(logging.WARNING, logger="adascale_shard"):
        enable_adascale(trainer)
    messages = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    del trainer
    gc.collect()  # the Trainer's DeepSpeed config is process-global while it lives
    if warned is None:
        assert messages == []
        return
    (message,) = messages
    base = "AdamW" if "betas" in params else "SGD"
    assert message.startswith(f'--optim {optim} is ignored: the DeepSpeed JSON "optimizer" block ("type": "AdaScale")')
    assert f"its params make AdaScale wrap {base}" in message and warned in message and "remove --optim" in message
    assert message.endswith("(see docs/troubleshooting.md#optim-ignored-beside-a-deepspeed-adascale-block)")
