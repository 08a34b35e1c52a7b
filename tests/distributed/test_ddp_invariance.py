"""DDP invariance: AdaScale gives the same training whatever the layout of the N micro-batches.

The same model, the same M = 8 micro-batches per update, in the same order, for 6 updates of
SGD (lr 0.05, momentum 0.9), consumed by three layouts:

(a) one process, no process group, K = 8 accumulation steps (loss / 8);
(b) DDP on 2 ranks, K = 4 each, ``no_sync()`` for the first 3 micro-steps (loss / 4: DDP
    averages over the 2 ranks, so the applied gradient is the mean of the 8 micro-gradients);
    also (b') with the micro-batches dealt out interleaved (rank r takes r, r + 2, ...);
(c) DDP on 2 ranks, K = 4 each, without ``no_sync``: DDP all-reduces after every backward. The
    second backward accumulates its local gradient onto the already averaged one and DDP
    averages the sum again: avg(avg(h1) + h2) = avg(h1) + avg(h2), so the final G is the same.

In every layout N = S = 8 micro-gradients per update. The gain, tau, the smoothed statistics,
the applied gradient and every parameter must agree step by step between the layouts, and the
two DDP ranks must hold bit-identical values. Each layout is also checked against an oracle
that computes the 8 micro-gradients explicitly (on a hook-free copy of the model) and applies
the formulas of ALGORITHM.md.

The model has a frozen parameter (``requires_grad=False``, used in forward) and an unused one
(requires grad, never used): neither may change the count of backward passes.

A clipped run of layout (b) checks that clipping between backward and ``step()`` does not
change the statistics: its first update's gain/tau/var/sqr equal the unclipped run's, and at
every update its gain matches the oracle computed from the *pre-clip* gradients.

Run ``pytest -s -k invariance`` to print the largest step-by-step differences.
"""

from __future__ import annotations

import contextlib
import math
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from adascale_shard import AdaScale
from tests.harness import Case, run_cases

pytestmark = pytest.mark.distributed

D_IN, HIDDEN = 8, 24  # 8*24 + 24 + 24 + 1 = 241 trainable parameters, + 8 frozen + 3 unused
MICRO_BATCHES = 8  # M: micro-batches per update, in every layout
MICRO_BATCH_SIZE = 8
UPDATES = 6
LR, MOMENTUM = 0.05, 0.9
MODEL_SEED, DATA_SEED = 0, 1234
CLIP_MAX_NORM = 0.05  # ||G|| is 0.5 to 1.2 here: clipping really acts at every update

# Tolerances between layouts. All tensors are float32 (eps = 1.2e-7). The layouts sum the same
# 8 micro-gradients in different association orders ((g1 + ... + g8) / 8 in one process,
# ((g1 + .. + g4) / 4 + (g5 + .. + g8) / 4) / 2 over DDP), so G differs by a few ulps per
# element; those differences then travel through 6 momentum updates at lr * gain <= 0.4. The
# statistics are float64 sums of float32 squared norms, but var ~ A - B inherits the float32
# rounding of the gradients relative to A. rtol 1e-5 / atol 1e-6 is ~100 ulps of headroom
# for parameters of order 1 and still fails on any real algorithmic difference (a wrong
# normalisation by K or by the world size moves the gain by far more, see
# test_tolerance_is_far_tighter_than_a_normalisation_bug).
RTOL, ATOL = 1e-5, 1e-6
# Against the oracle (micro-gradients recomputed without the 1/K loss factor, summed in
# float64): the same float32 rounding, the same tolerance.
ORACLE_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Model, data, oracle: identical in every process (deterministic CPU generators).
# ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_scale = nn.Parameter(0.5 + torch.rand(D_IN), requires_grad=False)  # frozen
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 1)
        self.unused = nn.Parameter(torch.randn(3))  # requires grad, never used in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x * self.input_scale)))


def build_model() -> Net:
    torch.manual_seed(MODEL_SEED)
    return Net()


