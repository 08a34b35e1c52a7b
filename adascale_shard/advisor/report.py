"""The advisor's report: reading a run's logs, the per-phase prediction, the table and the PNG.

:func:`load_run` reads a Trainer output directory, a ``trainer_state.json`` or a JSON-lines file of
``AdaScale.stats()`` records into a :class:`~adascale_shard.advisor.model.RunLog`; :func:`advise`
asks the :class:`~adascale_shard.advisor.model.Model` for the efficiency per phase of training and
scale; :func:`format_report` and :func:`plot_advice` write what the command prints and draws.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._docs import see
from ..estimators import noise_scale
from .model import Model, RunLog, noise_scale_from_gain

__all__ = [
    "AdvisorError",
    "Phase",
    "Advice",
    "DEFAULT_SCALES",
    "load_run",
    "advise",
    "format_report",
    "plot_advice",
]

DEFAULT_SCALES = (2, 4, 8, 16, 32, 64, 128, 256)
GOOD, HALF = 0.8, 0.5  # efficiency thresholds named in the recommendation
GRID = tuple(2 ** (k / 2) for k in range(0, 21))  # scales 1 .. 1024, for "S at 0.8 / 0.5" and the heat map


class AdvisorError(ValueError):
    """The run's logs cannot be read or hold no AdaScale statistics."""


@dataclass
class Phase:
    start: float
    end: float
    noise_scale: float  # r = var / sqr over the phase (base batches)
    efficiency: dict[float, float]  # scale -> predicted efficiency over the phase
    scale_at_good: float  # the scale whose efficiency over the phase is GOOD
    scale_at_half: float  # ... and HALF (the critical batch, in base batches)


@dataclass
class Advice:
    source: Path
    model: Model
    run_scale: float | None  # S the run was logged at
    run_gain: float | None  # its mean logged gain
    base_batch_size: float | None
    scales: list[float]
    phases: list[Phase]
    whole: Phase
    notes: list[str] = field(default_factory=list)

    @property
    def points(self) -> list[tuple[float, float]]:
        return self.model.points


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
                    raise AdvisorError(f"{path}:{number}: not JSON ({err.msg})" + see("advisor-not-json")) from err
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdvisorError(f"{path}: not JSON ({err.msg})" + see("advisor-not-json")) from err
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        return data["log_history"]
    if isinstance(data, list):
        return data
    raise AdvisorError(
        f"{path}: neither a Trainer state (no 'log_history') nor a list of log records"
        + see("advisor-neither-a-trainer-state-nor-log-records")
    )


def _checkpoint_number(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def _candidates(run: Path) -> list[Path]:
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise AdvisorError(f"{run}: no such file or directory" + see("advisor-no-such-file"))
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
            + see("advisor-found-no-logs")
        )
    return found


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    prefixed = {k[len("adascale/") :]: v for k, v in record.items() if k.startswith("adascale/")}
    return prefixed or record


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _points(records: list[dict[str, Any]], run_scale: float | None = None) -> tuple:
    """(tau, r) pairs, (tau, updates, var, sqr, S) tuples for :class:`Model`, logged scales, logged
    gains, and how many r came from inverting the gain."""
    points, averaged, scales, gains, inverted = [], [], [], [], 0
    for raw in records:
        rec = _normalise(raw)
        tau, var, sqr = _number(rec.get("tau")), _number(rec.get("var")), _number(rec.get("sqr"))
        scale, g, updates = _number(rec.get("S")), _number(rec.get("gain")), _number(rec.get("updates"))
        if tau is None:
            continue
        if var is not None and sqr is not None:
            r = noise_scale(var, sqr)
            known_scale = scale if scale is not None else run_scale
            if updates is not None and known_scale is not None:
                averaged.append((tau, updates, var, sqr, known_scale))
        elif g is not None and scale is not None and scale > 1:
            r = noise_scale_from_gain(g, scale)  # logs without var/sqr: invert the gain
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
    averaged.sort(key=lambda a: (a[1], a[0]))
    return points, averaged, scales, gains, inverted


