"""Supervised fine-tuning with TRL's ``SFTTrainer`` and a PEFT LoRA adapter, with AdaScale.

The way most fine-tuning is done: a causal LM, frozen, with a low-rank adapter (LoRA's ``A`` and
``B`` matrices, the only trainable parameters) trained on prompt/completion pairs by
``trl.SFTTrainer`` (``peft_config=LoraConfig(...)``), the loss on the completion tokens only.
AdaScale comes in through the package's Trainer API, ``enable_adascale(trainer, ...)`` (or, with
``--deepspeed configs/zero2.json``, the JSON block), and hooks only the adapter's parameters.

Nothing is downloaded:

* the model is a small GPT-2 built from a config (``--config_name``/``--config_overrides``, or
  ``--model_name_or_path`` for a causal LM on disk), given a short "pretraining" first
  (``--pretrain_steps`` Adam steps on the standard library's source, identical on every rank) so
  that the adapter fine-tunes a model that already knows some Python;
* the data are prompt/completion pairs from the standard library: the prompt is a function's
  ``def`` line, the completion its docstring's first paragraph (``--train_file``: a JSON-lines
  file with ``prompt`` and ``completion`` fields instead). They have different lengths, and TRL
  pads each batch to its longest example (TRL's default: no packing), so micro-batches hold
  different numbers of label tokens; ``adascale_summary.json`` records their spread
  (``label_tokens_cv``; what it does to the gain: docs/trainer.md);
* the tokenizer is a byte-level BPE trained on the training text (``recipes/run_clm.py``'s).

``--max_steps`` is the budget in scale-invariant steps; the run stops at the first update with
``tau >= max_steps``. TRL's own defaults for ``SFTConfig`` apply (``gradient_checkpointing``,
``bf16``, ``logging_steps 10``); ``--learning_rate`` is the base
optimizer's (SGD with momentum 0.9 by default: ``--adascale_optimizer``, ``--momentum``).

Examples::

    torchrun --nproc_per_node=2 recipes/sft_lora.py --use_cpu true --output_dir runs/sft_lora \\
        --max_steps 40 --learning_rate 0.2 --per_device_train_batch_size 8 --gradient_accumulation_steps 2
    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 recipes/sft_lora.py --use_cpu true \\
        --deepspeed configs/zero2.json --output_dir runs/sft_lora_z2 --max_steps 40 --learning_rate 0.2 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2
"""

from __future__ import annotations

import ast
import logging
import math
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import adascale_shard  # noqa: F401 - registers "type": "AdaScale" for DeepSpeed JSON configs

logger = logging.getLogger(__name__)


@dataclass
class LoraArguments:
    pretrain_steps: int = field(
        default=150, metadata={"help": "Adam steps on stdlib source first (a model built from a config only)."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.0)
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names (default: PEFT's for the architecture)."}
    )


@dataclass
class SftDataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "JSON lines with 'prompt' and 'completion' (default: stdlib docstrings)."}
    )
    max_train_samples: int | None = field(default=2048)
    max_eval_samples: int | None = field(default=128)
    max_completion_chars: int = field(default=240, metadata={"help": "Docstring paragraphs longer than this are cut."})


