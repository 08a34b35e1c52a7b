"""PNG plots of AdaScale runs (needs matplotlib: ``pip install -e '.[plots]' in a clone of adascale-shard``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_log_history"]


def plot_log_history(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Gain, learning rate and loss against scale-invariant steps, from log records carrying
    ``adascale/*`` keys (the HF Trainer's ``state.log_history``). Returns the PNG's path, or
    ``None`` when matplotlib is not installed or no record has AdaScale metrics."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in records if "adascale/tau" in r]
    if not rows:
        return None
    tau = [r["adascale/tau"] for r in rows]
    panels = [
        ("adascale/gain", "gain r"),
        ("adascale/effective_lr", "effective lr (lr x gain)"),
        ("loss", "training loss"),
        ("adascale/noise_scale", "noise scale var/sqr (base batches)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(t, r[key]) for t, r in zip(tau, rows) if key in r]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    eval_points = [(r["adascale/tau"], r["eval_loss"]) for r in records if "eval_loss" in r and "adascale/tau" in r]
    if eval_points:
        axes[1, 0].plot(*zip(*eval_points), "o-", label="eval loss")
        axes[1, 0].legend()
    if any("adascale/noise_scale" in r for r in rows):
        axes[1, 1].set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("scale-invariant steps tau")
    fig.suptitle("AdaScale: gain, learning rate and loss against scale-invariant steps")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
