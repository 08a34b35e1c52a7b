"""The batch-size advisor: its math (hand values, hypothesis properties), stats()'s efficiency,
and the command on Trainer and train_ddp logs."""

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adascale_shard import AdaScale, advisor
from adascale_shard import estimators as est

# -- the math ----------------------------------------------------------------------------------


def test_noise_scale_and_b_noise_hand_computed():
    # var = 3 (variance of a mean over B0 = 32 samples), sqr = 1.5: r = 2 base batches; the
    # per-sample variance is 32 * 3 = 96, so B_noise = 96 / 1.5 = 64 samples.
    assert est.noise_scale(3.0, 1.5) == 2.0
    assert 32 * est.noise_scale(3.0, 1.5) == 64.0
    assert est.noise_scale(1.0, 0.0) == math.inf
    assert math.isnan(est.noise_scale(0.0, 0.0))


def test_efficiency_hand_computed():
    # r = 2: gain(4) = 3 / (0.5 + 1) = 2, efficiency 0.5 = (r + 1) / (r + S) = 3 / 6.
    assert advisor.efficiency(2.0, 1.0, 4.0) == pytest.approx(0.5)
    assert advisor.efficiency(2.0, 1.0, 1.0) == 1.0
    # r = 15: S = 16 gives 16 / 31; S = 64 gives 16 / 79.
    assert [advisor.efficiency(15.0, 1.0, s) for s in (16, 64)] == pytest.approx([16 / 31, 16 / 79])
    assert advisor.efficiency(1.0, 0.0, 8.0) == 1.0  # pure noise: linear speed-up
    assert advisor.efficiency(0.0, 1.0, 8.0) == pytest.approx(1 / 8)  # no noise: the extra batch is wasted
    # efficiency 1/2 at S = r + 2, 0.8 at S = (r + 1) / 0.8 - r.
    assert advisor.scale_for_efficiency(2.0, 1.0, 0.5) == pytest.approx(4.0)
    assert advisor.efficiency(2.0, 1.0, advisor.scale_for_efficiency(2.0, 1.0, 0.8)) == pytest.approx(0.8)
    assert advisor.scale_for_efficiency(1.0, 0.0, 0.5) == math.inf
    assert advisor.scale_for_efficiency(0.0, 1.0, 0.5) == 1.0


def test_gain_at_matches_gain():
    for r in (0.0, 0.3, 2.0, 50.0):
        for s in (1, 2, 16, 256):
            assert advisor.gain_at(r, s) == pytest.approx(est.gain(r, 1.0, s))
    assert advisor.gain_at(math.inf, 8) == 8.0
    assert advisor.gain_at(math.nan, 8) == 1.0


def test_noise_scale_from_gain_hand_computed_and_ends():
    # r = 2 at S = 4 gives gain 2: back to 2. (var/sqr = S (g - 1) / (S - g), not its reciprocal.)
    assert advisor.noise_scale_from_gain(2.0, 4.0) == pytest.approx(2.0)
    # S = 2, g = 1.5: r = 2 * 0.5 / 0.5 = 2; check: (2 + 1) / (2 / 2 + 1) = 1.5.
    assert advisor.noise_scale_from_gain(1.5, 2.0) == pytest.approx(2.0)
    assert advisor.noise_scale_from_gain(1.0, 8.0) == 0.0
    assert advisor.noise_scale_from_gain(8.0, 8.0) == math.inf
    with pytest.raises(ValueError, match="need scale > 1"):
        advisor.noise_scale_from_gain(1.0, 1.0)


def test_predicted_updates_hand_computed():
    # Constant r = 2 at S = 4: gain 2 everywhere, 100 tau take 50 updates.
    assert advisor.predicted_updates([(0.0, 2.0), (100.0, 2.0)], 4.0) == pytest.approx(50.0)
    # 1/gain linear from 1 (r = 0) to 1/4 (r = inf) over [0, 10] at S = 4: mean 5/8, 6.25 updates.
    assert advisor.predicted_updates([(0.0, 0.0), (10.0, math.inf)], 4.0) == pytest.approx(6.25)
    # Held constant outside the points; a sub-range.
    assert advisor.predicted_updates([(10.0, 2.0)], 4.0, 0.0, 30.0) == pytest.approx(15.0)
    assert advisor.predicted_updates([(0.0, 0.0), (10.0, math.inf)], 4.0, 5.0, 10.0) == pytest.approx(5 * (0.625 + 0.25) / 2)
    with pytest.raises(ValueError):
        advisor.predicted_updates([], 2.0)


noise = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
scale = st.floats(min_value=1.0, max_value=1e4, allow_nan=False)
sqr_values = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)


@given(r=noise, sqr=sqr_values, s1=scale, s2=scale)
def test_efficiency_is_in_0_1_and_decreasing(r, sqr, s1, s2):
    lo, hi = sorted((s1, s2))
    e_lo, e_hi = advisor.efficiency(r * sqr, sqr, lo), advisor.efficiency(r * sqr, sqr, hi)
    assert 0.0 < e_hi <= 1.0 and 0.0 < e_lo <= 1.0
    assert e_hi <= e_lo * (1 + 1e-12)
    assert advisor.efficiency(r * sqr, sqr, 1.0) == 1.0


