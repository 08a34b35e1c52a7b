"""Batch-size advisor: how far raising the batch still pays, from a finished run's AdaScale logs.

    python -m adascale_shard.advisor RUN [--base_batch_size B0] [--png PATH]
    adascale-advisor RUN ...

``RUN`` is a Hugging Face Trainer output directory (``trainer_state.json`` in it or in its latest
``checkpoint-*``; log records with ``adascale/var, sqr, tau``, added by
:class:`~adascale_shard.integrations.hf.AdaScaleCallback`), a ``trainer_state.json``, or a JSON-lines
file of ``AdaScale.stats()`` records with ``tau`` (``recipes/train_ddp.py``'s ``metrics.jsonl``, or a
directory holding one).

From the smoothed statistics along training it takes the gradient noise scale ``r = var / sqr``
(base batches; ``B_noise = B0 * r`` samples, McCandlish et al. 2018) and predicts, for each phase
of training and each scale ``S``, the efficiency: the fraction of the linear speed-up ``S`` that
AdaScale turns into progress, ``(tau_end - tau_start) / (S * updates)`` with
``updates = integral dtau / gain_S(r(tau))`` (:func:`adascale_shard.estimators.predicted_updates`).
It prints a table and a recommendation and writes a PNG (heat map of efficiency against ``tau``
and ``S``, and efficiency against ``S`` per phase; needs matplotlib).

How close the prediction is, measured on the scale-invariance benchmark:
``benchmarks/advisor_validation.py`` (results in ``benchmarks/results/advisor_validation.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import estimators as est

__all__ = ["AdvisorError", "Phase", "Advice", "load_run", "advise", "format_report", "plot_advice", "main"]

DEFAULT_SCALES = (2, 4, 8, 16, 32, 64, 128, 256)
GOOD, HALF = 0.8, 0.5  # efficiency thresholds named in the recommendation


class AdvisorError(ValueError):
    """The run's logs cannot be read or hold no AdaScale statistics."""


@dataclass
class Phase:
    start: float
    end: float
    noise_scale: float  # median r = var / sqr of the records in the phase (base batches)
    efficiency: dict[float, float]  # scale -> predicted efficiency over the phase
    scale_at_good: float  # the scale whose efficiency over the phase is GOOD
    scale_at_half: float  # ... and HALF (the critical batch, in base batches)


@dataclass
class Advice:
    source: Path
    points: list[tuple[float, float]]  # (tau, noise scale r)
    run_scale: float | None  # S the run was logged at
    run_gain: float | None  # its mean logged gain
    base_batch_size: float | None
    scales: list[float]
    phases: list[Phase]
    whole: Phase
    notes: list[str] = field(default_factory=list)


# -- reading the logs -------------------------------------------------------------------------
def _records_from_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise AdvisorError(f"{path}:{number}: not JSON ({err.msg})") from err
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdvisorError(f"{path}: not JSON ({err.msg})") from err
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        return data["log_history"]
    if isinstance(data, list):
        return data
    raise AdvisorError(f"{path}: neither a Trainer state (no 'log_history') nor a list of log records")


