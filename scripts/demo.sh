#!/usr/bin/env bash
# The README's main job: a small real DDP training (2 gloo ranks on CPU) with AdaScale on the
# built-in defaults. Arguments pass through to recipes/train_ddp.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/torchrun --nproc_per_node=2 recipes/train_ddp.py "$@"
