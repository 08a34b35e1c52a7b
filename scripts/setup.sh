#!/usr/bin/env bash
# Creates .venv and installs the project with its test and plot extras. Safe to run twice.
# torch is pinned to the CPU wheel first: a bare "torch" requirement with no torch installed
# would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[test,plots]"
.venv/bin/python -c "import torch, adascale_shard, pytest, hypothesis; print('set-up ok: torch', torch.__version__, '- adascale_shard', adascale_shard.__version__)"
