"""What the HF-Trainer recipes share: the end of a run (summary file, PNG, the closing line)."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from adascale_shard.integrations.hf import run_summary
from adascale_shard.plots import plot_log_history


def finish_run(trainer: Any, callback: Any, output_dir: Path, metrics: dict[str, Any], plot: bool, **extra: Any) -> dict:
    """Write ``adascale_summary.json`` (and ``adascale.png``) on the main process, print the
    closing line, return the summary. ``callback`` None: a plain Trainer run (no AdaScale; ``tau``
    and ``gain`` are None, ``S`` is the global batch over ``base_batch_size`` when given)."""
    base_batch_size = extra.pop("base_batch_size", None)
    core = run_summary(trainer, callback) if callback is not None else plain_summary(trainer, base_batch_size)
    summary = {**core, **extra, **metrics}
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "adascale_summary.json").write_text(json.dumps(summary, indent=2))
        if plot:
            png = plot_log_history(trainer.state.log_history, output_dir / "adascale.png")
            if png is not None:
                print(f"plot: {png}")
        before = f"{summary['eval_loss_initial']:.3f} -> " if "eval_loss_initial" in summary else ""
        if callback is None:
            progress = f"{summary['updates']} updates / {summary['max_steps']} (no AdaScale, S = {summary['S']:g})"
        else:
            progress = (
                f"{summary['updates']} updates for tau {summary['tau']:.1f} / {summary['max_steps']} "
                f"(S = {summary['S']:g}, final gain {summary['gain']:.2f})"
            )
        print(
            f"done: {progress}; eval loss {before}{summary['eval_loss']:.3f}, "
            f"perplexity {summary['perplexity']:.1f}; outputs in {output_dir}"
        )
    return summary


def plain_summary(trainer: Any, base_batch_size: int | None = None) -> dict:
    """``run_summary``'s fields for a run without AdaScale."""
    args = trainer.args
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    base = base_batch_size or args.per_device_train_batch_size
    return {
        "updates": trainer.state.global_step,
        "tau": None,
        "gain": None,
        "S": global_batch / base,
        "N": args.gradient_accumulation_steps * args.world_size,
        "max_steps": trainer.state.max_steps,
        "engine": type(trainer.model_wrapped).__name__,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
    }


def shutdown() -> None:
    """End a distributed run cleanly: the engines that hold the process group (DDP's reducer,
    DeepSpeed's engine) are released before the group is destroyed; the other way round, gloo
    sometimes aborts at exit after all the work is done."""
    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
