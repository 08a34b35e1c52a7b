"""Causal language modelling with the Hugging Face Trainer and AdaScale, in the style of the HF
``run_clm.py`` example.

A GPT-2-architecture model, from scratch (``--config_name``, default: a small GPT-2 built from a
config) or from weights on disk (``--model_name_or_path``), trained on local text loaded with
``datasets``: ``--train_file``/``--validation_file``, or by default a corpus built from the Python
standard library's own source, which every machine has. Nothing is downloaded: without
``--tokenizer_name`` a byte-level BPE tokenizer is trained on the training text and saved with
the model.

AdaScale: ``--base_batch_size`` (samples; default the per-device batch: ``S = N``), the base
optimizer (``--adascale_optimizer SGD --momentum 0.9``) or, with ``--deepspeed configs/zero2.json``,
the JSON block. ``--max_steps`` is the budget in scale-invariant steps.

Examples::

    torchrun --nproc_per_node=2 recipes/run_clm.py --output_dir runs/clm --max_steps 200 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 0.05
    torchrun --nproc_per_node=2 recipes/run_clm.py --deepspeed configs/zero2.json --output_dir runs/clm_z2
"""

from __future__ import annotations

import logging
import math
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import adascale_shard  # noqa: F401 - registers "type": "AdaScale" for DeepSpeed JSON configs

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Pretrained weights on disk."})
    config_name: str | None = field(
        default=None, metadata={"help": "A config to build the model from (default: a small GPT-2)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Override config values, e.g. 'n_embd=64,n_layer=2'."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer on disk (default: train a byte-level BPE on the data)."}
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary of the tokenizer trained when none is given."})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "A .txt/.json/.csv file (default: stdlib source)."})
    validation_file: str | None = field(default=None)
    corpus_bytes: int = field(default=1_500_000, metadata={"help": "Size of the default stdlib corpus."})
    validation_split_percentage: int = field(default=5)
    block_size: int = field(default=64, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=256)
    preprocessing_num_workers: int | None = field(default=None)


def stdlib_corpus(limit: int) -> str:
    """Text of the standard library's top-level modules, in a fixed order (same on every machine)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def load_raw_datasets(data_args: DataArguments, cache_dir: Path):
    from datasets import load_dataset

    if data_args.train_file is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        train_file = cache_dir / "stdlib_corpus.txt"
        if not train_file.exists():
            train_file.write_text(stdlib_corpus(data_args.corpus_bytes))
        data_files = {"train": str(train_file)}
    else:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file:
            data_files["validation"] = data_args.validation_file
    extension = Path(data_files["train"]).suffix.lstrip(".")
    loader, options = ("text", {"keep_linebreaks": True}) if extension == "txt" else (extension, {})
    raw = load_dataset(loader, data_files=data_files, **options)
    if "validation" not in raw:
        pct = data_args.validation_split_percentage
        raw["validation"] = load_dataset(loader, data_files=data_files, split=f"train[:{pct}%]", **options)
        raw["train"] = load_dataset(loader, data_files=data_files, split=f"train[{pct}%:]", **options)
    return raw


def train_tokenizer(texts, vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer trained on the training text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(model_args: ModelArguments, vocab_size: int, block_size: int, tokenizer=None):
    """The model; built from a config, it takes the special-token ids ``tokenizer`` defines (the
    Trainer would align them itself, with a warning; the run is the same)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name)
    else:  # a small GPT-2: fast on CPU, same architecture as the real one
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max(block_size, 64))
    config.vocab_size = vocab_size
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is not None:
                setattr(config, name, getattr(tokenizer, name))
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return AutoModelForCausalLM.from_config(config)


def main(argv: list[str] | None = None) -> dict:
    from _common import finish_run  # recipes/ is on sys.path when a recipe runs
    from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator, set_seed

    from adascale_shard.integrations.hf import AdaScaleArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, AdaScaleArguments, TrainingArguments))
    model_args, data_args, ada_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    raw = load_raw_datasets(data_args, output_dir / "data")
    if model_args.tokenizer_name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    else:
        tokenizer_dir = output_dir / "tokenizer"
        with training_args.main_process_first(desc="train the tokenizer"):
            if (tokenizer_dir / "tokenizer.json").exists():
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
            else:
                tokenizer = train_tokenizer(raw["train"]["text"], model_args.vocab_size, tokenizer_dir)
    block_size = data_args.block_size

    def tokenize(batch):
        return tokenizer(batch["text"])

    def group_texts(batch):
        ids = sum(batch["input_ids"], [])
        total = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [list(b) for b in blocks]}

    with training_args.main_process_first(desc="tokenize and group"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=["text"], num_proc=data_args.preprocessing_num_workers)
        lm = tokenized.map(group_texts, batched=True, remove_columns=tokenized["train"].column_names)
    train_dataset, eval_dataset = lm["train"], lm["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    model = build_model(model_args, len(tokenizer), block_size, tokenizer)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    callback = ada_args.enable(trainer)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json with every log record, for adascale-advisor
    metrics = dict(result.metrics)
    eval_metrics = trainer.evaluate()
    metrics["eval_loss"] = eval_metrics["eval_loss"]
    metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50))
    return finish_run(trainer, callback, output_dir, metrics, ada_args.plot)


if __name__ == "__main__":
    from _common import shutdown

    main(sys.argv[1:])  # the Trainer and its engine are released when main returns
    shutdown()
