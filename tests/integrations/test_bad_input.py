"""Bad input that needs an optional package: DeepSpeed's engine, the HF Trainer, Accelerate.

Each message is produced by the real package (no stand-ins), in subprocesses wherever a process
group or a global singleton (DeepSpeed's engine, Accelerate's state) is created, so nothing leaks
into the other tests. A test skips cleanly when its package is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# One process, world size 1 (gloo): DeepSpeed without `import adascale_shard`, then with it; then
# the Trainer's DeepSpeed checks when transformers is installed.
DEEPSPEED_SCRIPT = r"""
import json, os, socket, sys
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import torch
import deepspeed

out = {}

def config(**zero):
    return {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 1, **zero},
        "optimizer": {"type": "AdaScale", "params": {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9}},
    }

def engine(cfg):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]

def attempt(name, fn):
    try:
        fn()
        out[name] = None
    except Exception as err:
        out[name] = f"{type(err).__name__}: {err}"

def one_update(e):
    for _ in range(2):
        e.backward(e(torch.randn(4, 4)).pow(2).mean())
        e.step()

attempt("no_import", lambda: engine(config()))  # the script forgot `import adascale_shard`
import adascale_shard  # noqa: E402 - patches the already imported engine at once
attempt("compute_grad_norm", lambda: one_update(engine(config(compute_grad_norm=False))))
bare = config()
bare["optimizer"] = "AdaScale"
attempt("bare_string", lambda: engine(bare))
too_large = config()
too_large["optimizer"]["params"]["scale"] = 59  # the global batch is 4 x 2 x 1 = 8 samples
attempt("scale_json", lambda: engine(too_large))
def python_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    cfg = config()
    del cfg["optimizer"]
    opt = adascale_shard.AdaScale(model.parameters(), lr=0.1, scale=16)
    deepspeed.initialize(model=model, optimizer=opt, config=cfg)
attempt("scale_python", python_path)
e = engine(config())
extra = torch.nn.Parameter(torch.zeros(2))
attempt("add_param_group", lambda: e.basic_optimizer.add_param_group({"params": [extra]}))
out["groups_after_refusal"] = len(e.basic_optimizer.param_groups)
one_update(e)  # still trains
out["updates_after_refusal"] = e.basic_optimizer.stats()["updates"]

# A checkpoint saved by a run without AdaScale (a plain SGD client optimizer), loaded by an
# AdaScale engine: loads, warns that tau and the averages start fresh.
import logging
warnings_seen = []
handler = logging.Handler(level=logging.WARNING)
handler.emit = lambda record: warnings_seen.append(record.getMessage())
logging.getLogger("adascale_shard").addHandler(handler)
torch.manual_seed(0)
plain_model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
plain_cfg = config()
del plain_cfg["optimizer"]
plain_cfg["zero_allow_untested_optimizer"] = True
plain = deepspeed.initialize(
    model=plain_model, optimizer=torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9), config=plain_cfg
)[0]
one_update(plain)
plain.save_checkpoint(sys.argv[1] + "/plain_ckpt", tag="t")
e = engine(config())
e.load_checkpoint(sys.argv[1] + "/plain_ckpt", tag="t")
out["plain_ckpt_warnings"] = [m for m in warnings_seen if "holds no AdaScale state" in m]
out["plain_ckpt_tau"] = e.basic_optimizer.tau

try:
    import transformers  # noqa: F401
except ImportError:
    out["transformers"] = False
else:
    out["transformers"] = True
    from transformers import Trainer, TrainingArguments
    from adascale_shard.integrations.hf import enable_adascale

    def hf(json_type, **kwargs):
        cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
               "zero_optimization": {"stage": 1}, "optimizer": {"type": json_type, "params": {"lr": "auto"}}}
        args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, deepspeed=cfg, max_steps=4, report_to=[])
        enable_adascale(Trainer(model=torch.nn.Linear(2, 1), args=args), **kwargs)

    attempt("hf_json_type", lambda: hf("AdamW"))
    attempt("hf_json_and_kwargs", lambda: hf("AdaScale", optimizer="AdamW", momentum=0.9))
