"""What the zero-code scripts report (they import no adascale_shard): rank 0's ``result.json``."""

import json
from pathlib import Path


def optimizer_chain(optimizer) -> list[str]:
    """The class names from the optimizer the script holds down to the innermost one."""
    names = []
    while optimizer is not None and len(names) < 8:
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return names


def write_result(output_dir: str, result: dict) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, "result.json").write_text(json.dumps(result, indent=1))


def report_trainer(trainer, **extra) -> None:
    """A Trainer's run: optimizers, updates, max_steps, log_history, and the DeepSpeed JSON
    scheduler with the Trainer's "auto" values filled in."""
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    result = {
        "optimizers": optimizer_chain(trainer.optimizer),
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "log_history": trainer.state.log_history,
        **extra,
    }
    if args.hf_deepspeed_config is not None:
        result["deepspeed_scheduler"] = args.hf_deepspeed_config.config.get("scheduler")
    write_result(args.output_dir, result)
    taus = [r["adascale/tau"] for r in trainer.state.log_history if "adascale/tau" in r]
    reached = f"tau {taus[-1]:.2f} / max_steps {trainer.state.max_steps}" if taus else f"max_steps {trainer.state.max_steps}"
    print(f"trained {trainer.state.global_step} updates; {reached}; optimizers {result['optimizers']}")
