"""The DeepSpeed registration, in one process: lazy, idempotent, guarded against moved internals."""

import logging
import subprocess
import sys
import types

import pytest

pytest.importorskip("deepspeed")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_registers_lazily_and_once():
    code = """
import sys
import adascale_shard
assert "deepspeed" not in sys.modules, "import adascale_shard must not import deepspeed"
import deepspeed.runtime.engine as engine
from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
cls = engine.DeepSpeedEngine
first = cls._configure_basic_optimizer
from adascale_shard.integrations import deepspeed as ds
ds.install(); ds.install(); ds.patch_engine(engine)
assert cls._configure_basic_optimizer is first, "patch applied twice"
assert ZERO_SUPPORTED_OPTIMIZERS.count(adascale_shard.AdaScale) == 1
print("ok")
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_import_after_deepspeed_patches_at_once():
    out = run_python(
        "import deepspeed.runtime.engine as e; import adascale_shard; "
        "print(getattr(e.DeepSpeedEngine, '_adascale_shard_patched', False))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("True")


def test_without_the_import_deepspeed_does_not_know_the_type():
    """What a user sees when the training script never imports adascale_shard (documented)."""
    code = """
import deepspeed.runtime.engine as e
engine = e.DeepSpeedEngine.__new__(e.DeepSpeedEngine)
print(engine._is_supported_optimizer("AdaScale"))
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False")


def test_moved_internals_raise_an_error_naming_the_fix():
    from adascale_shard.integrations import deepspeed as ds

    fake = types.SimpleNamespace(DeepSpeedEngine=type("DeepSpeedEngine", (), {"optimizer_name": None}))
    with pytest.raises(RuntimeError, match=r"no longer has .*_configure_basic_optimizer.*pip install -e '\.\[deepspeed\]' in a clone of adascale-shard"):
        ds.patch_engine(fake)


def test_untested_version_warns(caplog):
    from adascale_shard.integrations import deepspeed as ds

    with caplog.at_level(logging.WARNING):
        ds.check_version("0.19.8")
        assert not caplog.records
        ds.check_version("0.21.1")
    assert "tested with deepspeed >=0.19.8,<0.20.0; found 0.21.1" in caplog.text


def test_json_params_map_onto_the_config():
    import torch

    from adascale_shard import AdaScale
    from adascale_shard.integrations.deepspeed import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(params, {"optimizer": "AdamW", "lr": 1e-3, "betas": [0.9, 0.95], "scale": 4, "smoothing": 0.99})
    assert isinstance(opt, AdaScale) and type(opt.optimizer) is torch.optim.AdamW
    assert opt.config.scale == 4 and opt.config.smoothing == 0.99
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)  # the JSON list; torch's Adam stores betas as a tuple
    default = build_optimizer(params, {"lr": 0.1})
    assert type(default.optimizer) is torch.optim.SGD


def test_the_hf_docs_adam_params_select_adamw(caplog):
    """The HF docs' ZeRO JSON with "AdamW" changed to "AdaScale": Adam's params, no "optimizer"."""
    import logging

    import torch

    from adascale_shard.integrations.deepspeed import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    hf_docs = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}  # the "auto" values, filled
    with caplog.at_level(logging.INFO, logger="adascale_shard"):
        opt = build_optimizer(params, dict(hf_docs))
    assert type(opt.optimizer) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.01
    # Said in the one INFO line AdaScale logs at its first update (what it wraps, and why).
    assert opt.base_note.startswith('the DeepSpeed JSON "optimizer" block; Adam\'s params (betas, eps) and no "optimizer": ')
    assert 'the base optimizer is AdamW (set "optimizer"' in opt.base_note
    (params[0] * torch.arange(3.0)).sum().backward()
    with caplog.at_level(logging.INFO, logger="adascale_shard"):
        opt.step()
    (line,) = [r.getMessage() for r in caplog.records if "AdaScale wraps" in r.getMessage()]
    assert line == f"AdaScale wraps AdamW (lr 0.001, S = 1, N = 1 gradients per update, lr x gain): {opt.base_note}"
    assert type(build_optimizer(params, {**hf_docs, "adam_w_mode": False}).optimizer) is torch.optim.Adam
    assert type(build_optimizer(params, {"lr": 1e-3, "torch_adam": True}).optimizer) is torch.optim.AdamW
    named = build_optimizer(params, {**hf_docs, "optimizer": "NAdam", "torch_adam": True})
    assert type(named.optimizer) is torch.optim.NAdam  # a named base wins; DeepSpeed's switches are dropped
    sgd = build_optimizer(params, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01})  # weight decay alone: SGD's
    assert type(sgd.optimizer) is torch.optim.SGD


def test_unfilled_auto_params_are_named():
    import pytest
    import torch

    from adascale_shard.integrations.deepspeed import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"\['betas', 'eps', 'lr'\] are \"auto\", which only the HF Trainer"):
        build_optimizer(params, {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": 0.0})