def load_run(run: str | Path, run_scale: float | None = None) -> RunLog:
    """The log file chosen for ``run`` and what the advisor takes from it (:class:`RunLog`).

    Of several candidate files (a directory's ``trainer_state.json``, its latest checkpoint's, a
    ``metrics.jsonl``) the one with the most AdaScale records wins. ``run_scale`` stands in for
    records that do not log ``S`` (older Trainer logs)."""
    best = None
    looked = []
    for path in _candidates(Path(run)):
        records = _records_from_file(path)
        found = _points(records, run_scale)
        looked.append((path, len(records), records))
        if found[0] and (best is None or len(found[0]) > len(best.points)):
            best = RunLog(path, *found)
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
            + see("advisor-no-adascale-statistics")
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


# -- the advice per phase ---------------------------------------------------------------------
def _crossing(efficiencies: list[float], target: float) -> float:
    """The scale of GRID where the efficiency falls to ``target`` (log-linear between grid points)."""
    for k in range(1, len(GRID)):
        hi, lo = efficiencies[k - 1], efficiencies[k]
        if lo < target <= hi:
            w = (hi - target) / (hi - lo)
            return math.exp(math.log(GRID[k - 1]) + w * (math.log(GRID[k]) - math.log(GRID[k - 1])))
    return 1.0 if efficiencies[0] < target else math.inf


def _phase(model: Model, scales: list[float], start: float, end: float) -> Phase:
    on_grid = [model.efficiency(s, start, end) for s in GRID]
    return Phase(
        start=start,
        end=end,
        noise_scale=model.noise_scale(start, end),
        efficiency={s: model.efficiency(s, start, end) for s in scales},
        scale_at_good=_crossing(on_grid, GOOD),
        scale_at_half=_crossing(on_grid, HALF),
    )


def advise(
    run: str | Path,
    base_batch_size: float | None = None,
    scales: tuple[float, ...] | list[float] = DEFAULT_SCALES,
    phases: int = 4,
    smoothing: float | None = None,
) -> Advice:
    """Read ``run``'s logs and predict the efficiency per phase of training and scale.

    ``smoothing`` is the per-update weight of the old average if the run set
    ``AdaScale(..., smoothing=...)`` (default: ``0.999 ** S``, AdaScale's default)."""
    if phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}" + see("advisor-bad-argument"))
    if smoothing is not None and not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}" + see("advisor-bad-argument"))
    summary_scale = _run_scale_from_summary(Path(run))
    log = load_run(run, summary_scale)
    model = Model(log, smoothing)
    end = model.end
    edges = [end * i / phases for i in range(phases + 1)]
    scales = sorted(float(s) for s in scales)
    notes = []
    if log.inverted:
        notes.append(f"{log.inverted} record(s) had no var/sqr: their noise scale was recovered from gain and S")
    if model.kind == "instantaneous":
        notes.append(
            "the logs lack 'updates' or 'S': the prediction uses the logged (averaged) noise scale, which trails "
            "the current one and underestimates the speed-up at scales far above the logged one"
        )
    if len(log.points) < 2 * phases:
        notes.append(f"only {len(log.points)} record(s) with statistics: the phases are coarse (log more often)")
    return Advice(
        source=log.source,
        model=model,
        run_scale=log.scales[-1] if log.scales else summary_scale,
        run_gain=sum(log.gains) / len(log.gains) if log.gains else None,
        base_batch_size=base_batch_size,
        scales=scales,
        phases=[_phase(model, scales, a, b) for a, b in zip(edges, edges[1:])],
        whole=_phase(model, scales, 0.0, end),
        notes=notes,
    )


