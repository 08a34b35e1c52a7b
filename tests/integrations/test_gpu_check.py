"""``scripts/gpu_check.sh`` stays runnable: the GPU check is run on a GPU only rarely, so CI runs
the same check code on the CPU (``--cpu --quick``: gloo, the CPU proxies of the GPU mechanisms,
docs/gpu.md) and asserts that every row of its table passes; and, on a machine without a GPU,
that the plain command says so in one line and exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# (check, engine, first word of the dtype column) of every row the table must have.
EXPECTED_PASS = [
    ("gain vs reference", "ddp", "fp32"),
    ("gain vs reference", "fsdp2", "fp32"),
    ("gain vs reference", "fsdp2", "bf16"),
    ("gain vs reference", "fsdp1", "fp32"),
    ("gain vs reference", "fsdp1", "bf16"),
    ("AdaScale built before move", "ddp", "fp32->fp64"),
    ("refused at initialize", "zero0", "fp16"),
    *[("gain vs reference", f"zero{stage}", "fp16") for stage in range(4)],
    *[("gain vs reference", f"zero{stage}", "bf16") for stage in range(4)],
    ("AdaScale built before move", "zero0 Python path", "fp32->bf16"),
    ("AdaScale built before move", "zero2 Python path", "fp32->bf16"),
]
EXPECTED_INFO = [("overhead (informational)", "ddp many_small", "fp32")]


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DS_ACCELERATOR")}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def table_rows(stdout: str) -> dict[tuple[str, str, str], list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 8 or cells[0] == "check":
            continue
        rows[(cells[0], cells[1], cells[2].split()[0])] = cells
    return rows


@pytest.mark.distributed
def test_cpu_quick_every_row_passes(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    results = ROOT / "benchmarks" / "results" / "overhead.jsonl"
    before = results.stat().st_mtime_ns if results.exists() else None
    proc = run_script("--cpu", "--quick", "--out", str(tmp_path), timeout=600)
    report = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    rows = table_rows(proc.stdout)
    for key in EXPECTED_PASS:
        assert key in rows, f"row {key} missing\n{report}"
        assert rows[key][6] == "PASS", f"row {key}: {rows[key]}\n{report}"
    for key in EXPECTED_INFO:
        assert key in rows and rows[key][6] == "INFO", f"row {key}\n{report}"
        assert "AdaScale/base x" in rows[key][7]
    assert len(rows) == len(EXPECTED_PASS) + len(EXPECTED_INFO), report
    assert "gpu_check: PASS" in proc.stdout
    # Exactly one table: its header once, and no rank's log lines in between.
    assert proc.stdout.count("| check | engine |") == 1
    assert all(line.startswith(("gpu_check: ", "|")) for line in proc.stdout.splitlines() if line), report
    # Results land in --out, never in benchmarks/results/.
    assert (tmp_path / "overhead.jsonl").exists() and (tmp_path / "gpu_check.md").exists()
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["device"] == "cpu" and len(summary["rows"]) == len(rows)
    assert (results.stat().st_mtime_ns if results.exists() else None) == before


def test_without_a_gpu_it_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the plain command runs the checks")
    proc = run_script(timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("gpu_check: no CUDA device (")
    assert "skipped. To run the same checks on the CPU: bash scripts/gpu_check.sh --cpu" in lines[0]
