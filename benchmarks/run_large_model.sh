#!/usr/bin/env bash
# AdaScale on GPT-2 small (124M parameters), 2 gloo ranks, on ZeRO-3, ZeRO-3 + offload, FSDP1 and
# FSDP2: per engine one paired timing launch (--adascale both) and one launch per variant for its
# peak RSS (off, on), appended to benchmarks/results/large_model.jsonl, then large_model.md.
# Takes about 20-30 minutes on 2 cores. Usage: bash benchmarks/run_large_model.sh [extra large_model.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for engine in zero3 zero3_offload fsdp1 fsdp2; do
    for mode in both off on; do
        "$TORCHRUN" --nproc_per_node=2 benchmarks/large_model.py --engine "$engine" --adascale "$mode" "$@" 2>&1 \
            | grep -E "^\[large_model" || echo "$engine $mode: failed"
    done
done
"$PY" benchmarks/large_model.py --table
