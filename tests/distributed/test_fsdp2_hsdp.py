"""FSDP2 on a 2-D (replicate, shard) mesh (HSDP) on 4 gloo ranks: AdaScale's statistics equal the
single-process ones.

The same models, data, optimizer (SGD, lr 0.05, momentum 0.9), 6 updates and single-process
reference as ``test_fsdp2.py`` (imported from there), with N micro-batches per update:

* reference: one process, no process group, N accumulation steps (loss / N);
* HSDP: 4 ranks on ``init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))``,
  ``fully_shard(..., mesh=mesh)`` on the units and the root, K = N / 4 micro-batches per rank
  (loss / K; FSDP2 averages over the 4 ranks: reduce-scatter over the 2 shards, all-reduce over the
  2 replicas), accumulation K = 1 and 2, with ``set_requires_gradient_sync(False)`` on the
  non-final micro-steps, a reduction after every backward, or ``set_requires_all_reduce(False)``
  (reduce-scatter only) on the non-final micro-steps; bf16 ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``; the tied-embedding GPT.

Gain, tau, var, sqr and the gathered parameters must equal the reference at every update, within
``test_fsdp2.py``'s tolerances. Also here: a deliberate bug (every replica's shards counted in
``||G||^2``, what summing the local DTensor shards on every rank does) misses the tolerance by far;
the replicas hold the same reduced shards; and the refusals: a divide factor of the shard size (a
sum over the replicas), a process group of one replica's ranks, and ``replicate()`` without
sharding. One launch for everything; ``pytest -s`` prints the difference table.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from adascale_shard import AdaScale
from tests.distributed._reference import assert_bf16_close, assert_matches_reference
from tests.distributed.test_fsdp2 import (
    ATOL,
    BF16_GAIN_RTOL,
    BF16_PARAM_ATOL,
    LR,
    MOMENTUM,
    RTOL,
    UPDATES,
    build_model,
    diffs,
    loss_fn,
    micro_batches,
    nan_max,
    record,
    train_reference,
)
from tests.harness import Case, error_of, run_cases

pytestmark = pytest.mark.distributed

WORLD, REPLICAS, SHARDS = 4, 2, 2


def hsdp_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (REPLICAS, SHARDS), mesh_dim_names=("replicate", "shard"))


def build_hsdp(kind: str, *, bf16: bool = False, mesh=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else hsdp_mesh()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    model = build_model(kind)
    for unit in model.units():
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    return model, opt


def local_grad_sqr(model) -> float:
    """This rank's sum of squares of its local gradient shards (every parameter)."""
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            total += float(p.grad.to_local().double().square().sum())
    return total


def hsdp_case(rank: int, world_size: int, opts: dict) -> dict:
    kind, count, mode = opts["model"], opts["micro_batches"], opts["mode"]
    model, opt = build_hsdp(kind, bf16=opts["bf16"])
    if opts["attach"]:
        opt.attach(model)
    if opts.get("bug"):
        opt._engine.hooks.replica_copies = set()  # a deliberate bug: every replica's shards counted
    k_per_rank = count // world_size
    out: dict = {"world_size": dist.get_world_size(), "local_grad_sqr": []}
    for update in range(UPDATES):
        batches = micro_batches(kind, update, count)[rank * k_per_rank : (rank + 1) * k_per_rank]
        for k, batch in enumerate(batches):
            last = k == k_per_rank - 1
            if mode == "no_sync":
                model.set_requires_gradient_sync(last)
            elif mode == "no_all_reduce":
                model.set_requires_all_reduce(last)
            (loss_fn(kind, model, batch) / k_per_rank).backward()
        out["local_grad_sqr"].append(local_grad_sqr(model))
        opt.step()
        opt.zero_grad()
        record(out, opt, model)
    out["hooked"] = opt._engine.hooks.num_hooked
    out["replica_copies"] = len(opt._engine.hooks.replica_copies)
    return out


