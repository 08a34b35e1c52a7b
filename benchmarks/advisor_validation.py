"""How close is the batch-size advisor's prediction to the measured speed-up?

The scale-invariance benchmark (``benchmarks/scale_invariance.py``) runs AdaScale at each scale
``S`` until ``tau >= T1`` and records the number of updates it took (the realized average speed-up
is ``T1 / updates`` against the ideal ``S``). This script re-runs the benchmark's AdaScale run at a
small *source* scale ``S0`` (same task, seed, learning rate and data stream, so the same updates:
checked) while logging ``AdaScale.stats()``, hands that log to the advisor
(:class:`adascale_shard.advisor.Model`) and compares its predicted update counts at every ``S``
with the benchmark's measured ones.

Predictions compared (error = (predicted - measured) / measured; positive = the advisor predicts
more updates than AdaScale needed, i.e. it underestimates the speed-up):

* **replay, every update**: the advisor on a log with one record per update (``recipes/train_ddp.py``
  writes that): the logged averages undone, AdaScale replayed at ``S`` with its own averaging;
* **replay, Trainer-style log**: the same from a record every ``T1/50`` scale-invariant steps (what the
  Hugging Face Trainer with ``logging_steps = T1/50`` keeps);
* **logged r**: ``integral dtau / gain_S(r)`` on the logged, averaged noise scale, without undoing the
  averaging (the advisor's fallback for logs without ``updates``/``S``).

    .venv/bin/python benchmarks/advisor_validation.py --output benchmarks/results/advisor_validation.md   # the committed table
    .venv/bin/python benchmarks/advisor_validation.py --tasks digits --sources 2 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scale_invariance as si

from adascale_shard import AdaScale, follow_tau
from adascale_shard import estimators as est
from adascale_shard.advisor import Model, RunLog

LOG_EVERY = 50  # Trainer-style log: a record every T1 / LOG_EVERY scale-invariant steps


def load(path: Path) -> dict[str, list[dict]]:
    """AdaScale rows per task: the latest full (non-quick) grid of each task, else the latest quick
    one (as ``scale_invariance.py --table`` picks them); rows from ``--ranks`` runs are left out."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen: dict[str, list[dict]] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["method"] == "AS" and not r.get("ranks")]
        pool = [r for r in mine if not r.get("quick")] or mine
        if pool:
            latest = max(r["run_id"] for r in pool)
            chosen[task] = [r for r in pool if r["run_id"] == latest]
    return chosen


def source_log(task, row: dict, cache: Path) -> list[dict]:
    """The benchmark's AdaScale run of ``row`` again, with ``stats()`` after every update."""
    path = cache / f"{row['task']}_{row['run_id']}_S{row['scale']}_seed{row['seed']}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    steps, scale = row["T1"], row["scale"]
    model = task.model(row["seed"])
    gen = torch.Generator().manual_seed(10_000 + row["seed"])
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=row["lr"], momentum=si.MOMENTUM))
    sched = follow_tau(torch.optim.lr_scheduler.LambdaLR(opt, si.base_schedule(steps)), opt)
    records = []
    while not opt.budget_spent(steps):
        si.accumulate(task, model, scale, row["batch"], gen)
        opt.step()
        opt.zero_grad()
        sched.step()
        s = opt.stats()
        records.append({k: s[k] for k in ("tau", "updates", "var", "sqr", "S", "gain")})
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def trainer_style(records: list[dict], every: float) -> list[dict]:
    """The records a Trainer keeps with ``logging_steps = every`` (in scale-invariant steps): the
    first update whose ``floor(tau)`` reaches the next multiple, and the last."""
    kept, nxt = [], every
    for r in records:
        if math.floor(r["tau"]) >= nxt:
            kept.append(r)
            while nxt <= math.floor(r["tau"]):
                nxt += every
    if kept[-1] is not records[-1]:
        kept.append(records[-1])
    return kept


def model_of(records: list[dict], instantaneous: bool = False) -> Model:
    points = [(r["tau"], est.noise_scale(r["var"], r["sqr"])) for r in records]
    points = [(t, x) for t, x in points if not math.isnan(x)]
    averaged = [] if instantaneous else [(r["tau"], r["updates"], r["var"], r["sqr"], r["S"]) for r in records]
    return Model(RunLog(Path("-"), points, averaged, [], [], 0))