@given(r=st.floats(min_value=1e-3, max_value=1e3), s=st.floats(min_value=1.5, max_value=1e3))
def test_gain_inversion_round_trips(r, s):
    g = advisor.gain_at(r, s)
    if 1.0 < g < s:  # interior: recover r (the ends only bound it)
        assert advisor.noise_scale_from_gain(g, s) == pytest.approx(r, rel=1e-6)


@given(r=st.floats(min_value=0.0, max_value=1e3), s=st.floats(min_value=1.0, max_value=1e3))
def test_predicted_updates_constant_noise(r, s):
    assert advisor.predicted_updates([(0.0, r), (200.0, r)], s) == pytest.approx(200.0 / advisor.gain_at(r, s))


def _ema_log(raw, scale, every):
    """What AdaScale.stats() would log every `every` updates for a stream of raw estimates."""
    beta = est.default_smoothing(scale)
    avg_v = avg_q = weight = 0.0
    records, tau = [], 0.0
    for n, (v, q) in enumerate(raw, 1):
        avg_v, new_weight = est.ema_update(avg_v, weight, v, beta)
        avg_q = beta * avg_q + (1 - beta) * q
        weight = new_weight
        tau += 1.5
        if n % every == 0:
            records.append((tau, float(n), avg_v / weight, avg_q / weight, scale))
    return records, beta


@pytest.mark.parametrize("every", [1, 7])
def test_interval_statistics_undo_the_averaging(every):
    rng = torch.Generator().manual_seed(0)
    raw = [(1.0 + torch.rand(1, generator=rng).item(), 0.5 + torch.rand(1, generator=rng).item()) for _ in range(70)]
    records, beta = _ema_log(raw, 16.0, every)
    intervals = advisor.interval_statistics(records)
    assert len(intervals) == 70 // every
    for i, (start, end, var, sqr) in enumerate(intervals):
        chunk = raw[i * every : (i + 1) * every]
        weights = [beta ** (every - 1 - j) for j in range(every)]  # the newest weighs most
        assert var == pytest.approx(sum(w * v for w, (v, _) in zip(weights, chunk)) / sum(weights), rel=1e-9)
        assert sqr == pytest.approx(sum(w * q for w, (_, q) in zip(weights, chunk)) / sum(weights), rel=1e-9)
        assert end - start == pytest.approx(1.5 * every)


def test_simulate_taus_constant_statistics():
    # var/sqr = 2 everywhere: gain 2 at S = 4 from the first update; 100 tau in 50 updates.
    taus = advisor.simulate_taus([(0.0, 10.0, 2.0, 1.0)], 4.0, 100.0)
    assert len(taus) == 50 and taus[-1] == pytest.approx(100.0)
    assert len(advisor.simulate_taus([(0.0, 10.0, 2.0, 1.0)], 1.0, 30.0)) == 30  # S = 1: gain 1


def test_simulate_taus_lags_like_adascale():
    # The true gradient shrinks 100-fold at tau = 50 (noise scale 1 -> 100). The noise scale the
    # replay's gain implies at the end: a replay at S = 64 (averaging over ~16 updates) has come
    # much closer to 100 than one at S = 2 (~500 updates, ~800 tau, dominated by the early sqr).
    intervals = [(0.0, 50.0, 1.0, 1.0), (50.0, 1000.0, 1.0, 0.01)]
    implied = {}
    for scale in (2.0, 64.0):
        taus = advisor.simulate_taus(intervals, scale, 1000.0)
        implied[scale] = advisor.noise_scale_from_gain(taus[-1] - taus[-2], scale)
    assert 1.0 < implied[2.0] < 30.0 and implied[64.0] > 2 * implied[2.0]


