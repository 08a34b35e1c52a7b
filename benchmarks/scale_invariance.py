"""The paper's Table 2 protocol on CPU-sized tasks: does AdaScale keep model quality as S grows?

For each task, a base run at ``S = 1`` with a tuned schedule (a small learning-rate sweep picks
it) for ``T1`` steps; then for each scale ``S`` (simulated: ``S`` micro-batches of the base size
per update, in one process) and each seed:

* ``AS``   AdaScale: the base schedule read at ``floor(tau)``, ``lr x gain``, stop at ``tau >= T1``;
* ``LSW``  linear scaling with warm-up: ``lr x S``, the base schedule compressed to
  ``ceil(T1 / S)`` steps, linear warm-up over the first 5% of them;
* ``LSW+`` the LSW schedule stretched to the number of steps AdaScale took.

Tasks: ``digits`` (scikit-learn's 8x8 digits, an MLP, validation accuracy) and ``lm`` (a small
GPT-2-architecture model on the Python standard library's source, bytes as tokens, validation
loss). Every finished run is appended at once to ``--output`` (JSON lines), so a partial grid is a
result. ``--quick`` runs a reduced grid in a few minutes. ``--plot`` draws the PNG from the file.

    .venv/bin/python benchmarks/scale_invariance.py --task digits --quick
    .venv/bin/python benchmarks/scale_invariance.py --task lm --scales 1 2 4 8 16 32 64 --seeds 0 1
    .venv/bin/python benchmarks/scale_invariance.py --plot benchmarks/results/scale_invariance.jsonl
    .venv/bin/torchrun --nproc_per_node=2 benchmarks/scale_invariance.py --task digits --ranks --lr 0.1 --scales 2 4 8 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from adascale_shard import AdaScale, follow_tau

TASKS = {
    # base batch, T1, lr candidates, evaluation metric (higher is better?)
    "digits": {"batch": 16, "steps": 1500, "quick_steps": 400, "lrs": [0.01, 0.03, 0.1, 0.3], "metric": "val_accuracy", "higher": True},
    "lm": {"batch": 8, "steps": 800, "quick_steps": 200, "lrs": [0.03, 0.1, 0.3, 1.0], "metric": "val_loss", "higher": False},
}
MOMENTUM = 0.9


# ---------------------------------------------------------------------------------------------
# Tasks: data, model, loss, evaluation.
# ---------------------------------------------------------------------------------------------
class Digits:
    name = "digits"

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        self.train = (x[:1400], y[:1400])
        self.val = (x[1400:], y[1400:])

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def batch(self, size: int, gen: torch.Generator):
        idx = torch.randint(len(self.train[0]), (size,), generator=gen)
        return self.train[0][idx], self.train[1][idx]

    def loss(self, model, batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        logits = model(self.val[0])
        return {
            "val_accuracy": (logits.argmax(1) == self.val[1]).float().mean().item(),
            "val_loss": torch.nn.functional.cross_entropy(logits, self.val[1]).item(),
        }


class ByteLM:
    name = "lm"
    SEQ = 32

    def __init__(self, data: bytes | None = None) -> None:
        """``data``: the corpus (default: the first 1 MB of the standard library's top-level modules)."""
        if data is None:
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py")))[:1_000_000]
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = int(0.95 * len(tokens))
        self.train_tokens, val_tokens = tokens[:split], tokens[split:]
        gen = torch.Generator().manual_seed(1)
        start = torch.randint(len(val_tokens) - self.SEQ - 1, (128,), generator=gen)
        self.val = val_tokens[start[:, None] + torch.arange(self.SEQ + 1)]

    def model(self, seed: int) -> torch.nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=256, n_positions=self.SEQ, n_embd=64, n_layer=2, n_head=2)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return GPT2LMHeadModel(config)

    def batch(self, size: int, gen: torch.Generator):
        start = torch.randint(len(self.train_tokens) - self.SEQ - 1, (size,), generator=gen)
        return self.train_tokens[start[:, None] + torch.arange(self.SEQ)]

    def loss(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        ids = self.val[:, : self.SEQ]
        return {"val_loss": model(input_ids=ids, labels=ids).loss.item()}


def make_task(name: str):
    return Digits() if name == "digits" else ByteLM()


# ---------------------------------------------------------------------------------------------
# Schedules and the three methods.
# ---------------------------------------------------------------------------------------------
def base_schedule(steps: int):
    """The schedule tuned at S = 1: cosine decay over T1 steps (multiplier of the base lr)."""
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


def lsw_schedule(base_steps: int, steps: int, scale: float):
    """Linear scaling with warm-up: lr x S, the base schedule compressed to `steps` steps."""
    base = base_schedule(base_steps)
    warmup = max(1, math.ceil(0.05 * steps))

    def multiplier(t: int) -> float:
        ramp = min(1.0, (t + 1) / warmup)
        return scale * ramp * base(t * base_steps / steps)

    return multiplier


def accumulate(task, model, scale: int, batch: int, gen: torch.Generator) -> float:
    """Backward over `scale` micro-batches of the base size (one update); the mean loss.

    On several DDP ranks (``--ranks``), every rank draws all `scale` micro-batches, so the data
    stream is the one of the simulated run, and back-propagates its own contiguous share."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    world, rank = (dist.get_world_size(), dist.get_rank()) if ddp else (1, 0)
    share = scale // world
    batches = [task.batch(batch, gen) for _ in range(scale)][rank * share : (rank + 1) * share]
    total = 0.0
    for k, micro in enumerate(batches):
        with model.no_sync() if ddp and k < share - 1 else nullcontext():
            loss = task.loss(model, micro) / share
            loss.backward()
        total += loss.item()
    if ddp:  # the mean over all ranks, for the log
        t = torch.tensor([total])
        dist.all_reduce(t)
        total = t.item() / world
    return total


def train_loop(task, model, opt, sched, *, scale: int, batch: int, gen: torch.Generator, steps: int, planned: int | None, metric: str) -> dict:
    """Update until ``tau >= steps`` (AdaScale: ``planned`` is None) or for ``planned`` updates;
    the validation ``metric`` every ``steps / 10`` scale-invariant steps (AdaScale: ``tau``; else
    how far along the base schedule the run is), AdaScale's gain every update."""
    losses: list[float] = []
    curve: list[tuple[float, float]] = []
    gains: list[tuple[float, float]] = []
    updates, diverged, next_eval = 0, False, steps / 10
    started = time.perf_counter()
    while not (opt.budget_spent(steps) if planned is None else updates >= planned):
        total = accumulate(task, model, scale, batch, gen)
        opt.step()
        opt.zero_grad()
        sched.step()
        updates += 1
        losses.append(total)
        position = opt.tau if planned is None else updates * steps / planned
        if planned is None:
            gains.append((position, opt.gain()))
        if not math.isfinite(total):
            diverged = True
            break
        if position >= next_eval:
            curve.append((position, task.evaluate(getattr(model, "module", model))[metric]))
            next_eval += steps / 10
    return {"updates": updates, "losses": losses, "curve": curve, "gains": gains, "diverged": diverged, "seconds": time.perf_counter() - started}


def run(task, method: str, scale: int, lr: float, steps: int, seed: int, batch: int, stretch_to: int | None = None) -> dict:
    """One training run; the validation metric is also recorded every T1/10 scale-invariant steps
    (AS: tau; LSW/LSW+: how far along the base schedule the run is) and AS's gain every update."""
    model = task.model(seed)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(10_000 + seed)
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    spec = TASKS[task.name]
    if method == "AS":
        opt = AdaScale(base)  # S = N = scale micro-batches of the base size
        sched = follow_tau(torch.optim.lr_scheduler.LambdaLR(opt, base_schedule(steps)), opt)
        planned = None
    else:
        opt = base
        planned = stretch_to if method == "LSW+" else math.ceil(steps / scale)
        sched = torch.optim.lr_scheduler.LambdaLR(base, lsw_schedule(steps, planned, scale))
    loop = train_loop(task, model, opt, sched, scale=scale, batch=batch, gen=gen, steps=steps, planned=planned, metric=spec["metric"])
    updates, losses, curve, gains, diverged = (loop[k] for k in ("updates", "losses", "curve", "gains", "diverged"))
    metrics = task.evaluate(getattr(model, "module", model)) if not diverged else {}
    tail = losses[-max(1, len(losses) // 10) :]
    extra = {}
    if gains:
        every = max(1, len(gains) // 200)
        extra = {
            "mean_gain": sum(g for _, g in gains) / len(gains),
            "final_gain": gains[-1][1],
            "gain_curve": gains[::every],
        }
    return {
        "method": method,
        "scale": scale,
        "seed": seed,
        "lr": lr,
        "updates": updates,
        "micro_batches": updates * scale,
        "train_loss": sum(tail) / len(tail) if not diverged else None,
        "diverged": diverged,
        "seconds": loop["seconds"],
        "curve": curve,
        **metrics,
        **extra,
    }


def better(a: dict, b: dict | None, spec: dict) -> bool:
    if b is None:
        return True
    key = spec["metric"]
    if a.get(key) is None:
        return False
    if b.get(key) is None:
        return True
    return a[key] > b[key] if spec["higher"] else a[key] < b[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="digits")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--quick", action="store_true", help="scales 1 4 16, one seed, short T1")
    p.add_argument("--output", default="benchmarks/results/scale_invariance.jsonl")
    p.add_argument("--plot", metavar="JSONL", help="only draw the PNG from a results file")
    p.add_argument("--table", metavar="JSONL", help="only print the Table-2-style Markdown of a results file")
    p.add_argument("--ranks", action="store_true", help="under torchrun: AdaScale only, on DDP, at --lr")
    p.add_argument("--lr", type=float, help="with --ranks: the base lr the sweep chose")
    args = p.parse_args()
    if args.plot:
        print(plot(Path(args.plot)))
        return
    if args.table:
        print(table(Path(args.table)))
        return
    torch.set_num_threads(1)
    spec = TASKS[args.task]
    steps = spec["quick_steps"] if args.quick else spec["steps"]
    scales = [1, 4, 16] if args.quick else args.scales
    seeds = [0] if args.quick else args.seeds
    task = make_task(args.task)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S")

    def record(row: dict) -> None:
        row.update(task=args.task, T1=steps, batch=spec["batch"], run_id=run_id, quick=args.quick)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        metric = row.get(spec["metric"])
        shown = f"{metric:.4f}" if metric is not None else "diverged"
        print(
            f"{args.task} {row['method']:5s} S={row['scale']:<3d} seed {row['seed']} lr {row['lr']:<5g} "
            f"{spec['metric']} {shown}  updates {row['updates']:5d}  {row['seconds']:.1f}s",
            flush=True,
        )

    if args.ranks:  # a few points on real DDP ranks, to compare with the simulated ones
        dist.init_process_group("gloo")
        for seed in seeds:
            for scale in scales:
                if scale % dist.get_world_size():
                    continue
                row = run(task, "AS", scale, args.lr, steps, seed, spec["batch"])
                row["ranks"] = dist.get_world_size()
                if dist.get_rank() == 0:
                    record(row)
        dist.destroy_process_group()
        return
    # The base run's learning rate: a small sweep at S = 1, seed 0.
    best = None
    for lr in spec["lrs"]:
        row = run(task, "AS", 1, lr, steps, 0, spec["batch"])
        row["method"] = "sweep"
        record(row)
        if better(row, best, spec):
            best = row
    lr = best["lr"]
    print(f"{args.task}: tuned base lr {lr}", flush=True)
    for seed in seeds:
        for scale in scales:
            adascale = run(task, "AS", scale, lr, steps, seed, spec["batch"])
            record(adascale)
            if scale == 1:
                continue
            record(run(task, "LSW", scale, lr, steps, seed, spec["batch"]))
            record(run(task, "LSW+", scale, lr, steps, seed, spec["batch"], stretch_to=adascale["updates"]))
    print(plot(out))


def load(path: Path) -> list[dict]:
    """The latest full (non-quick) grid per task, or the latest quick one when there is none."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = []
    for name in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == name and not r.get("ranks")]
        full = [r for r in task_rows if not r["quick"]]
        chosen += full or task_rows
    return chosen


def table(path: Path) -> str:
    """Markdown in the form of the paper's Table 2: metric, training loss, iterations (seed means)."""
    rows = load(path)
    lines = []
    for name in sorted({r["task"] for r in rows}):
        spec = TASKS[name]
        key = spec["metric"]
        runs = [r for r in rows if r["task"] == name and r["method"] != "sweep"]
        t1 = runs[0]["T1"]
        lines += [
            f"**{name}** (T1 = {t1}, base batch {runs[0]['batch']}; {key}, mean over seeds; 'div' = diverged in some seed)",
            "",
            f"| S | total batch | {key} AS | LSW | LSW+ | train loss AS | LSW | LSW+ | iterations AS | LSW | LSW+ |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for scale in sorted({r["scale"] for r in runs}):

            def cell(method: str, field: str, fmt: str, runs: list = runs, scale: int = scale) -> str:
                picked = [r for r in runs if r["scale"] == scale and (r["method"] == method or (scale == 1 and method == "AS"))]
                if not picked or (scale == 1 and method != "AS"):
                    return ""
                values = [r.get(field) for r in picked]
                if any(v is None for v in values):
                    return "div"
                return format(sum(values) / len(values), fmt)

            lines.append(
                f"| {scale} | {scale * runs[0]['batch']} | {cell('AS', key, '.4f')} | {cell('LSW', key, '.4f')} | "
                f"{cell('LSW+', key, '.4f')} | {cell('AS', 'train_loss', '.3f')} | {cell('LSW', 'train_loss', '.3f')} | "
                f"{cell('LSW+', 'train_loss', '.3f')} | {cell('AS', 'updates', '.0f')} | {cell('LSW', 'updates', '.0f')} | "
                f"{cell('LSW+', 'updates', '.0f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    rows = load(path)
    tasks = sorted({r["task"] for r in rows if r["method"] != "sweep"})
    fig, axes = plt.subplots(len(tasks), 3, figsize=(17, 4.6 * len(tasks)), squeeze=False)
    for (ax_final, ax_curve, ax_gain), name in zip(axes, tasks):
        spec = TASKS[name]
        key = spec["metric"]
        runs = [r for r in rows if r["task"] == name and r["method"] != "sweep"]
        for method, style in (("AS", "o-"), ("LSW", "s--"), ("LSW+", "^:")):
            points = {}
            for r in runs:
                if r["method"] == method or (r["method"] == "AS" and r["scale"] == 1):
                    value = r.get(key)
                    points.setdefault(r["scale"], []).append(value if value is not None else math.nan)
            xs = sorted(points)
            ax_final.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], style, label=method)
        ax_final.set_xscale("log", base=2)
        ax_final.set(xlabel="scale S", ylabel=f"final {key}", title=f"{name}: final {key} (diverged runs not drawn)")
        ax_final.legend()
        seed0 = [r for r in runs if r["method"] == "AS" and r["seed"] == 0]
        for r in sorted(seed0, key=lambda r: r["scale"]):
            if r.get("curve"):
                ax_curve.plot(*zip(*r["curve"]), ".-", label=f"S={r['scale']}")
            if r.get("gain_curve"):
                ax_gain.plot(*zip(*r["gain_curve"]), label=f"S={r['scale']}")
        ax_curve.set(xlabel="scale-invariant steps tau", ylabel=key, title=f"{name}: AdaScale, {key} during training (seed 0)")
        ax_gain.set(xlabel="scale-invariant steps tau", ylabel="gain r", title=f"{name}: AdaScale gain (seed 0)")
        ax_gain.set_yscale("log", base=2)
        for ax in (ax_final, ax_curve, ax_gain):
            ax.grid(alpha=0.3)
        ax_curve.legend(fontsize=8)
        ax_gain.legend(fontsize=8)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return f"plot: {png}"


if __name__ == "__main__":
    main()