def micro_batches(update: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The M micro-batches of one update: a noisy teacher, so the gain is strictly inside (1, 8)."""
    teacher = torch.Generator().manual_seed(DATA_SEED)
    w = torch.randn(D_IN, generator=teacher)
    gen = torch.Generator().manual_seed(DATA_SEED + 1 + update)
    out = []
    for _ in range(MICRO_BATCHES):
        x = torch.randn(MICRO_BATCH_SIZE, D_IN, generator=gen)
        y = torch.sin(x @ w).unsqueeze(1) + 0.3 * torch.randn(MICRO_BATCH_SIZE, 1, generator=gen)
        out.append((x, y))
    return out


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def flat_grads(model: nn.Module) -> torch.Tensor:
    """The gradients of the trainable parameters (zeros where ``.grad`` is None)."""
    return flat(
        p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad
    )


class Oracle:
    """AdaScale's statistics from explicitly computed micro-gradients (ALGORITHM.md formulas)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.smoothing = 0.999**scale
        self.var_avg = self.sqr_avg = self.weight = 0.0

    @staticmethod
    def micro_grads(model: nn.Module, batches) -> list[torch.Tensor]:
        copy = build_model()  # a fresh module: no AdaScale hooks on its parameters
        copy.load_state_dict(model.state_dict())
        grads = []
        for batch in batches:
            copy.zero_grad(set_to_none=True)
            loss_fn(copy, batch).backward()
            grads.append(flat_grads(copy).double())
        return grads

    def update(
        self, grads: list[torch.Tensor], *, grad_sqr: float | None = None, a_factor: float = 1.0, commit: bool = True
    ) -> dict[str, float]:
        """Fold one update in; ``grad_sqr`` / ``a_factor`` replace ``B`` / scale ``A`` to model a bug;
        ``commit=False`` returns the result without changing the averages."""
        n = len(grads)
        a = a_factor * sum(float(g.square().sum()) for g in grads) / n  # A = mean ||g_i||^2
        b = float(torch.stack(grads).mean(0).square().sum()) if grad_sqr is None else grad_sqr
        var_micro = n / (n - 1) * (a - b)
        sqr = b - var_micro / n
        var_base = var_micro * self.scale / n
        s = self.smoothing
        var_avg = s * self.var_avg + (1 - s) * var_base
        sqr_avg = s * self.sqr_avg + (1 - s) * sqr
        weight = s * self.weight + (1 - s)
        if commit:
            self.var_avg, self.sqr_avg, self.weight = var_avg, sqr_avg, weight
        # Bias-corrected averages, clamped after averaging, relative variance floor.
        sqr = max(sqr_avg / weight, 0.0)
        var = max(var_avg / weight, 1e-6 * sqr)
        gain = min(max((var + sqr) / (var / self.scale + sqr), 1.0), self.scale)
        return {"gain": gain, "var": var, "sqr": sqr}


# ---------------------------------------------------------------------------------------------
# One training run in one layout. Runs in the parent (world_size 1, no process group) or on
# each rank of a launch.
# ---------------------------------------------------------------------------------------------
def train(
    rank: int,
    world_size: int,
    *,
    ddp: bool,
    no_sync: bool = True,
    interleaved: bool = False,
    clip_max_norm: float | None = None,
) -> dict[str, list]:
    """Train a fresh model for UPDATES updates; per update, the values the tests compare."""
    model = build_model()
    net = DDP(model, find_unused_parameters=True) if ddp else model  # `unused` needs the flag
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    accumulation = MICRO_BATCHES // world_size
    if interleaved:
        mine = list(range(rank, MICRO_BATCHES, world_size))
    else:
        mine = list(range(rank * accumulation, (rank + 1) * accumulation))
    oracle = Oracle(scale=float(MICRO_BATCHES))
    out: dict[str, list] = {
        key: []
        for key in (
            "gain", "tau", "var", "sqr", "N", "S", "dropped_windows", "updates",
            "grad", "grad_norm", "clip_total_norm", "clipped_grad_norm", "params",
            "oracle_gain", "oracle_var", "oracle_sqr", "oracle_gain_if_post_clip_norm",
            "oracle_gain_if_a_doubled", "oracle_gain_if_h_not_rescaled", "grad_sqr_part",
        )
    }
    frozen_before = model.input_scale.detach().clone()
    unused_before = model.unused.detach().clone()
    for update in range(UPDATES):
        batches = micro_batches(update)
        # The oracle sees all 8 micro-batches at the current parameters (hook-free copy).
        micro = Oracle.micro_grads(model, batches)
        for k, index in enumerate(mine):
            skip_sync = ddp and no_sync and k < accumulation - 1
            with net.no_sync() if skip_sync else contextlib.nullcontext():
                (loss_fn(net, batches[index]) / accumulation).backward()
        grad = flat_grads(model)
        out["grad"].append(grad.clone())
        out["grad_norm"].append(float(grad.double().norm()))
        if clip_max_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip_max_norm)
            out["clip_total_norm"].append(float(total))
            out["clipped_grad_norm"].append(float(flat_grads(model).double().norm()))
        # The part of the pre-clip ||G||^2 this rank measures (read after the clip, as step() does).
        part, probes = opt._engine.take_grad_sqr(opt._capture)
        out["grad_sqr_part"].append(float(part.sum()) * opt._engine.unclip_factor(probes.tolist()))
        out["grad_sqr_is_part"] = [opt._engine.grad_sqr_is_part(opt._capture)]
        opt.step()
        opt.zero_grad()
        stats = opt.stats()
        for key in ("var", "sqr", "N", "S", "dropped_windows", "updates"):
            out[key].append(stats[key])
        out["gain"].append(opt.gain())
        out["tau"].append(opt.tau)
        out["params"].append(flat(model.parameters()).clone())
        # What plausible bugs would give, so the tests can show that they would be caught:
        # ||G||^2 taken after clipping; A off by the world size (2); the hooked gradients h
        # (= g / K) not multiplied back by K (A off by K^2).
        if clip_max_norm is not None:
            wrong = oracle.update(micro, grad_sqr=out["clipped_grad_norm"][-1] ** 2, commit=False)
            out["oracle_gain_if_post_clip_norm"].append(wrong["gain"])
        out["oracle_gain_if_a_doubled"].append(oracle.update(micro, a_factor=2.0, commit=False)["gain"])
        wrong = oracle.update(micro, a_factor=1.0 / accumulation**2, commit=False)
        out["oracle_gain_if_h_not_rescaled"].append(wrong["gain"])
        expected = oracle.update(micro)
        out["oracle_gain"].append(expected["gain"])
        out["oracle_var"].append(expected["var"])
        out["oracle_sqr"].append(expected["sqr"])
    out["frozen_unchanged"] = [bool(torch.equal(model.input_scale, frozen_before))]
    out["unused_unchanged"] = [bool(torch.equal(model.unused.detach(), unused_before))]
    out["world_size"] = [dist.get_world_size() if dist.is_initialized() else 1]
    return out