print("RESULT " + json.dumps(out))
"""


def run_script(code: str, *args: str, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def deepspeed_errors(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return run_script(DEEPSPEED_SCRIPT, str(tmp_path_factory.mktemp("hf_ds")))


def test_deepspeed_without_the_import_says_what_the_readme_says(deepspeed_errors):
    # README: "Without it DeepSpeed itself stops with `AssertionError: AdaScale is not a supported
    # DeepSpeed Optimizer`: the fix is that import."
    assert deepspeed_errors["no_import"] == "AssertionError: AdaScale is not a supported DeepSpeed Optimizer"


def test_deepspeed_compute_grad_norm_false_names_the_setting(deepspeed_errors):
    message = deepspeed_errors["compute_grad_norm"]
    assert message.startswith("RuntimeError: AdaScale needs DeepSpeed's gradient norm")
    assert 'remove "compute_grad_norm": false from zero_optimization' in message


def test_optimizer_as_a_bare_string_names_the_block(deepspeed_errors):
    message = deepspeed_errors["bare_string"]
    assert message.startswith('ValueError: DeepSpeed config: "optimizer": "AdaScale" must be a block: "optimizer": {"type": "AdaScale"')
    assert "troubleshooting.md#optimizer-given-as-a-string" in message


@pytest.mark.parametrize("path, scale", [("scale_json", 59), ("scale_python", 16)])
def test_a_scale_beyond_deepspeeds_global_batch_is_refused(deepspeed_errors, path, scale):
    message = deepspeed_errors[path]
    assert message is not None, f"scale={scale} on a global batch of 8 samples was accepted"
    assert message.startswith(f"ValueError: AdaScale scale={scale} is larger than DeepSpeed's global batch, train_batch_size=8")
    assert "troubleshooting.md#scale-larger-than-the-global-batch" in message


def test_add_param_group_after_deepspeed_initialize_is_refused_cleanly(deepspeed_errors):
    message = deepspeed_errors["add_param_group"]
    assert message is not None, "add_param_group after deepspeed.initialize was accepted"
    assert "add the group before deepspeed.initialize" in message
    assert deepspeed_errors["groups_after_refusal"] == 1  # the refused group never reached the optimizer
    assert deepspeed_errors["updates_after_refusal"] == 1.0  # and training goes on


def test_deepspeed_checkpoint_without_adascale_state_warns_that_tau_starts_fresh(deepspeed_errors):
    (message,) = deepspeed_errors["plain_ckpt_warnings"]
    assert "saved without adascale_shard imported?" in message and "tau and the averages start fresh" in message
    assert deepspeed_errors["plain_ckpt_tau"] == 0.0


def test_trainer_with_a_deepspeed_json_that_does_not_build_adascale(deepspeed_errors):
    if not deepspeed_errors["transformers"]:
        pytest.skip("transformers is not installed")
    assert "optimizer type 'AdamW', not AdaScale" in deepspeed_errors["hf_json_type"]
    assert '"optimizer": {"type": "AdaScale", "params": {...}}' in deepspeed_errors["hf_json_type"]
    message = deepspeed_errors["hf_json_and_kwargs"]
    assert "put the base optimizer and its arguments in its params, not in enable_adascale()" in message


def test_trainer_epochs_on_a_dataset_without_length_need_max_steps(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from adascale_shard.integrations.hf import enable_adascale

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ({"x": torch.zeros(2)} for _ in range(8))

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=-1, num_train_epochs=1, report_to=[])
    # Trainer(train_dataset=Stream()) already refuses this itself (transformers 5: "max_steps has to
    # be specified"); enable_adascale's own check is reached when the dataset is set afterwards.
    trainer = Trainer(model=torch.nn.Linear(2, 1), args=args)
    trainer.train_dataset = Stream()
    with pytest.raises(ValueError, match=r"needs max_steps .* no length: set TrainingArguments\(max_steps=...\)"):
        enable_adascale(trainer)


def test_hf_integration_without_transformers_names_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n"
        "    import adascale_shard.integrations.hf\n"
        "except ImportError as err:\n"
        "    import json; print('RESULT ' + json.dumps({'message': str(err)}))\n"
    )
    out = run_script(code)
    assert out["message"] == (
        "adascale_shard.integrations.hf needs the Hugging Face Trainer: pip install -e '.[transformers]' in a clone of adascale-shard"
        " (see docs/troubleshooting.md#transformers-not-installed)"
    )


ACCELERATE_SCRIPT = r"""
import json, torch
from accelerate import Accelerator
from adascale_shard import AdaScale
from adascale_shard import unwrap

accelerator = Accelerator(cpu=True)
out = {}
models = [torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)]
opts = [AdaScale(torch.optim.SGD(m.parameters(), lr=0.1)) for m in models]
accelerator.prepare(*models, *opts)
try:
    unwrap(accelerator)
    out["two"] = None
except TypeError as err:
    out["two"] = str(err)
out["one_of_them"] = unwrap(accelerator._optimizers[1]) is opts[1]
print("RESULT " + json.dumps(out))
"""


def test_accelerator_with_two_adascale_optimizers_asks_which(tmp_path):
    pytest.importorskip("accelerate")
    out = run_script(ACCELERATE_SCRIPT)
    assert out["two"] == (
        "unwrap: the Accelerator holds 2 AdaScale optimizers; pass the prepared optimizer you "
        "mean instead of the Accelerator (see docs/troubleshooting.md#accelerator-holds-several-adascale-optimizers)"
    )
    assert out["one_of_them"]
