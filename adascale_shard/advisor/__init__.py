"""Batch-size advisor: how far raising the batch still pays, from a finished run's AdaScale logs.

    python -m adascale_shard.advisor RUN [--base_batch_size B0] [--png PATH]
    adascale-advisor RUN ...

``RUN`` is a Hugging Face Trainer output directory (``trainer_state.json`` in it or in its latest
``checkpoint-*``; log records with ``adascale/tau, var, sqr, updates, S``, added by
:class:`~adascale_shard.integrations.hf.AdaScaleCallback`), a ``trainer_state.json``, or a JSON-lines
file of ``AdaScale.stats()`` records (``recipes/train_ddp.py``'s ``metrics.jsonl``, or a directory
holding one).

It predicts, for each phase of training and each scale ``S``, the *efficiency*: the fraction of the
linear speed-up ``S`` that AdaScale would turn into progress, ``delta tau / (S * updates)``, and the
gradient noise scale ``r = var / sqr`` (base batches; ``B_noise = B0 * r`` samples, McCandlish et
al. 2018). The logged ``var`` and ``sqr`` are exponential averages over about 1000 base batches of
data, i.e. over most of a small-S run, so the model first undoes that averaging between log records
(:func:`adascale_shard.advisor.model.interval_statistics`) and then replays AdaScale at each scale,
with that scale's own averaging (:func:`adascale_shard.advisor.model.simulate_taus`). Logs without
``updates`` or ``S`` fall back to ``updates = integral dtau / gain_S(r(tau))`` on the logged,
averaged ``r`` (:func:`adascale_shard.advisor.model.predicted_updates`), which underestimates the
speed-up at scales far above the logged one.

It prints a table and a recommendation and writes a PNG (heat map of efficiency against ``tau``
and ``S``, and efficiency against ``S`` per phase; needs matplotlib). How close the prediction is,
measured on the scale-invariance benchmark: ``benchmarks/advisor_validation.py`` (results in
``benchmarks/results/advisor_validation.md``).
"""

# The package: ``model`` (the prediction, pure Python floats), ``report`` (reading the logs, the
# per-phase advice, the table and the PNG) and ``main`` (the command). From Python:
# ``advise(run)`` -> ``Advice``, ``format_report``/``plot_advice``; ``efficiency`` and
# ``scale_for_efficiency`` answer from one ``AdaScale.stats()`` record, without the averaging lag.

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._docs import see
from .model import (
    Model,
    RunLog,
    efficiency,
    gain_at,
    interval_statistics,
    noise_scale_from_gain,
    predicted_updates,
    scale_for_efficiency,
    simulate_taus,
)
from .report import (
    DEFAULT_SCALES,
    Advice,
    AdvisorError,
    Phase,
    advise,
    format_report,
    load_run,
    plot_advice,
)

__all__ = [
    "AdvisorError",
    "RunLog",
    "Model",
    "Phase",
    "Advice",
    "load_run",
    "advise",
    "format_report",
    "plot_advice",
    "main",
    "gain_at",
    "efficiency",
    "scale_for_efficiency",
    "noise_scale_from_gain",
    "predicted_updates",
    "interval_statistics",
    "simulate_taus",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="adascale-advisor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="Trainer output dir, trainer_state.json, or metrics.jsonl (or its dir)")
    p.add_argument("--base_batch_size", "--base-batch-size", type=float, help="samples per base batch (B0)")
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    p.add_argument("--phases", type=int, default=4, help="equal slices of tau to report (default 4)")
    p.add_argument("--smoothing", type=float, help="the run's AdaScale smoothing, if it set one (default 0.999**S)")
    p.add_argument("--png", help="where to write the PNG (default: adascale_advisor.png next to the logs)")
    p.add_argument("--no_png", "--no-png", action="store_true")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.scales):
        p.error("scales must be >= 1" + see("advisor-bad-argument"))
    try:
        advice = advise(args.run, args.base_batch_size, args.scales, args.phases, args.smoothing)
    except (AdvisorError, ValueError) as err:
        print(f"adascale-advisor: {err}", file=sys.stderr)
        return 2
    print(format_report(advice))
    if not args.no_png:
        run = Path(args.run)
        png = Path(args.png) if args.png else (run if run.is_dir() else run.parent) / "adascale_advisor.png"
        written = plot_advice(advice, png)
        print(f"plot: {written}" if written else "matplotlib not installed: no PNG (pip install -e '.[plots]' in a clone of adascale-shard)")
    return 0