def _checkpoint_number(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def _candidates(run: Path) -> list[Path]:
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise AdvisorError(f"{run}: no such file or directory")
    found = []
    if (run / "trainer_state.json").is_file():
        found.append(run / "trainer_state.json")
    checkpoints = sorted(
        (p for p in run.glob("checkpoint-*") if (p / "trainer_state.json").is_file()), key=_checkpoint_number
    )
    if checkpoints:
        found.append(checkpoints[-1] / "trainer_state.json")
    if (run / "metrics.jsonl").is_file():
        found.append(run / "metrics.jsonl")
    if not found:
        raise AdvisorError(
            f"{run}: found no logs: looked for trainer_state.json (in the directory or its latest "
            "checkpoint-*) and metrics.jsonl. Pass the file itself if it is named differently"
        )
    return found


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    prefixed = {k[len("adascale/") :]: v for k, v in record.items() if k.startswith("adascale/")}
    return prefixed or record


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _points(records: list[dict[str, Any]]) -> tuple[list[tuple[float, float]], list[float], list[float], int]:
    """(tau, r) pairs, logged scales, logged gains, and how many came from inverting the gain."""
    points, scales, gains, inverted = [], [], [], 0
    for raw in records:
        rec = _normalise(raw)
        tau, var, sqr = _number(rec.get("tau")), _number(rec.get("var")), _number(rec.get("sqr"))
        scale, g = _number(rec.get("S")), _number(rec.get("gain"))
        if tau is None:
            continue
        if var is not None and sqr is not None:
            r = est.noise_scale(var, sqr)
        elif g is not None and scale is not None and scale > 1:
            r = est.noise_scale_from_gain(g, scale)  # logs without var/sqr: invert the gain
            inverted += 1
        else:
            continue
        if math.isnan(r):
            continue
        points.append((tau, r))
        if scale is not None:
            scales.append(scale)
        if g is not None:
            gains.append(g)
    points.sort()
    return points, scales, gains, inverted


def load_run(run: str | Path) -> tuple[Path, list[tuple[float, float]], list[float], list[float], int]:
    """The log file chosen for ``run`` and its ``(tau, noise scale)`` points (see :func:`_points`).

    Of several candidate files (a directory's ``trainer_state.json``, its latest checkpoint's, a
    ``metrics.jsonl``) the one with the most AdaScale records wins."""
    best = None
    looked = []
    for path in _candidates(Path(run)):
        records = _records_from_file(path)
        points, scales, gains, inverted = _points(records)
        looked.append((path, len(records), records))
        if points and (best is None or len(points) > len(best[1])):
            best = (path, points, scales, gains, inverted)
    if best is None:
        details = []
        for path, count, records in looked:
            keys = sorted({k for r in records for k in r})
            shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
            details.append(f"  {path}: {count} records, keys: {shown or 'none'}")
        raise AdvisorError(
            "no AdaScale statistics in the logs (records need tau with var and sqr, as "
            "'adascale/tau', 'adascale/var', 'adascale/sqr' in a Trainer's log_history or 'tau', "
            "'var', 'sqr' from AdaScale.stats()):\n"
            + "\n".join(details)
            + "\nTrain with enable_adascale(trainer, ...) (its callback logs them) or write opt.stats() per update"
        )
    return best


def _run_scale_from_summary(run: Path) -> float | None:
    folder = run if run.is_dir() else run.parent
    for candidate in (folder / "adascale_summary.json", folder / "summary.json", folder.parent / "adascale_summary.json"):
        try:
            value = json.loads(candidate.read_text()).get("S")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)):
            return float(value)
    return None


# -- the prediction ---------------------------------------------------------------------------
def _phase_efficiency(points: list[tuple[float, float]], scale: float, start: float, end: float) -> float:
    if end <= start:
        return est.gain_at(points[-1][1], scale) / scale
    return (end - start) / (scale * est.predicted_updates(points, scale, start, end))


def _scale_at(points: list[tuple[float, float]], start: float, end: float, target: float) -> float:
    """The scale whose efficiency over [start, end] is ``target`` (bisection in log S; efficiency
    decreases in S). ``inf`` when even S = 1e6 keeps it."""
    lo, hi = 0.0, math.log(1e6)
    if _phase_efficiency(points, 1e6, start, end) >= target:
        return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _phase_efficiency(points, math.exp(mid), start, end) >= target:
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _phase(points: list[tuple[float, float]], scales: list[float], start: float, end: float) -> Phase:
    inside = [r for t, r in points if start <= t <= end] or [min(points, key=lambda p: abs(p[0] - end))[1]]
    return Phase(
        start=start,
        end=end,
        noise_scale=_median(inside),
        efficiency={s: _phase_efficiency(points, s, start, end) for s in scales},
        scale_at_good=_scale_at(points, start, end, GOOD),
        scale_at_half=_scale_at(points, start, end, HALF),
    )


