"""The Accelerate helpers (``adascale_shard.integrations.accelerate``) and the checks of
``recipes/accelerate_loop.py``, in one process. Real Accelerate objects run in a subprocess, so
that Accelerate's process-wide state never meets other tests'. The launches on 2 processes are in
``tests/distributed/test_accelerate.py``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from adascale_shard import AdaScale, unwrap
from adascale_shard.integrations.accelerate import AdaScaleCheckpoint

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": tempfile.gettempdir()},
    )  # fmt: skip


def test_the_module_imports_neither_accelerate_nor_deepspeed():
    out = run_python(
        "import sys, adascale_shard.integrations.accelerate\n"
        "print(sorted(m for m in ('accelerate', 'deepspeed', 'transformers') if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


ACCELERATE_CHECKS = r"""
import json, sys, torch
from accelerate import Accelerator
from adascale_shard import AdaScale
from adascale_shard import unwrap
from adascale_shard.integrations.accelerate import AdaScaleCheckpoint

mode, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
adascale = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
accelerator = Accelerator(gradient_accumulation_steps=2)
model, prepared = accelerator.prepare(model, adascale)
out = {
    "prepared_type": type(prepared).__name__,
    "from_optimizer": unwrap(prepared) is adascale,
    "from_accelerator": unwrap(accelerator) is adascale,
}
accelerator.register_for_checkpointing(AdaScaleCheckpoint(prepared))
if mode == "save":
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):  # 3 updates of 2 micro-batches
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 1, generator=gen)
        with accelerator.accumulate(model):
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            prepared.step()
            prepared.zero_grad()
    accelerator.save_state(path)
else:  # a fresh process: load_state restores the estimator
    accelerator.load_state(path)
out["estimator"] = adascale.estimator_state_dict()
try:
    unwrap(accelerator.prepare(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)))
except TypeError as err:
    out["plain_error"] = str(err)
