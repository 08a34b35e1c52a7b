"""AdaScale for AdamW: which rule keeps quality as the batch grows (the scale-invariance protocol).

AdamW is tuned at ``S = 1`` (a small learning-rate sweep, cosine schedule, ``T1`` steps); then for
each scale ``S`` (simulated: ``S`` micro-batches of the base size per update, one process) and seed:

* ``AS``          AdaScale, ``lr x gain``, statistics of the plain gradient (the paper's rule);
* ``AS-sqrt``     AdaScale, ``lr x gain ** 0.5`` (AdaptDL's ``AdamScale`` rule), plain statistics;
* ``AS-pre``      ``lr x gain`` with the gain of Adam's preconditioned gradient (see below);
* ``AS-sqrt-pre`` ``lr x gain ** 0.5`` with the preconditioned gain (AdaptDL's combination);
* ``AS-sqrt-tau`` ``lr x gain ** 0.5`` and ``tau += gain ** 0.5`` (progress counted at the lr's
  rate: more updates), weight decay ``lr x weight_decay x gain ** 0.5`` to match that ``tau``;
* ``LSW``         linear scaling: ``lr x S``, 5% warm-up, the schedule compressed to ``ceil(T1/S)``;
* ``SqrtW``       square-root scaling: ``lr x S ** 0.5``, 5% warm-up, ``ceil(T1/S)`` steps.

Every AdaScale variant reads the schedule at ``floor(tau)``, with ``tau += gain`` unless said
otherwise, and stops at ``tau >= T1``; decoupled weight decay shrinks the weights by ``lr * weight_decay * gain`` per
update under either lr rule (``AdaScale.step``), so the total decay matches the base run; the final
parameter norm is recorded to check it.

Preconditioned statistics, without gathering Adam's sharded second moment: each parameter tensor
gets one scalar weight ``w_p = 1 / (sqrt(mean(v_hat_p)) + eps) ** 2`` (its RMS second moment),
and the gain is computed from ``sum_p w_p var_p`` and ``sum_p w_p sqr_p``. The per-parameter
statistics come from AdaScale itself with one parameter per group; on a sharded engine ``w_p``
needs only each rank's local sum of ``v`` for each parameter (one more small all-reduce).

Tasks, both a small GPT-2-architecture byte-level LM (``scale_invariance.ByteLM``), validation
loss: ``scratch`` trains from random weights on the standard library's Python source;
``finetune`` starts from a model pretrained on that source (``--pretrain_steps`` of AdamW at
``S = 1``) and fine-tunes it on English prose (``pydoc_data/topics.py``, the standard library's
documentation text). Every finished run is appended at once to ``--output``.

    .venv/bin/python benchmarks/adamw.py --task scratch
    .venv/bin/python benchmarks/adamw.py --task finetune
    .venv/bin/python benchmarks/adamw.py --table benchmarks/results/adamw.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_invariance import ByteLM, accumulate, base_schedule, lsw_schedule, train_loop

from adascale_shard import AdaScale, estimators, follow_tau

TASKS = {
    "scratch": {"steps": 800, "lrs": [3e-4, 1e-3, 3e-3, 1e-2]},
    "finetune": {"steps": 400, "lrs": [3e-4, 1e-3, 3e-3, 1e-2]},
}
BATCH = 8
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.999)
ADASCALE_METHODS = {  # method -> (lr_scaling, preconditioned statistics)
    "AS": ("gain", False),
    "AS-sqrt": ("sqrt", False),
    "AS-pre": ("gain", True),
    "AS-sqrt-pre": ("sqrt", True),
    "AS-sqrt-tau": ("sqrt", False),
}
BASELINES = {"LSW": 1.0, "SqrtW": 0.5}  # method -> exponent of S in the lr multiplier
METHODS = [*ADASCALE_METHODS, *BASELINES]


class PreconditionedAdaScale(AdaScale):
    """AdaScale whose gain weighs each parameter's statistics by a scalar of Adam's second moment.

    Built with one parameter per group, so AdaScale's per-group averages are per-parameter ones.
    """

    def _weights(self) -> list[float]:
        weights = []
        for group in self.param_groups:
            (param,) = group["params"]
            state = self.optimizer.state.get(param, {})
            if "exp_avg_sq" not in state:
                weights.append(1.0)  # before Adam's first step: plain statistics
                continue
            v_hat = state["exp_avg_sq"].mean().item() / (1 - group["betas"][1] ** float(state["step"]))
            weights.append(1.0 / (math.sqrt(v_hat) + group["eps"]) ** 2)
        return weights

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain = self._estimator
        self._estimator = PreconditionedEstimator(self._weights, plain.num_groups, plain.min_relative_var)
        self._estimator.scale = plain.scale


class PreconditionedEstimator(estimators.Estimator):
    """The estimator with each group's averages weighed by ``weights()`` before they are summed."""

    def __init__(self, weights, num_groups: int, min_relative_var: float) -> None:
        super().__init__(num_groups, min_relative_var)
        self.weights = weights

    def averages(self, groups) -> tuple[float, float]:
        indices = [i for i in groups if self.avg_weights[i] > 0.0]
        weights = self.weights()
        var = sum(weights[i] * self.grad_var_avg[i] / self.avg_weights[i] for i in indices)
        sqr = sum(weights[i] * self.grad_sqr_avg[i] / self.avg_weights[i] for i in indices)
        return estimators.clamp_averages(var, sqr, self.min_relative_var)


