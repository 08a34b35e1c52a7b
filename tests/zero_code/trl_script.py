"""A TRL fine-tuning script that never imports adascale_shard: ``SFTTrainer`` with a PEFT LoRA
adapter on prompt/completion pairs (a stdlib function's ``def`` line and its docstring's first line),
arguments parsed into ``SFTConfig`` as TRL's own scripts do.

Launched by ``tests/integrations/test_runner.py`` through ``python -m adascale_shard.run`` with a
DeepSpeed JSON ``"type": "AdaScale"``. Rank 0 writes ``<output_dir>/result.json``.
"""

import ast
import sysconfig
from pathlib import Path

import torch
from _result import report_trainer  # tests/zero_code/_result.py, beside this script
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, HfArgumentParser, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer


def pairs(limit: int = 256) -> list[dict[str, str]]:
    out = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8", errors="replace"))):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc:
                out.append({"prompt": f"def {node.name}({ast.unparse(node.args)}):", "completion": " " + doc.split("\n")[0]})
                if len(out) == limit:
                    return out
    return out


def tokenizer_for(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main() -> None:
    (args,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses()
    from datasets import Dataset

    examples = pairs()
    tokenizer = tokenizer_for([e["prompt"] + e["completion"] for e in examples])
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    report_trainer(trainer, trainable_parameters=trainable)

if __name__ == "__main__":
    main()
