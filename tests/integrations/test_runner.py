"""``python -m adascale_shard.run``: scripts that never import the package get the whole of
AdaScale from their DeepSpeed JSON, under ``torchrun``, ``deepspeed`` and ``accelerate launch``
(2 gloo ranks): AdaScale in the engine, ``tau >= max_steps`` in fewer updates, ``adascale/*`` in
the reporters, and the JSON scheduler (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, with
the Trainer's "auto" values) read at ``floor(tau)``.

The scripts are ``tests/zero_code/*.py``; each writes ``result.json`` from rank 0.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adascale_shard.run import _split

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ZERO_CODE = ROOT / "tests" / "zero_code"
HF_DOCS_JSON = ROOT / "configs" / "zero2_hf_docs.json"
# The HF docs' ZeRO-Offload JSONs, "AdamW" -> "AdaScale" and nothing else: AdaScale wraps DeepSpeedCPUAdam.
OFFLOAD_JSONS = {2: ROOT / "configs" / "zero2_offload_hf_docs.json", 3: ROOT / "configs" / "zero3_offload_hf_docs.json"}
MAX_STEPS = 20
LR = 1e-3
WARMUP = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(command: list[str], output_dir: Path, timeout: float = 300) -> dict:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    result = output_dir / "result.json"
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"exit {done.returncode}: {' '.join(command)}\n{(done.stdout + done.stderr)[-6000:]}")
    return {**json.loads(result.read_text()), "output": done.stdout + done.stderr}


# --- quick: the runner itself ---------------------------------------------------------------------


def test_split_hands_deepspeeds_local_rank_to_the_script():
    assert _split(["train.py", "--x", "1"]) == ([], "train.py", None, ["--x", "1"])
    assert _split(["--local_rank=1", "train.py", "--x"]) == (["--local_rank=1"], "train.py", None, ["--x"])
    assert _split(["--local-rank", "0", "-m", "pkg.mod", "a"]) == (["--local-rank", "0"], None, "pkg.mod", ["a"])
    assert _split([]) == ([], None, None, [])
    assert _split(["-m"]) == ([], None, None, [])


def test_a_script_runs_as_main_with_its_argv_and_directory(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, sys\n"
        "print(json.dumps({'name': __name__, 'argv': sys.argv, 'path0': sys.path[0],\n"
        "                  'imported': 'adascale_shard' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "adascale_shard.run", "--local_rank=3", str(script), "--a", "b"],
        capture_output=True, text=True, check=True, env=_env(),
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"name": "__main__", "argv": [str(script), "--a", "b", "--local_rank=3"], "path0": str(tmp_path), "imported": True}
    module = subprocess.run(
        [sys.executable, "-m", "adascale_shard.run", "-m", "json.tool", "--compact"],
        input='{"a": 1}', capture_output=True, text=True, check=True, env=_env(),
    )
    assert module.stdout.strip() == '{"a":1}'


def test_usage_errors_name_the_fix(tmp_path):
    for args, words in (([], "no script or module was given"), ([str(tmp_path / "missing.py")], "no such script")):
        out = subprocess.run([sys.executable, "-m", "adascale_shard.run", *args], capture_output=True, text=True, env=_env())
        assert out.returncode != 0 and words in out.stderr and "usage: python -m adascale_shard.run" in out.stderr


# --- 2 gloo ranks: scripts that never import the package ------------------------------------------


def _json_with(tmp_path: Path, name: str, scheduler: dict, stage: int) -> Path:
    config = json.loads(HF_DOCS_JSON.read_text())
    config["scheduler"] = scheduler
    config["zero_optimization"]["stage"] = stage  # 1 or 2: ZeRO-3's zero.Init runs before gloo is up in this script
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


AUTO = {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}
SCHEDULERS = {
    "WarmupDecayLR": {"type": "WarmupDecayLR", "params": {**AUTO, "total_num_steps": "auto", "warmup_type": "linear"}},
    "WarmupCosineLR": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto", "cos_min_ratio": 0.1}},
    "OneCycle": {
        "type": "OneCycle",
        "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": LR, "cycle_first_step_size": 8, "cycle_momentum": False},
    },
}


def _trainer_args(output_dir: Path, config: Path) -> list[str]:
    return [
        str(ZERO_CODE / "trainer_script.py"), "--use_cpu", "true", "--deepspeed", str(config),
        "--output_dir", str(output_dir), "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--learning_rate", str(LR), "--warmup_steps", str(WARMUP),
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "tensorboard", "--seed", "0",
    ]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Each launch's result, or the error it raised (so one failure does not hide the others)."""
    tmp = tmp_path_factory.mktemp("runner")
    runs = {
        # The HF docs' ZeRO-2 JSON with "AdamW" changed to "AdaScale": WarmupLR, Adam's "auto" params.
        "torchrun WarmupLR ZeRO-2": lambda out: [
            str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "adascale_shard.run", *_trainer_args(out, HF_DOCS_JSON)
        ],
        **{
            f"torchrun WarmupLR ZeRO-{stage} offload": (
                lambda out, config=config: [
                    str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "adascale_shard.run", *_trainer_args(out, config)
                ]
            )
            for stage, config in OFFLOAD_JSONS.items()
        },
        "deepspeed WarmupDecayLR ZeRO-1": lambda out: [
            str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "adascale_shard.run",
            *_trainer_args(out, _json_with(tmp, "decay", SCHEDULERS["WarmupDecayLR"], 1)),
        ],
        "accelerate WarmupCosineLR ZeRO-2": lambda out: [
            str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs" / "accelerate_ddp.yaml"),
            "--main_process_port", str(_free_port()), "-m", "adascale_shard.run",
            *_trainer_args(out, _json_with(tmp, "cosine", SCHEDULERS["WarmupCosineLR"], 2)),
        ],
        "torchrun OneCycle ZeRO-2": lambda out: [
            str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "adascale_shard.run",
            *_trainer_args(out, _json_with(tmp, "onecycle", SCHEDULERS["OneCycle"], 2)),
        ],
        "TRL SFT LoRA torchrun WarmupLR ZeRO-2": lambda out: [
            str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "adascale_shard.run",
            str(ZERO_CODE / "trl_script.py"), "--use_cpu", "true", "--deepspeed", str(HF_DOCS_JSON),
            "--output_dir", str(out), "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3", "--warmup_steps", str(WARMUP),
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--bf16", "false", "--max_length", "64",
        ],
        "accelerate loop WarmupDecayLR ZeRO-2": lambda out: [
            str(BIN / "accelerate"), "launch", "--config_file", str(_accelerate_deepspeed_yaml(tmp)),
            "--main_process_port", str(_free_port()), "-m", "adascale_shard.run",
            str(ZERO_CODE / "accelerate_loop.py"), "--output_dir", str(out), "--max_train_steps", str(MAX_STEPS),
            "--num_warmup_steps", str(WARMUP), "--learning_rate", str(LR),
        ],
    }
    results = {}
    for name, command in runs.items():
        out = tmp / name.replace(" ", "_")
        try:
            results[name] = _launch(command(out), out)
        except Exception as err:  # reported by the test that reads it
            results[name] = err
    return results


