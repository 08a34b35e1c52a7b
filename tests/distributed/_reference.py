"""The comparison every engine test makes with its single-process reference, update by update."""

from __future__ import annotations

import math

import torch


def assert_matches_reference(label: str, run: dict, ref: dict, n: float, updates: int, rtol: float, atol: float) -> None:
    """``run`` (one rank's record) took ``updates`` updates of ``n`` micro-gradients, none dropped,
    with a non-trivial gain, and its gain, tau, var, sqr and parameters equal ``ref``'s."""
    assert run["N"] == [n] * updates and run["S"] == [n] * updates, (label, run["N"], run["S"])
    assert run["dropped_windows"] == [0.0] * updates, label
    assert run["updates"] == [float(u + 1) for u in range(updates)], label
    assert all(1.01 < g < n for g in run["gain"]), (label, run["gain"])  # a non-trivial gain
    for key in ("gain", "tau", "var", "sqr"):
        for update, (p, q) in enumerate(zip(run[key], ref[key])):
            assert math.isclose(p, q, rel_tol=rtol, abs_tol=atol), f"{label}: {key}, update {update}: {p} vs {q}"
    for update, (p, q) in enumerate(zip(run["params"], ref["params"])):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{label}, update {update}: {m}")


def assert_bf16_close(label: str, run: dict, ref: dict, updates: int, gain_rtol: float, param_atol: float) -> None:
    """A bf16 mixed-precision run against the fp32 reference: gain and tau within ``gain_rtol``,
    parameters within ``param_atol``, and not trivially equal (bf16 really ran)."""
    assert run["dropped_windows"] == [0.0] * updates, label
    for key in ("gain", "tau"):
        for update, (p, q) in enumerate(zip(run[key], ref[key])):
            assert math.isclose(p, q, rel_tol=gain_rtol), f"{label}: {key} at update {update}: {p} vs {q}"
    for update, (p, q) in enumerate(zip(run["params"], ref["params"])):
        assert float((p - q).abs().max()) < param_atol, (label, update)
    assert max(abs(p - q) for p, q in zip(run["gain"], ref["gain"])) > 1e-6, label
