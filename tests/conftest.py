"""Shared pytest configuration.

Tests that launch real processes (``tests/distributed``) carry the ``distributed`` marker
(declared in ``pyproject.toml``): ``pytest -m "not distributed"`` runs the quick set. The
multi-process harness is ``tests/harness.py`` (``from tests.harness import run_distributed``).
"""

from __future__ import annotations

import torch


def pytest_report_header(config):
    gloo = torch.distributed.is_available() and torch.distributed.is_gloo_available()
    return f"torch {torch.__version__}, gloo available: {gloo}, cpu threads: {torch.get_num_threads()}"