def test_replay_of_an_adascale_run_reproduces_its_update_count():
    """Log a real AdaScale run's stats() every update; de-average and replay it at its own scale."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = AdaScale(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    records = []
    while not opt.budget_spent(300):
        for _ in range(4):
            x = torch.randn(8, 6, generator=gen)
            y = x[:, :1] + 0.5 * torch.randn(8, 1, generator=gen)
            (torch.nn.functional.mse_loss(model(x), y) / 4).backward()
        opt.step()
        opt.zero_grad()
        s = opt.stats()
        records.append((s["tau"], s["updates"], s["var"], s["sqr"], s["S"]))
    replay = advisor.simulate_taus(advisor.interval_statistics(records), 4.0, 300.0)
    assert len(replay) == pytest.approx(len(records), rel=0.03)


# -- stats() -----------------------------------------------------------------------------------


def test_stats_reports_efficiency_gain_over_scale():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = AdaScale(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _ in range(4):
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
            (torch.nn.functional.mse_loss(model(x), y) / 4).backward()
        opt.step()
        opt.zero_grad()
    stats = opt.stats()
    assert stats["S"] == 4.0
    assert stats["efficiency"] == pytest.approx(stats["gain"] / 4.0)
    assert stats["efficiency"] == pytest.approx(advisor.efficiency(stats["var"], stats["sqr"], 4.0))
    assert 0.25 <= stats["efficiency"] <= 1.0


def test_hf_log_keys_include_the_advisor_inputs():
    pytest.importorskip("transformers")
    from adascale_shard.integrations.hf import LOG_KEYS

    assert {"tau", "var", "sqr", "efficiency", "S"} <= set(LOG_KEYS)


# -- the command -------------------------------------------------------------------------------


def _trainer_state(path, taus, r, scale=4.0, prefix="adascale/", updates=True):
    history = []
    for step, tau in enumerate(taus, 1):
        sqr = 2.0
        record = {"loss": 1.0, "step": step, "learning_rate": 0.1}
        if prefix is not None:
            values = {"tau": tau, "var": r * sqr, "sqr": sqr, "gain": advisor.gain_at(r, scale), "S": scale}
            if updates:
                values["updates"] = tau / advisor.gain_at(r, scale)
            record.update({prefix + k: v for k, v in values.items()})
        history.append(record)
        history.append({"eval_loss": 1.0, "step": step})  # eval records carry no AdaScale metrics
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": len(taus)}))


@pytest.mark.parametrize("updates", [True, False], ids=["averaging", "instantaneous"])
def test_advise_constant_noise_trainer_dir(tmp_path, updates):
    # r = 2 everywhere: efficiency (r + 1) / (r + S) at every phase; critical S = r + 2 = 4.
    run = tmp_path / "out"
    _trainer_state(run / "checkpoint-10", [10.0 * i for i in range(1, 11)], r=2.0, updates=updates)
    _trainer_state(run / "checkpoint-5", [10.0 * i for i in range(1, 6)], r=50.0)  # older: ignored
    advice = advisor.advise(run, base_batch_size=32, scales=[2, 16, 64], phases=2)
    assert advice.model.kind == ("averaging" if updates else "instantaneous")
    assert advice.source == run / "checkpoint-10" / "trainer_state.json"
    assert advice.run_scale == 4.0
    for phase in advice.phases + [advice.whole]:
        assert phase.noise_scale == pytest.approx(2.0)
        assert phase.efficiency[16] == pytest.approx(3 / 18)
        # On the half-octave grid, log-linear: within a few per cent of the exact crossing.
        assert phase.scale_at_half == pytest.approx(4.0, rel=0.03)
        assert phase.scale_at_good == pytest.approx(advisor.scale_for_efficiency(2.0, 1.0, 0.8), rel=0.03)
    text = advisor.format_report(advice)
    assert "B_noise (samples)" in text and "| 64 |" in text  # 32 * 2 samples
    assert "at this phase of training (tau 50-100)" in text
    assert "S=2 gives 0.75 of linear speed-up" in text
    assert "a global batch of ~128 samples" in text


def test_command_on_train_ddp_metrics_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    lines = []
    for update in range(1, 41):  # noise scale growing over training, as it usually does
        tau, r, sqr = 2.0 * update, 0.1 * update, 1e-3
        lines.append(json.dumps({"update": update, "tau": tau, "var": r * sqr, "sqr": sqr, "S": 8.0, "gain": 2.0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "adascale_shard.advisor", str(tmp_path), "--base_batch_size", "4", "--scales", "2", "8", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "metrics.jsonl" in done.stdout and "S=32" in done.stdout
    assert (tmp_path / "adascale_advisor.png").stat().st_size > 10_000
    advice = advisor.advise(tmp_path / "metrics.jsonl", scales=[8])
    effs = [p.efficiency[8.0] for p in advice.phases]
    assert effs == sorted(effs)  # a growing noise scale: later phases use the batch better


def test_gain_only_logs_are_inverted(tmp_path):
    lines = [json.dumps({"tau": float(t), "gain": advisor.gain_at(3.0, 8.0), "S": 8.0}) for t in range(1, 20)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    advice = advisor.advise(tmp_path / "m.jsonl", scales=[8])
    assert advice.whole.noise_scale == pytest.approx(3.0)
    assert any("recovered from gain and S" in note for note in advice.notes)


def test_clear_errors(tmp_path, capsys):
    _trainer_state(tmp_path / "plain", [1.0, 2.0], r=1.0, prefix=None)  # a run without AdaScale
    assert advisor.main([str(tmp_path / "plain"), "--no_png"]) == 2
    err = capsys.readouterr().err
    assert "no AdaScale statistics" in err and "enable_adascale" in err and "learning_rate" in err
    (tmp_path / "empty").mkdir()
    assert advisor.main([str(tmp_path / "empty")]) == 2
    assert "found no logs" in capsys.readouterr().err
    assert advisor.main([str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert advisor.main([str(tmp_path / "bad.json")]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_advisor_model_imports_no_torch():
    """The prediction math is pure Python: model.py imports only the stdlib and the estimators."""
    import ast
    from pathlib import Path

    from adascale_shard.advisor import model

    tree = ast.parse(Path(model.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "bisect", "math", "dataclasses", "pathlib"}, imported
