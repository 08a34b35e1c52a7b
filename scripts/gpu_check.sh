#!/usr/bin/env bash
# AdaScale's device-sensitive checks on CUDA, in one command of at most 10 minutes on one GPU
# (docs/gpu.md): DDP, FSDP2 and FSDP1 (fp32, bf16 mixed precision), DeepSpeed ZeRO-0/1/2/3 (fp16 with a
# growing loss scale, bf16) against a single-process fp32 reference, AdaScale built before
# model.to("cuda"), and the overhead benchmark on the GPU. Prints one table; exit code 0 when
# every check passes, 1 when one fails, 2 when some were skipped (DeepSpeed missing, time budget).
#
#   bash scripts/gpu_check.sh                 # on a GPU machine
#   bash scripts/gpu_check.sh --cpu [--quick] # the same checks on the CPU (gloo, CPU proxies): what CI runs
#
# Other options go to scripts/gpu_check.py (--out DIR, --budget-s S, --overhead-seconds S,
# --no-overhead). Without a GPU and without --cpu it prints one line and exits 0.
#
# Which Python: .venv's, if its torch sees a GPU (or with --cpu; scripts/setup.sh makes .venv when
# it is missing). setup.sh pins the CPU wheel of torch, which never sees a GPU, and a .venv made on
# another machine does not run; so when nvidia-smi finds a GPU and .venv's torch does not, the
# system python is tried (a GPU image's own torch). DeepSpeed missing there: wheels in .gpu-wheels/
# are installed into a temporary directory first, if present (docs/gpu.md says how to fill it).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

cpu=0
for arg in "$@"; do
    [ "$arg" = "--cpu" ] && cpu=1
done

torch_info() {  # one line about the torch of python "$1"; fails without a torch
    "$1" -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torch.cuda.is_available() {torch.cuda.is_available()}")' 2>/dev/null
}
sees_gpu() {
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

venv=.venv/bin/python
py=""
if [ "$cpu" = 1 ]; then
    if [ ! -e .venv ]; then
        echo "gpu_check: no .venv: running bash scripts/setup.sh"
        bash scripts/setup.sh || { echo "gpu_check: FAIL: scripts/setup.sh failed"; exit 1; }
    fi
    py=$venv
    export DS_ACCELERATOR=cpu
else
    gpu=0
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        gpu=1
    fi
    venv_info=""
    if [ -x "$venv" ] && venv_info=$(torch_info "$venv"); then
        if [[ "$venv_info" == *"is_available() True" ]]; then
            py=$venv
        elif [ "$gpu" = 1 ]; then
            echo "gpu_check: nvidia-smi sees a GPU but .venv's torch does not ($venv_info: a CPU wheel); trying the system python"
        fi
    elif [ "$gpu" = 1 ]; then
        echo "gpu_check: nvidia-smi sees a GPU; .venv is missing or does not run here; trying the system python"
    fi
    if [ -z "$py" ] && [ "$gpu" = 1 ]; then
        for candidate in python3 /opt/torch/.venv/bin/python3 python; do
            path=$(command -v "$candidate" 2>/dev/null) || continue
            if sees_gpu "$path"; then
                py=$path
                echo "gpu_check: using $py: $(torch_info "$py")"
                break
            fi
        done
        if [ -z "$py" ] && [ ! -e .venv ]; then
            echo "gpu_check: no python here has a torch that sees the GPU; running bash scripts/setup.sh"
            bash scripts/setup.sh && sees_gpu "$venv" && py=$venv
        fi
    fi
    if [ -z "$py" ]; then
        if [ "$gpu" = 1 ]; then
            echo "gpu_check: FAIL: nvidia-smi sees a GPU but no python here has a torch that sees it (.venv: ${venv_info:-none}); install a CUDA build of torch"
            exit 1
        fi
        if [ -n "$venv_info" ]; then
            reason="torch.cuda.is_available() is False"
        else
            reason="nvidia-smi finds no GPU and there is no .venv with torch"
        fi
        echo "gpu_check: no CUDA device ($reason); skipped. To run the same checks on the CPU: bash scripts/gpu_check.sh --cpu"
        exit 0
    fi
    export DS_ACCELERATOR=cuda
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # adascale_shard from this tree, installed or not
if compgen -G ".gpu-wheels/*.whl" >/dev/null && ! "$py" -c 'import deepspeed' >/dev/null 2>&1; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    if "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" .gpu-wheels/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$site"
        echo "gpu_check: DeepSpeed and its wheels from .gpu-wheels/ installed into $site"
    else
        echo "gpu_check: installing .gpu-wheels/*.whl failed; the DeepSpeed rows will say why"
    fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$py" scripts/gpu_check.py "$@"