def layout_case(rank: int, world_size: int, options: dict) -> dict[str, list]:
    """One DDP layout on one rank (a harness case: a fresh model per case)."""
    return train(rank, world_size, **options)


DDP_CASES = {
    "b_ddp_no_sync": {"ddp": True, "no_sync": True},
    "b_ddp_no_sync_interleaved": {"ddp": True, "no_sync": True, "interleaved": True},
    "c_ddp_sync_every_step": {"ddp": True, "no_sync": False},
    "b_ddp_no_sync_clipped": {"ddp": True, "no_sync": True, "clip_max_norm": CLIP_MAX_NORM},
}


@pytest.fixture(scope="module")
def runs():
    """Layout (a) here in the parent; every DDP layout in one 2-rank launch."""
    assert not dist.is_initialized(), "layout (a) must run without a process group"
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks
    try:
        single = train(0, 1, ddp=False)
    finally:
        torch.set_num_threads(threads)
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    ranks = run_cases([Case(name, layout_case, (options,)) for name, options in DDP_CASES.items()], 2, timeout=240)
    launch_s = time.perf_counter() - start
    print(f"\n[invariance] layout (a) in the parent: {single_s:.2f} s; one 2-rank launch for "
          f"{len(DDP_CASES)} DDP cases: {launch_s:.2f} s")
    return {"a_single_process": single, "ranks": ranks}


