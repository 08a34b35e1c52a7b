"""No half-AdaScale under the HF Trainer, in one process: every way AdaScale becomes the Trainer's
optimizer turns the whole flow on at ``train()`` (budget in tau, schedule at floor(tau), metrics),
or training refuses to start. The same paths on 2 ranks through the runner: test_runner.py."""

import logging
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

import adascale_shard.integrations.hf_patch as hf_patch
from adascale_shard import AdaScale
from adascale_shard.integrations.hf import AdaScaleCallback, AdaScaleFlowCallback, AdaScaleProgressCallback
from adascale_shard.unwrap import find
from tests.integrations.test_hf_trainer import _datasets, _model

MAX_STEPS = 12
WARMUP = 4
LR = 0.05


def make_trainer(tmp_path, callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None, trainer_cls=Trainer, **overrides):
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=LR, max_steps=MAX_STEPS, warmup_steps=WARMUP, logging_steps=1, save_strategy="no",
        report_to=[], seed=0,
    )
    settings.update(overrides)
    train, val = _datasets()
    return trainer_cls(
        model=_model(), args=TrainingArguments(**settings), train_dataset=train, eval_dataset=val,
        callbacks=callbacks, optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )


def assert_whole_flow(trainer):
    """AdaScale drove the run: budget in tau, fewer updates, schedule at floor(tau), metrics first."""
    adascale = find(trainer.optimizer)
    assert isinstance(adascale, AdaScale)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], AdaScaleCallback) and callbacks[0].adascale is adascale
    assert any(isinstance(c, AdaScaleFlowCallback) for c in callbacks)
    assert any(isinstance(c, AdaScaleProgressCallback) for c in callbacks)
    assert not any(type(c) is DefaultFlowCallback for c in callbacks)
    assert adascale.tau >= MAX_STEPS > trainer.state.global_step
    inner = trainer.lr_scheduler
    while hasattr(inner, "scheduler"):
        inner = inner.scheduler
    assert inner.last_epoch == math.floor(adascale.tau)
    logged = [r for r in trainer.state.log_history if "adascale/tau" in r]
    assert len(logged) == trainer.state.global_step  # logging_steps=1 in tau: one record per update
    return adascale, logged


def test_the_callback_alone_wraps_the_trainers_own_optimizer(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[AdaScaleCallback()], weight_decay=0.1)
    trainer.train()
    adascale, _ = assert_whole_flow(trainer)
    assert type(adascale.optimizer) is torch.optim.AdamW  # --optim's default, as without AdaScale
    decays = sorted({group["weight_decay"] for group in adascale.param_groups})
    assert decays == [0.0, 0.1]  # the Trainer's weight-decay groups


def test_the_callback_class_and_its_optimizer_arguments(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[AdaScaleCallback(optimizer="SGD", momentum=0.9)])
    trainer.train()
    adascale, _ = assert_whole_flow(trainer)
    assert type(adascale.optimizer) is torch.optim.SGD and adascale.param_groups[0]["momentum"] == 0.9
    trainer = make_trainer(tmp_path, callbacks=[AdaScaleCallback])  # a class: the Trainer instantiates it
    trainer.train()
    assert_whole_flow(trainer)


def test_the_callback_wraps_the_users_optimizer_cls_and_kwargs(tmp_path):
    trainer = make_trainer(
        tmp_path, callbacks=[AdaScaleCallback()], optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": LR, "momentum": 0.5})
    )
    trainer.train()
    adascale, _ = assert_whole_flow(trainer)
    assert type(adascale.optimizer) is torch.optim.SGD and adascale.param_groups[0]["momentum"] == 0.5


def test_adascale_as_optimizer_cls_and_kwargs_alone(tmp_path):
    trainer = make_trainer(tmp_path, optimizer_cls_and_kwargs=(AdaScale, {"optimizer": "SGD", "lr": LR, "momentum": 0.9}))
    trainer.train()
    assert_whole_flow(trainer)