print("RESULT " + json.dumps(out))
"""


def run_checks(mode: str, path: Path) -> dict:
    out = run_python(ACCELERATE_CHECKS, mode, str(path))
    assert out.returncode == 0, out.stderr[-6000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def accelerate_checks(tmp_path_factory):
    pytest.importorskip("accelerate")
    path = tmp_path_factory.mktemp("accelerate_state")
    return {"saved": run_checks("save", path), "loaded": run_checks("load", path)}


def test_unwrap_behind_accelerates_prepare(accelerate_checks):
    saved = accelerate_checks["saved"]
    assert saved["prepared_type"] == "AcceleratedOptimizer"
    assert saved["from_optimizer"]
    assert saved["from_accelerator"]


def test_checkpoint_round_trip_through_save_state_and_load_state_in_a_fresh_process(accelerate_checks):
    saved = accelerate_checks["saved"]["estimator"]
    assert saved["tau"] > 2.0 and saved["updates"] == 3  # 3 updates at gain >= 1
    assert accelerate_checks["loaded"]["estimator"] == saved


def test_unwrap_names_the_fix_for_a_plain_optimizer(accelerate_checks):
    message = accelerate_checks["saved"]["plain_error"]
    assert "AcceleratedOptimizer -> SGD" in message
    assert "AdaScale(torch.optim.SGD" in message and "DummyOptim" in message


class _Wrapper:  # the shape of DeepSpeed's and Accelerate's optimizer wrappers: .optimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_unwrap_walks_wrappers_and_reads_deepspeed_basic_optimizer():
    adascale = AdaScale(torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1))
    assert unwrap(adascale) is adascale
    assert unwrap(_Wrapper(_Wrapper(adascale))) is adascale
    engine = argparse.Namespace(basic_optimizer=adascale, optimizer=_Wrapper(adascale))
    assert unwrap(engine) is adascale
    with pytest.raises(TypeError, match="found no AdaScale in _Wrapper -> SGD"):
        unwrap(_Wrapper(adascale.optimizer))


def test_checkpoint_refuses_what_it_did_not_save():
    adascale = AdaScale(torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1))
    checkpoint = AdaScaleCheckpoint(adascale)
    assert checkpoint.state_dict() == adascale.estimator_state_dict()
    with pytest.raises(ValueError, match="Register the same objects, in the same order"):
        checkpoint.load_state_dict({"last_epoch": 3})


# ---------------------------------------------------------------------------------------------
# The recipe's own checks (pure functions).
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("accelerate_loop_recipe", REPO / "recipes" / "accelerate_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped(name: str) -> dict:
    return json.loads((REPO / "configs" / name).read_text())


def test_recipe_fills_the_shipped_json_from_its_arguments(recipe):
    args = recipe.parse_args(["--learning_rate", "0.05", "--max_grad_norm", "0.5"])
    config = shipped("zero3.json")
    recipe.check_deepspeed_config(config, args, "configs/zero3.json")
    assert config["optimizer"]["params"]["lr"] == 0.05
    assert config["gradient_clipping"] == 0.5


def test_recipe_passes_an_adascale_instance_when_the_config_has_no_optimizer_block(recipe):
    """No "optimizer" block (DeepSpeed configured from the Accelerate YAML alone): the script passes
    an AdaScale instance, and the clipping is still filled from its arguments."""
    config = shipped("zero2.json")
    config.pop("optimizer")
    config["gradient_clipping"] = "auto"
    assert recipe.check_deepspeed_config(config, recipe.parse_args(["--max_grad_norm", "0.5"])) is False
    assert config["gradient_clipping"] == 0.5
    assert recipe.check_deepspeed_config(shipped("zero2.json"), recipe.parse_args([])) is True


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["optimizer"].update(type="AdamW"), 'has no "optimizer": {"type": "AdaScale"'),
        (lambda c: c["optimizer"]["params"].update(lr=0.3), "optimizer.params.lr=0.3 but --learning_rate=0.1"),
        (lambda c: c["optimizer"]["params"].update(momentum=0.5), "optimizer.params.momentum=0.5 but --momentum=0.9"),
        (lambda c: c["optimizer"]["params"].update(scale=8), "optimizer.params.scale=8 but --scale=None"),
        (lambda c: c.update(gradient_clipping=2.0), "gradient_clipping=2.0 but --max_grad_norm=1.0"),
    ],
)
def test_recipe_refuses_a_json_that_disagrees(recipe, change, message):
    config = shipped("zero2.json")
    change(config)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        recipe.check_deepspeed_config(config, recipe.parse_args([]), "configs/zero2.json")


@pytest.mark.parametrize(
    "argv",
    [["--cpu", "--manual_fsdp2"], ["--budget", "0"], ["--gradient_accumulation_steps", "0"], ["--n_embd", "30"]],
)
def test_recipe_refuses_bad_arguments(recipe, argv, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_recipe_data_is_a_whole_number_of_updates(recipe):
    args = recipe.parse_args(["--corpus_bytes", "20000", "--seq_len", "32", "--per_device_batch_size", "4"])
    data = recipe.build_dataset(args, num_processes=2)
    assert len(data) % (4 * args.gradient_accumulation_steps * 2) == 0
    assert data[0].shape == (32,) and data[0].dtype == torch.long
    with pytest.raises(ValueError, match="raise --corpus_bytes"):
        recipe.build_dataset(recipe.parse_args(["--corpus_bytes", "100"]), num_processes=2)


def test_recipe_writes_each_engine_to_its_own_directory_unless_told(recipe):
    """The default ``--output_dir`` is ``outputs/accelerate_loop/<engine>``, the engine the loop
    runs (``engine_name``: what the launches' summaries report), so engines do not overwrite each
    other's logs and checkpoints; an explicit ``--output_dir`` wins."""
    default = recipe.parse_args([])
    engines = ("ddp", "fsdp2", "zero2", "zero3", "single")
    assert [recipe.output_dir(default, e) for e in engines] == [Path("outputs/accelerate_loop") / e for e in engines]
    assert recipe.output_dir(recipe.parse_args(["--output_dir", "/tmp/run"]), "zero3") == Path("/tmp/run")