SCALARS = ("gain", "tau", "var", "sqr")


def max_abs_diff(x: dict, y: dict, key: str) -> float:
    if key in ("params", "grad"):
        return max(float((p - q).abs().max()) for p, q in zip(x[key], y[key]))
    return max(abs(p - q) for p, q in zip(x[key], y[key]))


def assert_runs_close(x: dict, y: dict, label: str, keys=SCALARS + ("grad", "params")) -> dict:
    """Step-by-step agreement of two runs; prints the largest absolute difference per quantity."""
    worst = {key: max_abs_diff(x, y, key) for key in keys}
    print(f"[invariance] {label}: max |diff| over {UPDATES} updates: "
          + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    for key in keys:
        assert len(x[key]) == len(y[key]) == UPDATES, key
        for update, (p, q) in enumerate(zip(x[key], y[key])):
            if isinstance(p, torch.Tensor):
                torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label} {key} update {update}: {m}")
            else:
                assert math.isclose(p, q, rel_tol=RTOL, abs_tol=ATOL), f"{label}: {key} at update {update}: {p} vs {q}"
    return worst


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------
def test_every_layout_sees_n_equals_s_equals_8_and_no_dropped_window(runs):
    layouts = {"a_single_process": runs["a_single_process"]}
    for rank in (0, 1):
        layouts.update({f"{name}@rank{rank}": runs["ranks"][rank][name] for name in DDP_CASES})
    for name, run in layouts.items():
        assert run["N"] == [8.0] * UPDATES, name
        assert run["S"] == [8.0] * UPDATES, name
        assert run["dropped_windows"] == [0.0] * UPDATES, name
        assert run["updates"] == [float(u + 1) for u in range(UPDATES)], name
        assert run["frozen_unchanged"] == [True] and run["unused_unchanged"] == [True], name
        # A non-trivial gain, so that equality between layouts means something.
        assert all(1.05 < g < 7.5 for g in run["gain"]), (name, run["gain"])
    assert runs["a_single_process"]["world_size"] == [1]
    assert runs["ranks"][0]["b_ddp_no_sync"]["world_size"] == [2]


def test_both_ddp_ranks_hold_identical_gain_tau_and_parameters(runs):
    rank0, rank1 = runs["ranks"]
    for name in DDP_CASES:
        for key in SCALARS:
            assert rank0[name][key] == rank1[name][key], (name, key)  # bit-identical
        for update in range(UPDATES):
            assert torch.equal(rank0[name]["params"][update], rank1[name]["params"][update]), (name, update)
            assert torch.equal(rank0[name]["grad"][update], rank1[name]["grad"][update]), (name, update)


@pytest.mark.parametrize("name", list(DDP_CASES))
def test_each_ddp_rank_measures_its_share_of_the_replicated_grad_sqr(runs, name):
    # Each rank reads part of the replicated G (its share of the tensors); the parts add up to the
    # pre-clip ||G||^2 and each is a real part, not all of it on one rank and nothing on the other.
    rank0, rank1 = (runs["ranks"][rank][name] for rank in (0, 1))
    assert rank0["grad_sqr_is_part"] == rank1["grad_sqr_is_part"] == [True]
    assert runs["a_single_process"]["grad_sqr_is_part"] == [False]
    for update in range(UPDATES):
        full = rank0["grad_norm"][update] ** 2
        parts = (rank0["grad_sqr_part"][update], rank1["grad_sqr_part"][update])
        assert sum(parts) == pytest.approx(full, rel=1e-6), (update, parts, full)
        assert all(0 < part < 0.99 * full for part in parts), (update, parts, full)
    single = runs["a_single_process"]
    assert single["grad_sqr_part"][0] == pytest.approx(single["grad_norm"][0] ** 2, rel=1e-6)


