#!/usr/bin/env bash
# AdaScale's overhead on every engine and both workloads (2 gloo ranks), appended to
# benchmarks/results/overhead.jsonl, then the README table. Run on a quiet machine: the timings
# share 2 cores with nothing else. Usage: bash benchmarks/run_overhead.sh [extra overhead.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/python -c "import fairscale" 2>/dev/null || .venv/bin/python -m pip install --quiet "fairscale==0.4.13" --no-deps
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
for workload in gpt2 many_small; do
    for engine in ddp fsdp2 zero1 zero2 zero3; do
        extra=()
        [ "$engine" = ddp ] && extra=(--fairscale)
        .venv/bin/torchrun --nproc_per_node=2 benchmarks/overhead.py --engine "$engine" --workload "$workload" "${extra[@]}" "$@" 2>&1 \
            | grep -E "^(ddp|fsdp2|zero[123]) " || echo "$engine $workload: failed"
    done
done
.venv/bin/python benchmarks/overhead_table.py benchmarks/results/overhead.jsonl
