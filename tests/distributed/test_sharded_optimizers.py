"""Optimizer-state sharding around AdaScale on 2 gloo ranks: what is exact, what is refused.

* torch's ``ZeroRedundancyOptimizer`` *outside* AdaScale's view of the gradients
  (``AdaScale(ZeroRedundancyOptimizer(params, optimizer_class=SGD, ...))`` on a DDP model): the
  gradients are DDP's replicated ones and the ZeRO optimizer shards only the state, so AdaScale's
  replicated engine is exact. Compared, update by update, with the single-process reference of
  ``test_fsdp2.py`` (same MLP, same N micro-batches, SGD lr 0.05 momentum 0.9, 6 updates), with
  accumulation 1 and 2 per rank (``no_sync`` on the first micro-step).
* ``ZeroRedundancyOptimizer(params, optimizer_class=AdaScale, ...)`` (AdaScale *inside*, built on
  one rank's partition): refused at construction.
* DeepSpeed ZeRO++ hpZ (``zero_hpz_partition_size`` = 2, ZeRO-3): refused at
  ``deepspeed.initialize``; MiCS (``mics_shard_size``): refused by DeepSpeed 0.19.8 itself (removed).

One launch; ``pytest -s`` prints the differences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from adascale_shard import AdaScale
from tests.distributed.test_fsdp2 import (
    ATOL,
    LR,
    MOMENTUM,
    RTOL,
    UPDATES,
    build_model,
    diffs,
    loss_fn,
    micro_batches,
    record,
    train_reference,
)
from tests.harness import Case, error_of, run_cases

pytestmark = pytest.mark.distributed

WORLD = 2


def zero_outside_case(rank: int, world_size: int, count: int) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model("mlp")
    ddp = DDP(model)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    opt = AdaScale(zero)
    k_per_rank = count // world_size
    out: dict = {"world_size": dist.get_world_size()}
    for update in range(UPDATES):
        batches = micro_batches("mlp", update, count)[rank * k_per_rank : (rank + 1) * k_per_rank]
        for k, batch in enumerate(batches):
            if k < k_per_rank - 1:
                with ddp.no_sync():
                    (loss_fn("mlp", ddp, batch) / k_per_rank).backward()
            else:
                (loss_fn("mlp", ddp, batch) / k_per_rank).backward()
        opt.step()
        opt.zero_grad()
        record(out, opt, model)
    # Each rank's local optimizer holds the state of its partition only (ZeRO really sharded it).
    out["local_state"] = len(zero.optim.state)
    out["params"] = [p.clone() for p in out["params"]]
    return out


def refusals_case(rank: int, world_size: int) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = build_model("mlp")
    out = {
        "zero_inside": error_of(
            lambda: ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AdaScale, optimizer="SGD", lr=LR)
        )
    }
    # DeepSpeed: ZeRO++ hpZ and MiCS.
    from tests.distributed.test_deepspeed import Net, _ds_env, ds_config

    _ds_env(rank, world_size)
    import deepspeed

    import adascale_shard  # noqa: F401 - registers the type

    for name, zero_extra in (("hpz", {"zero_hpz_partition_size": 2}), ("mics", {"mics_shard_size": 2})):
        config = ds_config(3, 1)
        config["zero_optimization"].update(zero_extra)
        net = Net()
        out[name] = error_of(lambda: deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config))
    return out


COUNTS = {"acc=1": 2, "acc=2 no_sync": 4}


@pytest.fixture(scope="module")
def runs():
    assert not dist.is_initialized(), "the reference must run without a process group"
    references = {n: train_reference("mlp", n) for n in COUNTS.values()}
    cases = [Case(f"zero outside {name}", zero_outside_case, (n,)) for name, n in COUNTS.items()]
    cases.append(Case("refusals", refusals_case))
    ranks = run_cases(cases, WORLD, timeout=600, env={"DS_ACCELERATOR": "cpu"})
    return {"references": references, "ranks": ranks}


@pytest.mark.parametrize("name", list(COUNTS))
def test_zero_redundancy_optimizer_outside_equals_the_reference(runs, name):
    n = COUNTS[name]
    ref = runs["references"][n]
    rank0 = runs["ranks"][0][f"zero outside {name}"]
    relative = max(abs(p - q) / abs(q) for p, q in zip(rank0["gain"], ref["gain"]))
    print(f"\n[zero redundancy outside] {name}, N={n}, {WORLD} ranks: max relative gain difference {relative:.3g}, "
          f"|tau diff| {diffs(rank0, ref)['tau']:.3g}, |param diff| {diffs(rank0, ref)['param']:.3g}")
    for rank in range(WORLD):
        run = runs["ranks"][rank][f"zero outside {name}"]
        assert run["N"] == [float(n)] * UPDATES
        assert all(1.01 < g < n for g in run["gain"]), run["gain"]
        for key in ("gain", "tau", "var", "sqr"):
            assert len(run[key]) == UPDATES
            for update, (p, q) in enumerate(zip(run[key], ref[key])):
                assert math.isclose(p, q, rel_tol=RTOL, abs_tol=ATOL), f"{name} rank {rank}: {key}, update {update}: {p} vs {q}"
        for update, (p, q) in enumerate(zip(run["params"], ref["params"])):
            torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} rank {rank}, update {update}: {m}")
    # The MLP's 6 parameters are split over the 2 ranks: each holds momentum for its own only.
    states = [runs["ranks"][rank][f"zero outside {name}"]["local_state"] for rank in range(WORLD)]
    assert sum(states) == 6 and all(0 < s < 6 for s in states), states


def test_adascale_inside_zero_redundancy_optimizer_is_refused(runs):
    for rank in range(WORLD):
        message = runs["ranks"][rank]["refusals"]["zero_inside"]
        assert message is not None, "ZeroRedundancyOptimizer(optimizer_class=AdaScale) was accepted"
        assert message.startswith("ValueError: AdaScale was built by ZeroRedundancyOptimizer(..., optimizer_class=AdaScale)"), message
        assert "AdaScale(ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD" in message, message
        assert message.endswith("(see docs/troubleshooting.md#adascale-inside-zeroredundancyoptimizer)"), message


def test_deepspeed_hpz_is_refused_and_mics_is_refused_by_deepspeed(runs):
    for rank in range(WORLD):
        out = runs["ranks"][rank]["refusals"]
        message = out["hpz"]
        assert message is not None, "ZeRO++ hpZ was accepted"
        assert message.startswith("NotImplementedError: AdaScale does not support ZeRO++ hierarchical partitioning"), message
        assert "zero_hpz_partition_size=2" in message and "Remove zero_hpz_partition_size" in message, message
        assert message.endswith("(see docs/troubleshooting.md#zero-hpz-not-supported)"), message
        message = out["mics"]
        assert message is not None and "MiCS ZeRO-3 sharding has been removed" in message, message