@pytest.mark.parametrize("other", ["b_ddp_no_sync", "b_ddp_no_sync_interleaved", "c_ddp_sync_every_step"])
def test_ddp_invariance_single_process_vs_ddp(runs, other):
    assert_runs_close(runs["a_single_process"], runs["ranks"][0][other], f"(a) single process vs {other}")


def test_ddp_invariance_no_sync_vs_sync_every_step(runs):
    rank0 = runs["ranks"][0]
    assert_runs_close(rank0["b_ddp_no_sync"], rank0["c_ddp_sync_every_step"], "(b) no_sync vs (c) sync every step")


@pytest.mark.parametrize("layout", ["a_single_process", "b_ddp_no_sync", "c_ddp_sync_every_step", "b_ddp_no_sync_clipped"])
def test_gain_matches_oracle_from_explicit_micro_gradients(runs, layout):
    run = runs[layout] if layout == "a_single_process" else runs["ranks"][0][layout]
    worst = 0.0
    for update in range(UPDATES):
        for key in ("gain", "var", "sqr"):
            got, expected = run[key][update], run[f"oracle_{key}"][update]
            worst = max(worst, abs(got - expected) / abs(expected))
            assert math.isclose(got, expected, rel_tol=ORACLE_RTOL), (layout, key, update, got, expected)
    print(f"[invariance] {layout} vs oracle: max relative diff of gain/var/sqr {worst:.3g}")


@pytest.mark.parametrize("layout", ["a_single_process", "b_ddp_no_sync"])
def test_tolerance_is_far_tighter_than_a_normalisation_bug(runs, layout):
    # The layouts agree to ~1e-7; a normalisation bug moves the gain by far more than RTOL.
    run = runs[layout] if layout == "a_single_process" else runs["ranks"][0][layout]
    for update in range(UPDATES):
        gain = run["gain"][update]
        assert abs(run["oracle_gain_if_a_doubled"][update] - gain) > 1000 * RTOL * gain
        assert abs(run["oracle_gain_if_h_not_rescaled"][update] - gain) > 1000 * RTOL * gain


def test_clipping_between_backward_and_step_does_not_change_the_statistics(runs):
    rank0 = runs["ranks"][0]
    clipped, plain, single = rank0["b_ddp_no_sync_clipped"], rank0["b_ddp_no_sync"], runs["a_single_process"]
    # Clipping really acted: the pre-clip norm is far above max_norm, the grads were rescaled.
    assert clipped["clip_total_norm"][0] > 5 * CLIP_MAX_NORM
    assert clipped["clip_total_norm"][0] == pytest.approx(clipped["grad_norm"][0], rel=1e-6)
    assert clipped["clipped_grad_norm"][0] == pytest.approx(CLIP_MAX_NORM, rel=1e-3)
    assert not torch.allclose(clipped["params"][0], plain["params"][0], rtol=RTOL, atol=ATOL)
    # Update 1: the same gradients before clipping, so the same statistics as the unclipped run
    # of the same layout (||G||^2 is taken at step() and the clip factor recovered from two probe
    # gradients: float32 rounding of the clipped probes, ~1e-7), and within float tolerance of the
    # single process.
    for key in SCALARS:
        assert math.isclose(clipped[key][0], plain[key][0], rel_tol=RTOL, abs_tol=ATOL), key
        assert math.isclose(clipped[key][0], single[key][0], rel_tol=RTOL, abs_tol=ATOL), key
    # Every update: clipping acted; the gain is the one of the pre-clip gradients (oracle), and
    # clearly not the one a post-clip ||G||^2 would give.
    for update in range(UPDATES):
        assert clipped["clip_total_norm"][update] > 5 * CLIP_MAX_NORM
        assert math.isclose(clipped["gain"][update], clipped["oracle_gain"][update], rel_tol=ORACLE_RTOL)
        assert abs(clipped["oracle_gain_if_post_clip_norm"][update] - clipped["gain"][update]) > 0.1
    # Later updates differ: the parameters differ (this is why only update 1 is compared).
    print("[invariance] clipped vs unclipped gain per update:",
          [f"{c:.4f}/{p:.4f}" for c, p in zip(clipped["gain"], plain["gain"])])