def advise(
    run: str | Path,
    base_batch_size: float | None = None,
    scales: tuple[float, ...] | list[float] = DEFAULT_SCALES,
    phases: int = 4,
) -> Advice:
    """Read ``run``'s logs and predict the efficiency per phase of training and scale."""
    if phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}")
    source, points, logged_scales, gains, inverted = load_run(run)
    end = points[-1][0]
    edges = [end * i / phases for i in range(phases + 1)]
    scales = sorted(float(s) for s in scales)
    notes = []
    if inverted:
        notes.append(f"{inverted} record(s) had no var/sqr: their noise scale was recovered from gain and S")
    if len(points) < 2 * phases:
        notes.append(f"only {len(points)} record(s) with statistics: the phases are coarse (log more often)")
    run_scale = logged_scales[-1] if logged_scales else _run_scale_from_summary(Path(run))
    return Advice(
        source=source,
        points=points,
        run_scale=run_scale,
        run_gain=sum(gains) / len(gains) if gains else None,
        base_batch_size=base_batch_size,
        scales=scales,
        phases=[_phase(points, scales, a, b) for a, b in zip(edges, edges[1:])],
        whole=_phase(points, scales, 0.0, end),
        notes=notes,
    )


# -- the report -------------------------------------------------------------------------------
def _fmt_scale(value: float) -> str:
    if math.isinf(value):
        return "> 1e6"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _fmt_noise(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _sentence(phase: Phase, scales: list[float], b0: float | None) -> str:
    good = [s for s in scales if phase.efficiency[s] >= GOOD]
    poor = [s for s in scales if phase.efficiency[s] < HALF]
    picks = [good[-1] if good else scales[0]]  # the largest scale that still pays well
    if poor:
        picks.append(poor[0])  # the first that wastes more than half of the extra batch
    else:
        picks.append(scales[-1])
    said = "; ".join(f"S={s:g} gives {phase.efficiency[s]:.2f} of linear speed-up" for s in sorted(set(picks)))
    critical = f"efficiency 0.5 at S~{_fmt_scale(phase.scale_at_half)}"
    if b0 and not math.isinf(phase.scale_at_half):
        critical += f", a global batch of ~{phase.scale_at_half * b0:.0f} samples"
    return f"{said}; {critical}"


def format_report(advice: Advice) -> str:
    """The table and the recommendation, as printed by the command."""
    b0 = advice.base_batch_size
    lines = [f"AdaScale batch-size advisor: {advice.source}"]
    taus = [t for t, _ in advice.points]
    run = f"{len(advice.points)} records with statistics, tau {taus[0]:.0f} to {taus[-1]:.0f}"
    if advice.run_scale is not None:
        run += f", logged at S={advice.run_scale:g}"
        if advice.run_gain is not None:
            run += f" (mean gain {advice.run_gain:.2f}, efficiency {advice.run_gain / advice.run_scale:.2f})"
    lines.append(run)
    if b0:
        lines.append(f"base batch B0 = {b0:g} samples")
    else:
        lines.append("base batch not given (--base_batch_size): the noise scale is in base batches only")
    lines.append("")
    noise_head = "noise scale r (base batches)" + (" | B_noise (samples)" if b0 else "")
    head = f"| phase (tau) | {noise_head} | " + " | ".join(f"S={s:g}" for s in advice.scales) + " | S at 0.8 | S at 0.5 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, phase in [(f"{p.start:.0f}-{p.end:.0f}", p) for p in advice.phases] + [("whole run", advice.whole)]:
        noise = _fmt_noise(phase.noise_scale) + (f" | {_fmt_noise(b0 * phase.noise_scale)}" if b0 else "")
        cells = " | ".join(f"{phase.efficiency[s]:.2f}" for s in advice.scales)
        lines.append(
            f"| {label} | {noise} | {cells} | {_fmt_scale(phase.scale_at_good)} | {_fmt_scale(phase.scale_at_half)} |"
        )
    lines += [
        "",
        "Efficiency = predicted fraction of the linear speed-up S (scale-invariant steps per update / S),",
        "integrated over the phase; 'S at 0.5' is the critical batch in base batches (McCandlish et al. 2018).",
        "",
        "Recommendation:",
    ]
    last = advice.phases[-1]
    lines.append(f"- at this phase of training (tau {last.start:.0f}-{last.end:.0f}), " + _sentence(last, advice.scales, b0))
    if len(advice.phases) > 1:
        first = advice.phases[0]
        lines.append(f"- early (tau {first.start:.0f}-{first.end:.0f}), " + _sentence(first, advice.scales, b0))
    lines.append("- over the whole run, " + _sentence(advice.whole, advice.scales, b0))
    for note in advice.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot_advice(advice: Advice, path: str | Path) -> Path | None:
    """Heat map of efficiency against tau and S, and efficiency against S per phase. Returns the
    PNG's path, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    taus = [t for t, _ in advice.points]
    grid = [2 ** (k / 8) for k in range(0, 8 * 8 + 1)]  # S from 1 to 256
    heat = [[est.gain_at(r, s) / s for _, r in advice.points] for s in grid]
    fig, (ax_heat, ax_lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    if len(taus) > 1:
        mesh = ax_heat.pcolormesh(taus, grid, heat, shading="nearest", vmin=0.0, vmax=1.0, cmap="viridis")
        contours = ax_heat.contour(taus, grid, heat, levels=[HALF, GOOD], colors=["white", "black"], linewidths=1)
        ax_heat.clabel(contours, fmt="%.1f", fontsize=8)
        fig.colorbar(mesh, ax=ax_heat, label="efficiency gain/S")
    ax_heat.set_yscale("log", base=2)
    ax_heat.set(xlabel="scale-invariant steps tau", ylabel="scale S", title="predicted efficiency over training")
    for phase in advice.phases + [advice.whole]:
        label = "whole run" if phase is advice.whole else f"tau {phase.start:.0f}-{phase.end:.0f}"
        style = "k--" if phase is advice.whole else "o-"
        ax_lines.plot(advice.scales, [phase.efficiency[s] for s in advice.scales], style, label=label)
    for level in (GOOD, HALF):
        ax_lines.axhline(level, color="grey", lw=0.8, ls=":")
    ax_lines.set_xscale("log", base=2)
    ax_lines.set(xlabel="scale S", ylabel="efficiency (fraction of linear speed-up)", ylim=(0, 1.05), title="by phase")
    ax_lines.grid(alpha=0.3)
    ax_lines.legend(fontsize=8)
    fig.suptitle(f"AdaScale batch-size advisor: {advice.source}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="adascale-advisor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="Trainer output dir, trainer_state.json, or metrics.jsonl (or its dir)")
    p.add_argument("--base_batch_size", "--base-batch-size", type=float, help="samples per base batch (B0)")
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    p.add_argument("--phases", type=int, default=4, help="equal slices of tau to report (default 4)")
    p.add_argument("--png", help="where to write the PNG (default: adascale_advisor.png next to the logs)")
    p.add_argument("--no_png", "--no-png", action="store_true")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.scales):
        p.error("scales must be >= 1")
    try:
        advice = advise(args.run, args.base_batch_size, args.scales, args.phases)
    except (AdvisorError, ValueError) as err:
        print(f"adascale-advisor: {err}", file=sys.stderr)
        return 2
    print(format_report(advice))
    if not args.no_png:
        run = Path(args.run)
        png = Path(args.png) if args.png else (run if run.is_dir() else run.parent) / "adascale_advisor.png"
        written = plot_advice(advice, png)
        print(f"plot: {written}" if written else "matplotlib not installed: no PNG (pip install 'adascale-shard[plots]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
