"""benchmarks/large_model.py stays importable: ``--help``, its argument checks and the ``--table``
mode on two made-up rows. Nothing here runs the benchmark (GPT-2 small on 2 ranks takes minutes)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "large_model.py"


def _module():
    spec = importlib.util.spec_from_file_location("large_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--engine" in out.stdout and "zero3_offload" in out.stdout


def test_arguments():
    module = _module()
    args = module.parse_args(["--engine", "fsdp1", "--adascale", "off"])
    assert (args.engine, args.adascale, args.accumulation) == ("fsdp1", "off", 2)
    with pytest.raises(SystemExit):
        module.parse_args([])  # --engine or --table
    with pytest.raises(SystemExit):
        module.parse_args(["--engine", "ddp"])


def test_table_from_rows(tmp_path):
    module = _module()
    common = {"engine": "fsdp2", "world_size": 2, "parameters": 124439808, "micro_batches_per_update": 4}
    rss = [{"peak": 2**30}, {"peak": 2**30}]
    rows = [
        {**common, "mode": "both", "command": "c1", "median_s": {"base": 7.0, "adascale": 7.1},
         "ratio": {"mean": 1.01, "ci95": [0.99, 1.03], "per_pair": [1.0, 1.02, 1.01]}, "pairs": 8, "rss_bytes": rss,
         "adascale_persistent": [{"bytes": 2976}, {"bytes": 2976}],
         "allocated_bytes_per_update": {"base": 100, "adascale": 8516}, "adascale_stats": {"gain": 3.9}},
        {**common, "mode": "off", "command": "c2", "rss_bytes": rss, "seconds_per_update": [7.0]},
        {**common, "mode": "on", "command": "c3", "rss_bytes": [{"peak": 2**30 + 2**20}, {"peak": 2**30}],
         "seconds_per_update": [7.2]},
    ]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = module.write_table(path, tmp_path / "rows.md")
    assert (
        "| fsdp2 | 2 | 124.4M | 4 | 7.00 | 7.10 | 1.010 [0.990, 1.030] | 1.010 | 8 | 1.00 / 1.00 | 1.00 / 1.00 |"
        in text
    )
    assert "2,976 / 2,976 | +8,416 | 3.900 |" in text
    assert "c3    # line 3" in text
    assert "| 3 | fsdp2 | on | 1.001 | 1.000 | 7.2 |" in text