def refusals_case(rank: int, world_size: int) -> dict:
    """What AdaScale refuses on FSDP2 layouts that are not exact."""
    from torch.distributed.device_mesh import init_device_mesh

    out: dict = {}
    mesh = hsdp_mesh()
    # A divide factor of the shard size: FSDP2 then sums over the replicas (2 x the mean).
    model, opt = build_hsdp("mlp", mesh=mesh)
    model.set_gradient_divide_factor(float(SHARDS))
    out["divide_factor"] = error_of(lambda: opt.attach(model))
    # ... and the factor that is the mean over the 4 ranks is accepted.
    model, opt = build_hsdp("mlp", mesh=mesh)
    model.set_gradient_divide_factor(float(WORLD))
    out["divide_factor_world"] = error_of(lambda: opt.attach(model))
    # AdaScale's process group: the shard group (2 ranks) instead of all 4.
    model, _ = build_hsdp("mlp", mesh=mesh)
    opt = AdaScale(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), process_group=mesh.get_group("shard")
    )
    out["process_group"] = error_of(lambda: opt.attach(model))
    # replicate() (FSDP2's DDP: DDPMeshInfo, no shard dim).
    from torch.distributed._composable.replicate_with_fsdp import replicate

    model = build_model("mlp")
    replicate(model, mesh=init_device_mesh("cpu", (WORLD,), mesh_dim_names=("replicate",)))
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    out["replicate"] = error_of(lambda: opt.attach(model))
    return out


def case(model="mlp", n=8, mode="no_sync", bf16=False, attach=True) -> dict:
    return {"model": model, "micro_batches": n, "mode": mode, "bf16": bf16, "attach": attach}


HSDP_CASES = {
    "mlp N=4 acc=1": case(n=4, mode="sync"),
    "mlp N=8 acc=2 no_sync": case(),
    "mlp N=8 acc=2 sync": case(mode="sync"),
    "mlp N=8 acc=2 no_all_reduce": case(mode="no_all_reduce"),
    "mlp N=8 acc=2 no_sync auto-attach": case(attach=False),
    "gpt N=4 acc=1": case(model="gpt", n=4, mode="sync"),
    "gpt N=8 acc=2 no_sync": case(model="gpt"),
    "mlp N=8 acc=2 no_sync bf16": case(bf16=True),
    "gpt N=4 acc=1 bf16": case(model="gpt", n=4, mode="sync", bf16=True),
}


@pytest.fixture(scope="module")
def runs():
    assert not dist.is_initialized(), "the reference must run without a process group"
    references = {(kind, n): train_reference(kind, n) for kind in ("mlp", "gpt") for n in (4, 8)}
    cases = [Case(name, hsdp_case, (opts,)) for name, opts in HSDP_CASES.items()]
    cases += [
        Case("bug: every replica counted", hsdp_case, ({**case(), "bug": True},)),
        Case("refusals", refusals_case),
    ]
    start = time.perf_counter()
    ranks = run_cases(cases, WORLD, timeout=600)
    print(f"\n[fsdp2 hsdp] one launch of {len(cases)} cases on {WORLD} ranks: {time.perf_counter() - start:.1f} s")
    return {"references": references, "ranks": ranks}


def reference_for(runs, name: str) -> dict:
    opts = HSDP_CASES[name]
    return runs["references"][(opts["model"], opts["micro_batches"])]


def relative_gain_diff(run: dict, ref: dict) -> float:
    return nan_max(abs(p - q) / abs(q) for p, q in zip(run["gain"], ref["gain"]))


def test_difference_table(runs):
    lines = [f"{'case':40s} {'max rel gain diff':>18s} {'|tau diff|':>11s} {'|param diff|':>13s}  gains"]
    for name in HSDP_CASES:
        run, ref = runs["ranks"][0][name], reference_for(runs, name)
        for key in ("gain", "tau", "params"):
            assert len(run[key]) == len(ref[key]) == UPDATES, (name, key)
        d = diffs(run, ref)
        gains = ", ".join(f"{g:.3f}" for g in run["gain"][:3])
        lines.append(f"{name:40s} {relative_gain_diff(run, ref):18.3g} {d['tau']:11.3g} {d['param']:13.3g}  {gains}, ...")
    print(f"\n[fsdp2 hsdp] {REPLICAS} replicas x {SHARDS} shards, {WORLD} gloo ranks, {UPDATES} updates: largest "
          "difference to the single-process reference\n" + "\n".join(lines))