# -- the report -------------------------------------------------------------------------------
def _fmt_scale(value: float) -> str:
    if math.isinf(value):
        return f"> {GRID[-1]:.0f}"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _fmt_noise(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _sentence(phase: Phase, scales: list[float], b0: float | None) -> str:
    good = [s for s in scales if phase.efficiency[s] >= GOOD]
    poor = [s for s in scales if phase.efficiency[s] < HALF]
    picks = [good[-1] if good else scales[0]]  # the largest scale that still pays well
    picks.append(poor[0] if poor else scales[-1])  # the first that wastes more than half of the extra batch
    said = "; ".join(f"S={s:g} gives {phase.efficiency[s]:.2f} of linear speed-up" for s in sorted(set(picks)))
    critical = f"efficiency 0.5 at S~{_fmt_scale(phase.scale_at_half)}"
    if b0 and not math.isinf(phase.scale_at_half):
        critical += f", a global batch of ~{phase.scale_at_half * b0:.0f} samples"
    return f"{said}; {critical}"


def format_report(advice: Advice) -> str:
    """The table and the recommendation, as printed by the command."""
    b0 = advice.base_batch_size
    model = advice.model
    lines = [f"AdaScale batch-size advisor: {advice.source}"]
    taus = [t for t, _ in advice.points]
    run = f"{len(advice.points)} records with statistics, tau {taus[0]:.0f} to {taus[-1]:.0f}"
    if advice.run_scale is not None:
        run += f", logged at S={advice.run_scale:g}"
        if advice.run_gain is not None:
            run += f" (mean gain {advice.run_gain:.2f}, efficiency {advice.run_gain / advice.run_scale:.2f})"
    lines.append(run)
    if model.kind == "averaging":
        lines.append(
            f"model: the logged averages undone between {len(model.intervals)} records, AdaScale replayed at each scale"
        )
    else:
        lines.append("model: the logged (averaged) noise scale, integral dtau / gain_S")
    if b0:
        lines.append(f"base batch B0 = {b0:g} samples")
    else:
        lines.append("base batch not given (--base_batch_size): the noise scale is in base batches only")
    lines.append("")
    noise_head = "noise scale r (base batches)" + (" | B_noise (samples)" if b0 else "")
    head = (
        f"| phase (tau) | {noise_head} | "
        + " | ".join(f"S={s:g}" for s in advice.scales)
        + " | S at 0.8 | S at 0.5 | r + 2 (bound) |"
    )
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, phase in [(f"{p.start:.0f}-{p.end:.0f}", p) for p in advice.phases] + [("whole run", advice.whole)]:
        whole = phase is advice.whole
        noise = "-" if whole else _fmt_noise(phase.noise_scale)
        if b0:
            noise += " | " + ("-" if whole else _fmt_noise(b0 * phase.noise_scale))
        bound = "-" if whole else _fmt_noise(phase.noise_scale + 2)
        cells = " | ".join(f"{phase.efficiency[s]:.2f}" for s in advice.scales)
        lines.append(
            f"| {label} | {noise} | {cells} | {_fmt_scale(phase.scale_at_good)} | {_fmt_scale(phase.scale_at_half)} | {bound} |"
        )
    lines += [
        "",
        "S=...: predicted efficiency, the fraction of the linear speed-up S that AdaScale delivers over the phase",
        "(scale-invariant steps per update / S) when trained at S; 'S at 0.8 / 0.5': the scales where it falls to",
        "0.8 and 0.5. r: the phase's gradient noise scale (B_noise = B0 x r samples, McCandlish et al. 2018);",
        "r + 2: where an estimator without lag, efficiency (r + 1) / (r + S), would fall to 0.5; AdaScale's",
        "averages span ~1000 base batches of data and trail a growing r, so it delivers less, the more so at small S.",
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


def _heat(model: Model, bins: int = 40) -> tuple[list[float], list[list[float]]]:
    """Efficiency per tau bin (rows: GRID scales) and the bins' centres."""
    edges = [model.end * i / bins for i in range(bins + 1)]
    centres = [0.5 * (a + b) for a, b in zip(edges, edges[1:])]
    return centres, [[model.efficiency(s, a, b) for a, b in zip(edges, edges[1:])] for s in GRID]


def plot_advice(advice: Advice, path: str | Path) -> Path | None:
    """Heat map of efficiency against tau and S, and efficiency against S per phase. Returns the
    PNG's path, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    centres, heat = _heat(advice.model)
    fig, (ax_heat, ax_lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    mesh = ax_heat.pcolormesh(centres, GRID, heat, shading="nearest", vmin=0.0, vmax=1.0, cmap="viridis")
    contours = ax_heat.contour(centres, GRID, heat, levels=[HALF, GOOD], colors=["white", "black"], linewidths=1)
    ax_heat.clabel(contours, fmt="%.1f", fontsize=8)
    fig.colorbar(mesh, ax=ax_heat, label="efficiency (fraction of linear speed-up)")
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
    fig.suptitle(f"AdaScale batch-size advisor: {advice.source} ({advice.model.kind} model)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