class SqrtTauAdaScale(AdaScale):
    """The sqrt rule with progress counted at the lr's rate: ``tau += gain ** 0.5`` per update,
    and decoupled weight decay ``lr * weight_decay * gain ** 0.5`` to stay in step with it."""

    def step(self, closure=None):
        saved = [group["weight_decay"] for group in self.param_groups]
        updates = self._estimator.updates
        gain_before = self._estimator.gain
        try:
            # AdaScale.step multiplies weight_decay by gain / sqrt(gain); divide it out beforehand.
            # The gain of this update is only known inside step(), so the correction is exact
            # when the gain changed little since the last update (it is smoothed).
            for group in self.param_groups:
                group["weight_decay"] = group["weight_decay"] / math.sqrt(max(gain_before, 1.0))
            loss = super().step(closure)
        finally:
            for group, weight_decay in zip(self.param_groups, saved):
                group["weight_decay"] = weight_decay
        if self._estimator.updates > updates:
            self._estimator.tau += math.sqrt(self._estimator.gain) - self._estimator.gain
        return loss


def make_task(name: str, pretrain_steps: int, pretrain_lr: float) -> tuple[ByteLM, torch.nn.Module | None]:
    """The task and, for ``finetune``, the pretrained starting point."""
    if name == "scratch":
        return ByteLM(), None
    source = ByteLM()
    model = source.model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=pretrain_lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, base_schedule(pretrain_steps))
    gen = torch.Generator().manual_seed(99)
    for _ in range(pretrain_steps):
        accumulate(source, model, 1, BATCH, gen)
        opt.step()
        opt.zero_grad()
        sched.step()
    prose = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_bytes()
    target = ByteLM(prose)
    print(f"finetune: pretrained {pretrain_steps} steps on Python source; val loss on prose {target.evaluate(model)['val_loss']:.4f}", flush=True)
    return target, model


