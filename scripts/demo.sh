#!/usr/bin/env bash
# The README's main job: GPT-2-architecture causal LM on the Python standard library's source,
# trained by the Hugging Face Trainer with DeepSpeed ZeRO-2 on 2 CPU processes (gloo), with
# AdaScale from the JSON block in configs/zero2.json. Writes outputs/demo/adascale.png.
# Extra arguments override the defaults below (e.g. --max_steps 200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's own default, set here so it does not print a banner about it
exec .venv/bin/torchrun --nproc_per_node=2 recipes/run_clm.py \
    --deepspeed configs/zero2.json --use_cpu true \
    --output_dir outputs/demo \
    --max_steps 1000 --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \
    --learning_rate 0.1 --warmup_steps 50 --lr_scheduler_type cosine \
    --logging_steps 10 --eval_strategy steps --eval_steps 200 --save_strategy no \
    --report_to tensorboard --seed 0 "$@"