def validate(task, rows: list[dict], source: int, cache: Path) -> tuple[list[dict], list[str]]:
    problems = []
    per_target: dict[int, list[tuple]] = {}
    for src in sorted((r for r in rows if r["scale"] == source), key=lambda r: r["seed"]):
        started = time.perf_counter()
        log = source_log(task, src, cache)
        if len(log) != src["updates"]:
            problems.append(
                f"{src['task']} seed {src['seed']} S0={source}: the re-run took {len(log)} updates, the benchmark "
                f"{src['updates']} (not the same trajectory)"
            )
        t1 = float(src["T1"])
        full, sparse, naive = model_of(log), model_of(trainer_style(log, t1 / LOG_EVERY)), model_of(log, True)
        for tgt in rows:
            if tgt["seed"] != src["seed"] or tgt["scale"] < 2:
                continue
            per_target.setdefault(tgt["scale"], []).append(
                (
                    tgt["updates"],
                    full.updates_to_reach(tgt["scale"], t1),
                    sparse.updates_to_reach(tgt["scale"], t1),
                    naive.updates_to_reach(tgt["scale"], t1),
                    t1,
                )
            )
        print(f"  {src['task']} seed {src['seed']} S0={source}: {len(log)} updates, {time.perf_counter() - started:.1f}s", file=sys.stderr)
    out = []
    for scale in sorted(per_target):
        runs = per_target[scale]

        def err(i: int, runs: list = runs) -> list[float]:
            return [(r[i] - r[0]) / r[0] for r in runs]

        out.append(
            {
                "scale": scale,
                "seeds": len(runs),
                "measured": statistics.mean(r[0] for r in runs),
                "full": statistics.mean(r[1] for r in runs),
                "full_err": statistics.mean(err(1)),
                "full_worst": max(err(1), key=abs),
                "sparse_err": statistics.mean(err(2)),
                "naive": statistics.mean(r[3] for r in runs),
                "naive_err": statistics.mean(err(3)),
                "speedup": statistics.mean(r[4] / r[0] for r in runs),
                "speedup_pred": statistics.mean(r[4] / r[1] for r in runs),
            }
        )
    return out, problems


def markdown(
    results: Path,
    tasks: list[str] | None,
    sources: list[int],
    seeds: list[int] | None,
    cache: Path,
    command: str = "benchmarks/advisor_validation.py",
) -> str:
    data = load(results)
    lines = [
        f"Advisor prediction vs the scale-invariance benchmark (`{results}`); generated by",
        f"`{command}`. Updates AdaScale took to reach tau = T1 at each S (measured), against",
        "the advisor's prediction from one run at the source scale S0. Error = (predicted - measured) / measured,",
        "mean over seeds (worst seed for the replay): positive = the advisor underestimates the speed-up.",
        "Replay = the logged averages undone and AdaScale replayed at S (the advisor's model); Trainer-style log =",
        f"the same from a record every T1/{LOG_EVERY} scale-invariant steps; logged r = integral dtau / gain_S on",
        "the logged, averaged noise scale (the fallback).",
    ]
    all_problems = []
    summary = []
    torch.set_num_threads(1)
    for name, rows in data.items():
        if tasks and name not in tasks:
            continue
        if seeds is not None:
            rows = [r for r in rows if r["seed"] in seeds]
        task = si.make_task(name)
        first = rows[0]
        for source in sources:
            if not any(r["scale"] == source for r in rows):
                lines += ["", f"**{name}**: no AdaScale run at S0 = {source}"]
                continue
            table, problems = validate(task, rows, source, cache)
            all_problems += problems
            others = [row for row in table if row["scale"] != source]
            summary.append(
                f"| {name} | {source} | {', '.join(str(row['scale']) for row in others)} | "
                + " | ".join(
                    f"{statistics.mean(abs(row[key]) for row in others):.1%} | {max(abs(row[key]) for row in others):.1%}"
                    for key in ("full_err", "naive_err")
                )
                + " |"
            )
            lines += [
                "",
                f"**{name}** (T1 = {first['T1']}, base batch {first['batch']}, lr {first['lr']}, seeds "
                f"{sorted({r['seed'] for r in rows})}, benchmark run {first['run_id']}): source S0 = {source}",
                "",
                "| S | measured updates | replay | error | worst seed | Trainer-style log: error | logged r | error | speed-up measured | predicted |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for row in table:
                mark = " (S0)" if row["scale"] == source else ""
                lines.append(
                    f"| {row['scale']}{mark} | {row['measured']:.0f} | {row['full']:.0f} | {row['full_err']:+.1%} | "
                    f"{row['full_worst']:+.1%} | {row['sparse_err']:+.1%} | {row['naive']:.0f} | {row['naive_err']:+.1%} | "
                    f"{row['speedup']:.2f} | {row['speedup_pred']:.2f} |"
                )
    lines[7:7] = [
        "",
        "Summary (|error| over the target scales other than S0, seed means):",
        "",
        "| task | S0 | target S | replay: mean abs error | max | logged r: mean abs error | max |",
        "|---|---|---|---|---|---|---|",
        *summary,
    ]
    if all_problems:
        lines += ["", "Re-runs that did not reproduce the benchmark's trajectory:"] + [f"- {p}" for p in all_problems]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/scale_invariance.jsonl")
    p.add_argument("--tasks", nargs="+", help="default: every task in the results")
    p.add_argument(
        "--sources", type=int, nargs="+", default=[2, 4, 8], help="source scales S0 to predict from (default: 2 4 8)"
    )
    p.add_argument("--seeds", type=int, nargs="+", help="default: every seed in the results")
    p.add_argument("--cache", default="/tmp/advisor_validation_logs", help="where the source runs' logs are kept")
    p.add_argument("--output", help="also write the Markdown here")
    args = p.parse_args()
    # the header names the command that made the file (the cache directory changes nothing)
    command = " ".join(
        ["benchmarks/advisor_validation.py"]
        + (["--results", args.results] if args.results != p.get_default("results") else [])
        + (["--tasks", *args.tasks] if args.tasks else [])
        + (["--sources", *map(str, args.sources)] if args.sources != p.get_default("sources") else [])
        + (["--seeds", *map(str, args.seeds)] if args.seeds is not None else [])
        + (["--output", args.output] if args.output else [])
    )
    text = markdown(Path(args.results), args.tasks, args.sources, args.seeds, Path(args.cache), command)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