def docstring_pairs(max_completion_chars: int, limit: int | None = None) -> list[dict[str, str]]:
    """Prompt/completion pairs from the standard library's top-level modules, in a fixed order
    (the first ``limit``): ``def name(args):`` and the first paragraph of the function's docstring."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for path in sorted(stdlib.glob("*.py")):
        if limit is not None and len(pairs) >= limit:
            return pairs[:limit]
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            paragraph = " ".join((doc or "").split("\n\n")[0].split())
            if len(paragraph) < 20:
                continue
            # The prompt ends on a token boundary (":"), the completion starts at the newline: BPE
            # would merge a newline ending the prompt with the indentation that follows it.
            prompt = f"def {node.name}({ast.unparse(node.args)}):"
            pairs.append({"prompt": prompt, "completion": f'\n    """{paragraph[:max_completion_chars]}"""'})
    return pairs


def load_pairs(data_args: SftDataArguments, seed: int):
    """``(train, eval)`` datasets of prompt/completion pairs."""
    from datasets import Dataset, load_dataset

    if data_args.train_file:
        pairs = load_dataset("json", data_files=data_args.train_file, split="train").to_list()
    else:
        wanted = None if data_args.max_train_samples is None else data_args.max_train_samples + (data_args.max_eval_samples or 0)
        pairs = docstring_pairs(data_args.max_completion_chars, wanted)
    random.Random(seed).shuffle(pairs)
    n_eval = min(data_args.max_eval_samples or 0, len(pairs) // 10)
    train = pairs[n_eval:]
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    return Dataset.from_list(train), Dataset.from_list(pairs[:n_eval])


def pretrain(model, tokenizer, steps: int, seed: int, block: int = 64, batch: int = 16) -> None:
    """A short Adam run on the standard library's source: every rank runs the same steps on the
    same data from the same seed, so every rank starts fine-tuning from the same weights."""
    import torch
    from run_clm import stdlib_corpus

    if steps <= 0:
        return
    ids = tokenizer(stdlib_corpus(400_000))["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        model(input_ids=rows, labels=rows).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def label_token_spread(dataset, micro_batch: int, seed: int, samples: int = 512) -> tuple[float, float]:
    """Mean and coefficient of variation of the label (completion) tokens per micro-batch of
    ``micro_batch`` random examples: what decides how far the token-normalised loss moves the
    gain from the equal-weight one (docs/trainer.md#variable-length-batches-sft)."""
    if "completion_mask" in dataset.column_names:
        counts = [sum(mask) for mask in dataset["completion_mask"]]
    else:
        counts = [len(ids) for ids in dataset["input_ids"]]
    rng = random.Random(seed)
    totals = [sum(rng.choices(counts, k=micro_batch)) for _ in range(samples)]
    mean = sum(totals) / len(totals)
    var = sum((t - mean) ** 2 for t in totals) / (len(totals) - 1)
    return mean, math.sqrt(var) / mean


def build_trainer(argv: list[str] | None = None):
    """The ``SFTTrainer`` with its LoRA adapter and AdaScale enabled: ``(trainer, callback, plot)``."""
    from peft import LoraConfig
    from run_clm import ModelArguments, build_model, train_tokenizer  # recipes/ is on sys.path
    from transformers import HfArgumentParser, PreTrainedTokenizerFast, set_seed
    from trl import SFTConfig, SFTTrainer

    from adascale_shard.integrations.hf import AdaScaleArguments

    parser = HfArgumentParser((ModelArguments, LoraArguments, SftDataArguments, AdaScaleArguments, SFTConfig))
    model_args, lora_args, data_args, ada_args, sft_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    set_seed(sft_args.seed)
    tokenizer_dir = Path(sft_args.output_dir) / "tokenizer"
    train_dataset, eval_dataset = load_pairs(data_args, sft_args.seed)
    if model_args.tokenizer_name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    else:
        with sft_args.main_process_first(desc="train the tokenizer"):
            if (tokenizer_dir / "tokenizer.json").exists():
                tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
            else:
                texts = [p + c for p, c in zip(train_dataset["prompt"], train_dataset["completion"])]
                tokenizer = train_tokenizer(texts, model_args.vocab_size, tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry no label either way

    model = build_model(model_args, len(tokenizer), block_size=sft_args.max_length or 1024)
    if model_args.model_name_or_path is None and lora_args.pretrain_steps > 0:
        if any(p.numel() == 0 for p in model.parameters()):
            raise ValueError("--pretrain_steps needs the whole model on every rank: pass --pretrain_steps 0 under ZeRO-3")
        pretrain(model, tokenizer, lora_args.pretrain_steps, sft_args.seed)
    targets = lora_args.lora_target_modules
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets.split(",") if targets else None,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return trainer, ada_args.enable(trainer), ada_args.plot


def main(argv: list[str] | None = None) -> dict:
    return run(*build_trainer(argv))


def run(trainer, callback, plot: bool) -> dict:
    """Train to the budget, evaluate, write the summary and print the closing line."""
    from _common import finish_run

    args = trainer.args
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json with every log record, for adascale-advisor
    metrics = dict(result.metrics)
    eval_metrics = trainer.evaluate()
    metrics["eval_loss"] = eval_metrics["eval_loss"]
    metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50))
    mean, cv = label_token_spread(trainer.train_dataset, args.per_device_train_batch_size, args.seed)
    extra = {
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "label_tokens_mean": mean,
        "label_tokens_cv": cv,
        "train_samples": len(trainer.train_dataset),
    }
    return finish_run(trainer, callback, Path(args.output_dir), metrics, plot, **extra)


if __name__ == "__main__":
    from _common import shutdown

    main(sys.argv[1:])  # the Trainer and its engine are released when main returns
    shutdown()