def _accelerate_deepspeed_yaml(tmp: Path) -> Path:
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdaScale", "params": {"lr": "auto", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "scheduler": SCHEDULERS["WarmupDecayLR"],
        "steps_per_print": 10**9,
    }
    (tmp / "loop.json").write_text(json.dumps(config))
    yaml = (ROOT / "configs" / "accelerate_zero2.yaml").read_text().replace("configs/zero2.json", str(tmp / "loop.json"))
    (tmp / "loop.yaml").write_text(yaml)
    return tmp / "loop.yaml"


def _result(launches, name):
    result = launches[name]
    if isinstance(result, Exception):
        raise result
    return result


TRAINER_RUNS = [
    "torchrun WarmupLR ZeRO-2", "deepspeed WarmupDecayLR ZeRO-1", "accelerate WarmupCosineLR ZeRO-2", "torchrun OneCycle ZeRO-2",
    "TRL SFT LoRA torchrun WarmupLR ZeRO-2", "torchrun WarmupLR ZeRO-2 offload", "torchrun WarmupLR ZeRO-3 offload",
]


def _expected_lr(block: dict, iteration: int, lr: float) -> float:
    """The lr DeepSpeed's scheduler of this JSON block gives after ``iteration + 1`` steps."""
    from deepspeed.runtime import lr_schedules

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = getattr(lr_schedules, block["type"])(optimizer, **block["params"])
    if iteration >= 0:  # -1: as built, before any step
        argument = "batch_iteration" if block["type"] == "OneCycle" else "last_batch_iteration"
        scheduler.step(**{argument: iteration})
    return optimizer.param_groups[0]["lr"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", TRAINER_RUNS)
def test_a_trainer_script_gets_the_whole_of_adascale_from_its_json(launches, name):
    result = _result(launches, name)
    # Adam's params in the JSON: AdamW is the base; under ZeRO-Offload DeepSpeed's CPU AdamW.
    assert result["optimizers"][-2:] == ["AdaScale", "DeepSpeedCPUAdam" if name.endswith("offload") else "AdamW"]
    if name.endswith("offload"):
        assert result["optimizers"][1] == ("DeepSpeedZeroOptimizer_Stage3" if "ZeRO-3" in name else "DeepSpeedZeroOptimizer")
        assert max(r["adascale/gain"] for r in result["log_history"] if "adascale/gain" in r) > 1.1
    records = [r for r in result["log_history"] if "adascale/tau" in r]
    assert len(records) == result["global_step"] < MAX_STEPS == result["max_steps"]
    assert records[-1]["adascale/tau"] >= MAX_STEPS > records[-2]["adascale/tau"]  # stopped at the budget
    assert all(r["adascale/S"] == 4.0 for r in records)
    block = result["deepspeed_scheduler"]
    assert all(value != "auto" for value in block["params"].values())
    previous_tau, varied = 0.0, set()
    for record in records:  # the lr of each update is the JSON schedule's at floor(tau) before it
        expected = _expected_lr(block, math.floor(previous_tau) - 1, 3e-3 if name.startswith("TRL") else LR)
        assert record["learning_rate"] == pytest.approx(expected, rel=1e-9, abs=1e-15), (record, previous_tau)
        assert record["adascale/effective_lr"] == pytest.approx(record["learning_rate"] * record["adascale/gain"], rel=1e-12)
        varied.add(round(record["learning_rate"], 12))
        previous_tau = record["adascale/tau"]
    assert len(varied) > 3  # the schedule moved, so the comparison had teeth
    assert "budget is unknown" not in result["output"]  # the Trainer's flow holds the budget, not Accelerate's cut
    assert "is ignored" not in result["output"]  # the default --optim beside the JSON block: no warning


@pytest.mark.distributed
def test_the_reporters_receive_adascale_metrics(launches):
    from tests.integrations.test_hf_trainer import read_tensorboard

    result = _result(launches, "torchrun WarmupLR ZeRO-2")
    output_dir = Path(result["argv"][result["argv"].index("--output_dir") + 1])
    scalars = read_tensorboard(str(output_dir))
    assert len(scalars["train/adascale/gain"]) == result["global_step"]
    assert max(scalars["train/adascale/tau"]) >= MAX_STEPS


@pytest.mark.distributed
def test_an_accelerate_loop_ends_at_the_budget_of_its_json_scheduler(launches):
    result = _result(launches, "accelerate loop WarmupDecayLR ZeRO-2")
    assert result["optimizers"][-2:] == ["AdaScale", "AdamW"]
    records = result["records"]
    assert len(records) == result["completed_steps"] < MAX_STEPS  # the loop's own count stopped short
    assert records[-1]["adascale/tau"] >= MAX_STEPS > records[-2]["adascale/tau"]
    assert result["scheduler"] == "WarmupDecayLR"
    assert result["last_batch_iteration"] == math.floor(records[-1]["adascale/tau"]) - 1  # the schedule at floor(tau)


@pytest.mark.distributed
def test_trl_with_lora_trains_the_adapter_only(launches):
    result = _result(launches, "TRL SFT LoRA torchrun WarmupLR ZeRO-2")
    assert result["trainable_parameters"] == 8 * (64 + 3 * 64) * 2  # r=8: A (8 x 64) and B (192 x 8) on c_attn, 2 layers
    gains = [r["adascale/gain"] for r in result["log_history"] if "adascale/gain" in r]
    assert max(gains) > 1.2


def test_deepspeeds_unknown_type_under_the_runner_names_the_switch(tmp_path):
    script = tmp_path / "unregistered.py"  # what DeepSpeed raises when the type is not registered
    script.write_text("raise AssertionError('AdaScale is not a supported DeepSpeed Optimizer')\n")
    out = subprocess.run([sys.executable, "-m", "adascale_shard.run", str(script)], capture_output=True, text=True, env=_env())
    assert out.returncode != 0
    assert 'RuntimeError: DeepSpeed does not know "type": "AdaScale": ADASCALE_NO_DEEPSPEED_PATCH=1 switched' in out.stderr


LOUD_RUNNER = """import logging, runpy, sys
handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
logging.getLogger("adascale_shard").addHandler(handler)
logging.getLogger("adascale_shard").setLevel(logging.INFO)
sys.argv = ["adascale_shard.run", *sys.argv[1:]]
runpy.run_module("adascale_shard.run", run_name="__main__", alter_sys=True)
"""


@pytest.mark.distributed
def test_the_log_names_what_adascale_wraps_and_an_ignored_optim_once(tmp_path):
    """The HF docs' ZeRO-2 JSON on 2 ranks with --optim adafactor: one INFO line (rank 0) says what
    AdaScale wraps and why, one warning says --optim is ignored and how to get Adafactor."""
    loud = tmp_path / "loud_runner.py"  # the runner, with adascale_shard's INFO lines on stdout
    loud.write_text(LOUD_RUNNER)
    out = tmp_path / "out"
    args = _trainer_args(out, HF_DOCS_JSON)
    args[args.index("--max_steps") + 1] = "4"
    result = _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(loud), *args, "--optim", "adafactor"], out)
    assert result["optimizers"][-2:] == ["AdaScale", "AdamW"]  # the JSON won
    lines = result["output"].splitlines()
    wraps = [line for line in lines if "AdaScale wraps" in line]
    assert wraps == [
        "INFO adascale_shard.optimizer: AdaScale wraps AdamW (lr 0.001, S = 4, N = 4 gradients per update, lr x gain): "
        'the DeepSpeed JSON "optimizer" block; Adam\'s params (betas, eps) and no "optimizer": the base optimizer is '
        'AdamW (set "optimizer": "<torch.optim name>" in the params to choose another)'
    ], wraps
    ignored = [line for line in lines if "is ignored" in line]
    assert len(ignored) == 1 and ignored[0].startswith("WARNING adascale_shard.integrations.hf: --optim adafactor is ignored")
    assert 'set "optimizer": "Adafactor" in that block\'s params' in ignored[0]
