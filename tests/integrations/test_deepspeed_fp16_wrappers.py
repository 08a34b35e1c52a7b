"""How AdaScale reads each DeepSpeed wrapper's loss scale and norm (one process, no engine).

The numbers themselves are checked end to end, with the real wrappers on 2 gloo ranks, in
``tests/distributed/test_deepspeed_fp16.py``; here: the table picks the right entry for the real
classes and refuses an fp16 wrapper it does not know, naming the fix.
"""

import types

import pytest

pytest.importorskip("deepspeed")

from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from adascale_shard.engines import deepspeed as ds


def engine(fp16: bool):
    return types.SimpleNamespace(fp16_enabled=lambda: fp16)


def wrapper_of(cls):
    wrapper = object.__new__(cls)  # only its type is read
    return types.SimpleNamespace(kind=ds._fp16_wrapper_kind(engine(True), wrapper))


def test_each_known_wrapper_gets_its_rule():
    # (backward scale, norm factor) with a backward at 256 and a step that grew the scale to 512.
    unfused = ds._FP16_WRAPPERS[("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer")]
    zero12 = ds._FP16_WRAPPERS[("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer")]
    zero3 = ds._FP16_WRAPPERS[("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3")]
    assert wrapper_of(FP16_UnfusedOptimizer).kind is unfused
    assert wrapper_of(DeepSpeedZeroOptimizer).kind is zero12
    assert wrapper_of(DeepSpeedZeroOptimizer_Stage3).kind is zero3
    scaled = types.SimpleNamespace(loss_scale=256.0)
    assert unfused[0](scaled) == 1.0  # the engine never scales this wrapper's loss
    assert zero12[0](scaled) == zero3[0](scaled) == 256.0
    assert unfused[1](1.0, 512.0) == 1.0
    assert zero12[1](256.0, 512.0) == 1.0
    assert zero3[1](256.0, 512.0) == 2.0  # the norm was divided by the new scale


def test_a_subclass_that_keeps_step_is_known():
    class Keeps(DeepSpeedZeroOptimizer):
        pass

    assert wrapper_of(Keeps).kind is wrapper_of(DeepSpeedZeroOptimizer).kind


@pytest.mark.parametrize("kind", ["fused", "overrides_step", "foreign"])
def test_an_unknown_fp16_wrapper_is_refused(kind):
    class Overrides(DeepSpeedZeroOptimizer):
        def step(self, closure=None):
            return None

    class Foreign:
        _global_grad_norm = 1.0

        def step(self):
            return None

    cls = {"fused": FP16_Optimizer, "overrides_step": Overrides, "foreign": Foreign}[kind]
    with pytest.raises(RuntimeError, match=r"Install a tested DeepSpeed version: pip install"):
        ds._fp16_wrapper_kind(engine(True), object.__new__(cls))
    # Without fp16 nothing is scaled: the same wrapper is used as it is.
    backward, factor = ds._fp16_wrapper_kind(engine(False), object.__new__(cls))
    assert backward(None) == 1.0 and factor(1.0, 1.0) == 1.0