def run(task: ByteLM, start: torch.nn.Module | None, method: str, scale: int, lr: float, steps: int, seed: int) -> dict:
    """One training run; validation loss every T1/10 scale-invariant steps, the gain every update."""
    model = task.model(seed) if start is None else copy.deepcopy(start)
    gen = torch.Generator().manual_seed(10_000 + seed)
    if method in ADASCALE_METHODS:
        lr_scaling, preconditioned = ADASCALE_METHODS[method]
        params = [{"params": [p]} for p in model.parameters()] if preconditioned else model.parameters()
        base = torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        kind = PreconditionedAdaScale if preconditioned else SqrtTauAdaScale if method == "AS-sqrt-tau" else AdaScale
        opt = kind(base, lr_scaling=lr_scaling)
        sched = follow_tau(torch.optim.lr_scheduler.LambdaLR(opt, base_schedule(steps)), opt)
        planned = None
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        planned = math.ceil(steps / scale)
        multiplier = lsw_schedule(steps, planned, scale ** BASELINES[method])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    loop = train_loop(task, model, opt, sched, scale=scale, batch=BATCH, gen=gen, steps=steps, planned=planned, metric="val_loss")
    updates, losses, curve, gains, diverged = (loop[k] for k in ("updates", "losses", "curve", "gains", "diverged"))
    tail = losses[-max(1, len(losses) // 10) :]
    row = {
        "method": method,
        "scale": scale,
        "seed": seed,
        "lr": lr,
        "updates": updates,
        "micro_batches": updates * scale,
        "train_loss": None if diverged else sum(tail) / len(tail),
        "val_loss": None if diverged else task.evaluate(model)["val_loss"],
        "param_norm": torch.cat([p.detach().flatten() for p in model.parameters()]).norm().item(),
        "diverged": diverged,
        "seconds": loop["seconds"],
        "curve": curve,
    }
    if gains:
        every = max(1, len(gains) // 200)
        row.update(mean_gain=sum(g for _, g in gains) / len(gains), gain_curve=gains[::every])
    return row


def iterations_to(row: dict, target: float) -> float | None:
    """Updates a run took until its validation loss (measured every T1/10 scale-invariant steps)
    first reached ``target``; ``None`` if it never did."""
    reached = next((position for position, value in row["curve"] if value <= target), None)
    if reached is None:
        return None
    if "gain_curve" not in row:  # a baseline: position = updates * T1 / planned updates
        return reached * row["updates"] / row["T1"]
    every = max(1, (row["updates"]) // 200)  # gain_curve keeps every `every`-th update
    index = next(i for i, (position, _) in enumerate(row["gain_curve"]) if position >= reached - 1e-9)
    return index * every + 1


def table(path: Path) -> str:
    """Markdown per task: validation loss, iterations, and iterations until the run first matched
    the ``S = 1`` run's final validation loss, per method and scale (means over seeds; 'div' =
    diverged in some seed, '-' = never matched it in some seed), and the final parameter norms."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = []
    for name in [t for t in TASKS if any(r["task"] == t for r in rows)]:
        task_rows = [r for r in rows if r["task"] == name and not r["quick"]] or [r for r in rows if r["task"] == name]
        sweep_id = max(r["run_id"] for r in task_rows if r["method"] == "sweep")
        sweep = [r for r in task_rows if r["method"] == "sweep" and r["run_id"] == sweep_id]
        newest = {}  # the latest row of each (method, scale, seed): reruns of one method replace it
        for r in sorted(task_rows, key=lambda r: r["run_id"]):
            if r["method"] != "sweep":
                newest[(r["method"], r["scale"], r["seed"])] = r
        runs = list(newest.values())
        seeds = sorted({r["seed"] for r in runs})
        tuned = ", ".join(
            "{:g}: {}".format(r["lr"], "div" if r["val_loss"] is None else format(r["val_loss"], ".3f")) for r in sweep
        )
        lines += [
            f"**{name}** (T1 = {runs[0]['T1']}, base batch {BATCH} x {ByteLM.SEQ} bytes, AdamW lr {runs[0]['lr']:g} "
            f"from the sweep {tuned}; weight decay {WEIGHT_DECAY}; seeds {seeds}). "
            "Validation loss (iterations; iterations until the S = 1 run's final validation loss was first "
            "matched, '-' = never):",
            "",
            "| S | " + " | ".join(METHODS) + " |",
            "|---|" + "---|" * len(METHODS),
        ]
        base = [r["val_loss"] for r in runs if r["scale"] == 1 and r["method"] == "AS"]
        target = sum(base) / len(base)
        norms = []
        for scale in sorted({r["scale"] for r in runs}):
            cells = []
            for method in METHODS:
                picked = [r for r in runs if r["scale"] == scale and r["method"] == method]
                if not picked:
                    cells.append("")
                elif any(r["val_loss"] is None for r in picked):
                    cells.append("div")
                else:
                    mean = lambda values: sum(values) / len(values)  # noqa: E731
                    reach = [r["updates"] if scale == 1 else iterations_to(r, target) for r in picked]
                    reached = "-" if None in reach else f"{mean(reach):.0f}"
                    cells.append(f"{mean([r['val_loss'] for r in picked]):.3f} ({mean([r['updates'] for r in picked]):.0f}; {reached})")
                    norms.append(f"{method} S={scale}: {mean([r['param_norm'] for r in picked]):.1f}")
            lines.append(f"| {scale} | " + " | ".join(cells) + " |")
        lines += ["", "Final parameter norms (mean over seeds): " + "; ".join(norms)]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="scratch")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--pretrain_steps", type=int, default=600)
    p.add_argument("--pretrain_lr", type=float, default=3e-3)
    p.add_argument("--lr", type=float, help="skip the sweep: the base lr it chose (adds methods to a grid)")
    p.add_argument("--quick", action="store_true", help="T1 / 4, scales 1 and 16, one seed")
    p.add_argument("--output", default="benchmarks/results/adamw.jsonl")
    p.add_argument("--table", metavar="JSONL", help="only print the Markdown tables of a results file")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    torch.set_num_threads(1)
    steps = TASKS[args.task]["steps"] // (4 if args.quick else 1)
    scales, seeds = ([1, 16], [0]) if args.quick else (args.scales, args.seeds)
    task, start = make_task(args.task, args.pretrain_steps // (4 if args.quick else 1), args.pretrain_lr)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S")

    def record(row: dict) -> None:
        row.update(task=args.task, T1=steps, run_id=run_id, quick=args.quick)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = "diverged" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        print(
            f"{args.task} {row['method']:11s} S={row['scale']:<3d} seed {row['seed']} lr {row['lr']:<6g} val_loss {shown}  "
            f"updates {row['updates']:5d}  |w| {row['param_norm']:.1f}  {row['seconds']:.1f}s",
            flush=True,
        )

    lr = args.lr
    if lr is None:
        best = None
        for candidate in TASKS[args.task]["lrs"]:  # the base run's lr: a small sweep at S = 1, seed 0
            row = run(task, start, "AS", 1, candidate, steps, 0)
            row["method"] = "sweep"
            record(row)
            if row["val_loss"] is not None and (best is None or row["val_loss"] < best["val_loss"]):
                best = row
        lr = best["lr"]
        print(f"{args.task}: tuned AdamW lr {lr}", flush=True)
    for seed in seeds:
        for scale in scales:
            for method in (args.methods if scale > 1 else ["AS"] if args.lr is None else []):  # at S = 1 every method is the base run
                record(run(task, start, method, scale, lr, steps, seed))
    print(table(out))


if __name__ == "__main__":
    main()
