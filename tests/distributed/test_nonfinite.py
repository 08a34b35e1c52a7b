"""Non-finite gradients on the GradScaler skip path, DDP and FSDP2 on 2 gloo ranks.

``torch.amp.GradScaler("cpu")`` (growth off, so a drop of the scale means a skipped step) drives
AdaScale around SGD with momentum for 6 updates of 2 ranks x 2 micro-batches (``N = S = 4``).
At update 2 the loop is poisoned on rank 1 only:

* ``input``: the first micro-batch of rank 1 has ``x[0, 0] = inf`` (DDP, FSDP2). Its gradients
  are non-finite; the reduction (DDP's all-reduce, FSDP2's reduce-scatter) spreads them to both
  ranks.
* ``shard`` (FSDP2 only): after the backward passes, rank 1 writes ``inf`` into one element of
  its own shard of ``fc1.weight.grad``; rank 0's shards stay finite. Only the scaler's
  cross-rank reduction of ``found_inf`` (DTensor's handler for
  ``_amp_foreach_non_finite_check_and_unscale_``) makes rank 0 skip as well; if one rank stepped
  and the other did not, AdaScale's per-update all-reduce would pair different updates.

Each poisoned run is compared with a reference that never runs the poisoned update (and halves
the scale where the scaler backed off, so the two see the same loss scale afterwards). Checked:

* the scaler skipped the step on both ranks; AdaScale's ``tau``, gain, averages and counters
  after the skipped update are exactly those before it;
* the next backward pass drops the stale window (``dropped_windows == 1``) and says so in an
  INFO log line; no non-finite value was folded (``nonfinite_updates == 0``);
* every later update (gain, tau, var, sqr, N and all parameters) equals the reference's
  bitwise: the poisoned window left no trace.

One launch for all cases. ``pytest -s`` prints what each case measured.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adascale_shard import AdaScale
from tests.harness import Case, run_cases

pytestmark = pytest.mark.distributed

UPDATES, POISONED = 6, 2
K = 2  # micro-batches per rank per update
LR, MOMENTUM = 0.05, 0.9
INIT_SCALE = 2.0**12
D_IN, HIDDEN, MICRO_BATCH = 8, 24, 8
MODEL_SEED, DATA_SEED = 0, 777


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def micro_batches(update: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(DATA_SEED + update)
    w = torch.randn(D_IN, generator=torch.Generator().manual_seed(DATA_SEED))
    out = []
    for _ in range(count):
        x = torch.randn(MICRO_BATCH, D_IN, generator=gen)
        y = torch.sin(x @ w).unsqueeze(1) + 0.5 + 0.3 * torch.randn(MICRO_BATCH, 1, generator=gen)
        out.append((x, y))
    return out


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build(engine: str) -> tuple[nn.Module, nn.Module, AdaScale]:
    """(module to call, module holding the parameters, optimizer)."""
    torch.manual_seed(MODEL_SEED)
    model = MLP()
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
        return DDP(model), model, opt
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    opt.attach(model)
    return model, model, opt


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1) for p in model.parameters()]
    )


def local_grads_finite(model: nn.Module) -> bool:
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def train(rank: int, world_size: int, engine: str, mode: str) -> dict:
    """``mode``: ``input`` / ``shard`` (poison update POISONED), ``reference`` (skip it, halve the
    scale as the scaler would have), ``no_scaler`` (skip it, no GradScaler at all)."""
    handler = ListHandler()
    logger = logging.getLogger("adascale_shard")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        call, model, opt = build(engine)
        scaler = None if mode == "no_scaler" else torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=10**9)
        if scaler is not None:
            opt.attach_grad_scaler(scaler)  # statistics in unscaled units
        out: dict = {"rows": [], "logs": handler.messages}
        for update in range(UPDATES):
            row: dict = {"update": update}
            if update == POISONED and mode in ("reference", "no_scaler"):
                if scaler is not None:
                    scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
                out["rows"].append(None)
                continue
            batches = micro_batches(update, world_size * K)[rank * K : (rank + 1) * K]
            if update == POISONED and mode == "input" and rank == 1:
                batches[0] = (batches[0][0].clone(), batches[0][1])
                batches[0][0][0, 0] = math.inf
            before = copy.deepcopy(opt.estimator_state_dict())
            for k, (x, y) in enumerate(batches):
                if engine == "ddp" and k < K - 1:
                    with call.no_sync():
                        loss = F.mse_loss(call(x), y) / K
                        (scaler.scale(loss) if scaler else loss).backward()
                else:
                    loss = F.mse_loss(call(x), y) / K
                    (scaler.scale(loss) if scaler else loss).backward()
            if update == POISONED and mode == "shard" and rank == 1:
                with torch.no_grad():
                    model.fc1.weight.grad.to_local()[0, 0] = math.inf  # rank 1's shard only
            row["local_grads_finite"] = local_grads_finite(model)
            if scaler is not None:
                row["scale_before"] = scaler.get_scale()
                scaler.step(opt)
                found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
                row["found_inf"] = float(sum(v.item() for v in found.values()))
                scaler.update()
                row["scale_after"] = scaler.get_scale()
            else:
                opt.step()
            opt.zero_grad()
            row["state_before"] = before
            row["state_after"] = copy.deepcopy(opt.estimator_state_dict())
            row["stats"] = opt.stats()
            row["params"] = flat_params(model)
            out["rows"].append(row)
        return out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


CASES = {
    "ddp_input": ("ddp", "input"),
    "ddp_reference": ("ddp", "reference"),
    "ddp_no_scaler": ("ddp", "no_scaler"),
    "fsdp2_input": ("fsdp2", "input"),
    "fsdp2_shard": ("fsdp2", "shard"),
    "fsdp2_reference": ("fsdp2", "reference"),
}
POISONED_CASES = {"ddp_input": "ddp_reference", "fsdp2_input": "fsdp2_reference", "fsdp2_shard": "fsdp2_reference"}


@pytest.fixture(scope="module")
def runs():
    return run_cases([Case(name, train, args) for name, args in CASES.items()], world_size=2, timeout=240)


@pytest.mark.parametrize("name", sorted(POISONED_CASES))
def test_scaler_skips_on_both_ranks(runs, name):
    for rank in (0, 1):
        row = runs[rank][name]["rows"][POISONED]
        assert row["found_inf"] == 1.0, (rank, row["found_inf"])
        assert row["scale_after"] == row["scale_before"] / 2  # the step was skipped
    if name == "fsdp2_shard":  # rank 0's own shards were finite: the skip came from the reduction
        assert runs[0][name]["rows"][POISONED]["local_grads_finite"]
        assert not runs[1][name]["rows"][POISONED]["local_grads_finite"]


@pytest.mark.parametrize("name", sorted(POISONED_CASES))
def test_skipped_update_leaves_tau_and_averages_untouched(runs, name):
    for rank in (0, 1):
        row = runs[rank][name]["rows"][POISONED]
        assert row["state_after"] == row["state_before"]  # tau, gain, averages, counters: exact
        assert row["stats"]["updates"] == POISONED


@pytest.mark.parametrize("name", sorted(POISONED_CASES))
def test_stale_window_is_dropped_and_logged(runs, name):
    for rank in (0, 1):
        rows = runs[rank][name]["rows"]
        after = rows[POISONED + 1]["stats"]
        assert after["dropped_windows"] == 1.0 and after["nonfinite_updates"] == 0.0
        assert after["N"] == 4.0 and after["last_update_nonfinite"] == 0.0
        logs = runs[rank][name]["logs"]
        assert sum("dropped" in m and "without a step()" in m for m in logs) == 1, logs
        assert not any("non-finite" in m for m in logs), logs


@pytest.mark.parametrize("name", sorted(POISONED_CASES))
def test_later_updates_equal_a_run_that_never_saw_the_poison(runs, name):
    reference = POISONED_CASES[name]
    for rank in (0, 1):
        rows, ref = runs[rank][name]["rows"], runs[rank][reference]["rows"]
        for update in range(UPDATES):
            if update == POISONED:
                continue
            got, want = rows[update], ref[update]
            for key in ("gain", "tau", "var", "sqr", "N", "updates"):
                assert got["stats"][key] == want["stats"][key], (rank, update, key)
            assert got["state_after"]["grad_var_avg"] == want["state_after"]["grad_var_avg"]
            assert torch.equal(got["params"], want["params"]), (rank, update)
    # The two ranks agree (the same update was applied everywhere).
    for update in range(UPDATES):
        if update != POISONED:
            assert runs[0][name]["rows"][update]["stats"]["tau"] == runs[1][name]["rows"][update]["stats"]["tau"]
    final = runs[0][name]["rows"][-1]["stats"]
    print(
        f"\n{name}: skipped update {POISONED} on both ranks; after it dropped_windows "
        f"{final['dropped_windows']:.0f}, nonfinite_updates {final['nonfinite_updates']:.0f}; "
        f"gains {[round(r['stats']['gain'], 4) for r in runs[0][name]['rows'] if r]} (= {reference}, bitwise)"
    )


def test_a_constant_loss_scale_leaves_the_gain(runs):
    """Before the back-off the GradScaler's scale is constant: the gain equals the gain of the same
    run without a scaler, and with attach_grad_scaler var and sqr are in unscaled units."""
    scaled, plain = runs[0]["ddp_reference"]["rows"], runs[0]["ddp_no_scaler"]["rows"]
    for update in range(POISONED):
        assert scaled[update]["stats"]["gain"] == pytest.approx(plain[update]["stats"]["gain"], rel=1e-6)
    ratio = scaled[0]["stats"]["var"] / plain[0]["stats"]["var"]
    print(f"\nGradScaler at a constant scale {INIT_SCALE:g}: var / var without a scaler = {ratio:.4g}")
    assert ratio == pytest.approx(1.0, rel=1e-5)


def test_gain_after_a_back_off_equals_the_run_without_a_scaler(runs):
    scaled, plain = runs[0]["ddp_reference"]["rows"], runs[0]["ddp_no_scaler"]["rows"]
    diffs = [abs(scaled[u]["stats"]["gain"] / plain[u]["stats"]["gain"] - 1) for u in range(POISONED + 1, UPDATES)]
    print(f"\nafter the back-off, largest relative gain difference to the run without a scaler: {max(diffs):.2e}")
    assert max(diffs) < 1e-5
