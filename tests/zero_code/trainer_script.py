"""A Hugging Face Trainer script that never imports adascale_shard, in the style of the HF examples.

Launched by ``tests/integrations/test_runner.py`` through ``python -m adascale_shard.run`` under
``torchrun``, ``deepspeed`` and ``accelerate launch``: every AdaScale setting comes from the
DeepSpeed JSON (``--deepspeed``) or from nothing at all. Rank 0 writes ``<output_dir>/result.json``:
what the Trainer ran (optimizer class, updates, ``max_steps``) and its ``log_history``.
"""

import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _result import report_trainer  # tests/zero_code/_result.py, beside this script
from transformers import AutoModelForCausalLM, GPT2Config, HfArgumentParser, Trainer, TrainingArguments

BLOCK = 32


@dataclass
class ScriptArguments:
    samples: int = field(default=256, metadata={"help": "training blocks of BLOCK bytes"})


def datasets(samples: int):
    from datasets import Dataset

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("a*.py")))
    blocks = [list(data[i * BLOCK : (i + 1) * BLOCK]) for i in range(samples + 32)]
    return (
        Dataset.from_dict({"input_ids": blocks[:samples], "labels": blocks[:samples]}),
        Dataset.from_dict({"input_ids": blocks[samples:], "labels": blocks[samples:]}),
    )


def main() -> None:
    script_args, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    if args.deepspeed and args.use_cpu:
        # On GPUs Accelerate's PartialState starts DeepSpeed's communication backend; with --use_cpu it
        # starts torch.distributed only, and ZeRO-3's zero.Init (from_config under a ZeRO-3 JSON) would
        # see one process. Not AdaScale's: the same with "type": "AdamW".
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    config = GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2)
    model = AutoModelForCausalLM.from_config(config)
    train, val = datasets(script_args.samples)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train()
    report_trainer(trainer, argv=sys.argv)

if __name__ == "__main__":
    main()