def test_an_adascale_instance_alone(tmp_path):
    model = _model()
    adascale = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    trainer = make_trainer(tmp_path, optimizers=(adascale, None))
    trainer.model = trainer.model_wrapped = model
    trainer.train()
    assert assert_whole_flow(trainer)[0] is adascale


def test_logged_learning_rate_and_effective_lr_are_of_the_same_update(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[AdaScaleCallback(optimizer="SGD", momentum=0.9)])
    trainer.train()
    _, logged = assert_whole_flow(trainer)
    previous_tau = 0.0
    for record in logged:
        step = math.floor(previous_tau)  # the update was scheduled at floor(tau) before it
        expected = LR * (step / WARMUP if step < WARMUP else (MAX_STEPS - step) / (MAX_STEPS - WARMUP))
        assert record["learning_rate"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert record["adascale/lr"] == record["learning_rate"]
        assert record["adascale/effective_lr"] == pytest.approx(record["learning_rate"] * record["adascale/gain"], rel=1e-12)
        previous_tau = record["adascale/tau"]
    assert any(r["adascale/gain"] > 1.01 and r["learning_rate"] > 0 for r in logged)  # the check had teeth


def test_adascale_built_inside_train_is_refused(tmp_path):
    class OwnOptimizer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = AdaScale(torch.optim.SGD(self.model.parameters(), lr=LR))
            return self.optimizer

    trainer = make_trainer(tmp_path, trainer_cls=OwnOptimizer)
    with pytest.raises(RuntimeError, match=r"built inside train\(\).*Call enable_adascale\(trainer\) before"):
        trainer.train()


def test_a_trainer_without_adascale_is_left_alone(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    assert find(trainer.optimizer) is None and trainer.state.global_step == MAX_STEPS
    assert any(type(c) is DefaultFlowCallback for c in trainer.callback_handler.callbacks)
    assert not any(isinstance(c, AdaScaleCallback) for c in trainer.callback_handler.callbacks)


def test_the_turn_on_is_logged(tmp_path, caplog):
    trainer = make_trainer(tmp_path, callbacks=[AdaScaleCallback()], max_steps=2)
    with caplog.at_level(logging.INFO, logger="adascale_shard"):
        trainer.train()
    text = caplog.text
    assert "AdaScale is the Trainer's optimizer (an AdaScaleCallback among the callbacks)" in text
    # One line says what AdaScale wraps, with S and where the base optimizer came from.
    wraps = [r.getMessage() for r in caplog.records if "AdaScale wraps" in r.getMessage()]
    assert len(wraps) == 1, wraps
    assert wraps[0].startswith("AdaScale wraps AdamW (lr 0.05, S = 2, N = 2 gradients per update, lr x gain): ")
    assert "the optimizer the Trainer would build (--optim adamw_torch" in wraps[0]
    assert "betas=(0.9, 0.999), eps=1e-08" in wraps[0]


def test_unpatch_restores_the_trainers_train():
    wrapped = Trainer.train
    assert vars(Trainer)["train"] is wrapped and hasattr(Trainer, hf_patch._ORIGINAL)
    try:
        hf_patch.unpatch()
        assert Trainer.train is not wrapped and not hasattr(Trainer, hf_patch._ORIGINAL)
    finally:
        hf_patch.install()
    assert Trainer.train.__wrapped__ is wrapped.__wrapped__


def test_the_switch_leaves_the_trainer_alone():
    code = (
        "import adascale_shard, transformers.trainer as t\n"
        "print(hasattr(t.Trainer, '_adascale_shard_original_train'))\n"
    )
    for env, expected in (({}, "True"), ({hf_patch.NO_PATCH_ENV: "1"}, "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**_env(), **env}, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != hf_patch.NO_PATCH_ENV}


def test_the_trainers_deepspeed_json_with_a_bare_string_names_the_block(tmp_path):
    pytest.importorskip("deepspeed")
    config = {"optimizer": "AdaScale", "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match=r'"optimizer": "AdaScale" must be a block: "optimizer": \{"type": "AdaScale"'):
        TrainingArguments(output_dir=str(tmp_path), use_cpu=True, deepspeed=config, report_to=[])