@pytest.mark.parametrize("name", [n for n in HSDP_CASES if "bf16" not in n])
def test_hsdp_equals_single_process_reference(runs, name):
    ref = reference_for(runs, name)
    n = float(HSDP_CASES[name]["micro_batches"])
    for rank in range(WORLD):
        run = runs["ranks"][rank][name]
        assert run["world_size"] == WORLD
        assert_matches_reference(f"{name} rank {rank}", run, ref, n, UPDATES, RTOL, ATOL)


@pytest.mark.parametrize("name", [n for n in HSDP_CASES if "bf16" in n])
def test_hsdp_bf16_mixed_precision_close_to_fp32_reference(runs, name):
    run, ref = runs["ranks"][0][name], reference_for(runs, name)
    assert_bf16_close(name, run, ref, UPDATES, BF16_GAIN_RTOL, BF16_PARAM_ATOL)


def test_every_rank_agrees_and_replicas_hold_the_same_shards(runs):
    # init_device_mesh's (2, 2) layout: ranks 0, 1 are replica 0 (shards 0, 1); ranks 2, 3 replica 1.
    for name, opts in HSDP_CASES.items():
        per_rank = [runs["ranks"][r][name] for r in range(WORLD)]
        for key in ("gain", "tau", "var", "sqr"):
            assert all(run[key] == per_rank[0][key] for run in per_rank), (name, key)
        for shard in range(SHARDS):
            assert per_rank[shard]["local_grad_sqr"] == per_rank[SHARDS + shard]["local_grad_sqr"], (name, shard)
        expected = len(list(build_model(opts["model"]).parameters()))
        assert [run["hooked"] for run in per_rank] == [expected] * WORLD, name
        # Replicate-rank 0 (ranks 0, 1) counts its shards in ||G||^2, replicate-rank 1 none.
        assert [run["replica_copies"] > 0 for run in per_rank] == [False, False, True, True], name


def test_tolerance_catches_counting_every_replica(runs):
    """Summing every rank's local shard squares (each shard counted once per replica: ||G||^2 x 2)
    misses the tolerance by far."""
    name = "mlp N=8 acc=2 no_sync"
    bug = runs["ranks"][0]["bug: every replica counted"]
    rel = relative_gain_diff(bug, reference_for(runs, name))
    print(f"\n[fsdp2 hsdp] every replica's shards counted: max relative gain difference {rel:.3g}")
    assert rel > 1000 * RTOL


def test_refusals_name_the_setting_and_the_fix(runs):
    for rank in range(WORLD):
        out = runs["ranks"][rank]["refusals"]
        message = out["divide_factor"]
        assert message.startswith("ValueError: ") and "set_gradient_divide_factor(2.0)" in message, message
        assert "average over the 4 ranks" in message, message
        assert message.endswith("(see docs/troubleshooting.md#fsdp2-gradient-divide-factor)"), message
        assert out["divide_factor_world"] is None, out["divide_factor_world"]
        message = out["process_group"]
        assert message.startswith("ValueError: AdaScale's process group has 2 ranks"), message
        assert "2 replicas x 2 shards = 4 ranks" in message, message
        assert message.endswith("(see docs/troubleshooting.md#fsdp2-process-group-differs)"), message
        message = out["replicate"]
        assert message is not None, "replicate() was accepted"
        assert message.startswith("NotImplementedError: AdaScale on FSDP2 supports a 1-D device mesh"), message
        assert "replicate() without sharding (DDPMeshInfo)" in message, message
        assert message.endswith("(see docs/troubleshooting.md#fsdp2-mesh-layout-not-supported)"), message
