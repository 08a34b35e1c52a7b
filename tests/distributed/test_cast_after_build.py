"""AdaScale built before the model is cast or moved, with the real engines on 2 gloo ranks.

On a GPU machine the model is often cast or moved after the optimizer was built:
``deepspeed.initialize(model=..., optimizer=AdaScale(...))`` casts every parameter with
``p.data = p.data.to(bf16)``, Accelerate's ``prepare`` (and many scripts) call ``model.to(device)``.
Both replace each parameter's gradient-accumulator node (``tests/unit/test_cast_after_build.py`` is
the one-process version). On this CPU-only machine a dtype cast is the proxy of a device move: the
same ``p.data`` assignment, a new accumulator node, gradients of another kind than the statistics
slots were made for.

Each case trains the same model on the same micro-batches (rank ``r`` takes micro-batches
``r*K .. r*K+K-1`` of each update, K = ``ACCUMULATION``) with AdaScale built before the cast and
with AdaScale built after it, and the two runs are compared update by update (gain, tau, the
statistics, the parameters), with every backward pass recorded (``stats()["N"]`` = 2 ranks x K):

* DeepSpeed's Python path under bf16, ZeRO-0/1/2/3: ``AdaScale(...)`` then ``deepspeed.initialize(
  optimizer=...)`` against ``"optimizer": {"type": "AdaScale"}`` in the JSON (built by DeepSpeed
  after its cast) and against the Python path with the user's own cast first;
* Accelerate's DeepSpeed plugin (bf16, ZeRO-2 and ZeRO-3): an AdaScale handed to ``prepare``
  against ``DummyOptim`` with the JSON's AdaScale;
* Accelerate's DDP ``prepare`` and plain ``DistributedDataParallel``, the model cast to float64
  after AdaScale was built (the CPU proxy of ``model.to("cuda")``) against AdaScale built after.

One launch, 30-40 s on 2 cores. ``pytest -s`` prints the largest differences.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from tests.harness import Case, run_cases

pytestmark = pytest.mark.distributed

D_IN, HIDDEN, MICRO_BATCH = 8, 24, 8
UPDATES = 4
ACCUMULATION = 2
WORLD = 2
LR, MOMENTUM = 0.05, 0.9
STAGES = (0, 1, 2, 3)
ACCELERATE_STAGES = (2, 3)
# Same kernels, same gradients: measured bitwise; float64 slot sums may be reordered (2e-16 seen); bf16 noise ~1e-3.
STAT_RTOL = 1e-12


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


HAVE_DEEPSPEED = _have("deepspeed")
HAVE_ACCELERATE = _have("accelerate")


# ---------------------------------------------------------------------------------------------
# Model and data, identical in every process.
# ---------------------------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(D_IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def micro_batch(update: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * update + index)
    return torch.randn(MICRO_BATCH, D_IN, generator=gen), torch.randn(MICRO_BATCH, 1, generator=gen)


def _cast_to_float64(model: torch.nn.Module, built: str):
    """Cast ``model`` to float64 (the CPU proxy of ``model.to("cuda")``) with AdaScale built
    ``"before"`` or ``"after"`` the cast; returns the AdaScale."""
    from adascale_shard import AdaScale

    if built == "after":
        model.to(torch.float64)
    optimizer = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    if built == "before":
        model.to(torch.float64)
    return optimizer


def _record(out: dict, adascale, params: list[torch.Tensor]) -> None:
    stats = adascale.stats()
    for key in ("gain", "tau", "var", "sqr", "N", "dropped_windows", "nonfinite_updates"):
        out.setdefault(key, []).append(stats[key])
    out.setdefault("params", []).append([p.detach().clone() for p in params])


def _dist_env(rank: int, world: int) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29597")


# ---------------------------------------------------------------------------------------------
# DeepSpeed (bf16): the Python path, AdaScale built before deepspeed.initialize's cast.
# ---------------------------------------------------------------------------------------------
def ds_config(stage: int, *, json_optimizer: bool) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if json_optimizer:
        config["optimizer"] = {"type": "AdaScale", "params": {"optimizer": "SGD", "lr": LR, "momentum": MOMENTUM}}
    return config


def _deepspeed_run(rank: int, engine, adascale, stage: int, step) -> dict:
    """Train; per update the statistics, AdaScale's own parameters (the wrapper's fp32 master
    partition of this rank) and the module's bf16 parameters (gathered under ZeRO-3)."""
    import deepspeed

    import adascale_shard

    assert isinstance(adascale, adascale_shard.AdaScale), type(adascale)
    out: dict = {"wrapper": type(engine.optimizer).__name__, "module_params": []}
    for u in range(UPDATES):
        for k in range(ACCUMULATION):
            x, y = micro_batch(u, rank * ACCUMULATION + k)
            step(torch.nn.functional.mse_loss(engine(x.to(torch.bfloat16)).float(), y))
        _record(out, adascale, [p for group in adascale.param_groups for p in group["params"]])
        params = list(engine.module.parameters())
        context = deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext()
        with context:
            out["module_params"].append([p.detach().float().clone() for p in params])
    out["module_dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
    return out


def deepspeed_case(rank: int, world: int, stage: int, built: str) -> dict:
    """``built``: ``"before"`` (AdaScale, then ``deepspeed.initialize`` casts), ``"cast_first"``
    (the user casts to bf16, then AdaScale, then ``initialize``), ``"json"`` (DeepSpeed builds it
    from ``"optimizer": {"type": "AdaScale"}`` after its cast)."""
    _dist_env(rank, world)
    import deepspeed

    from adascale_shard import AdaScale

    model = Net()
    if built == "json":
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config(stage, json_optimizer=True)
        )
    else:
        if built == "cast_first":
            model.to(torch.bfloat16)
        optimizer = AdaScale(model.parameters(), optimizer="SGD", lr=LR, momentum=MOMENTUM)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(stage, json_optimizer=False)
        )

    def step(loss):
        engine.backward(loss)
        engine.step()

    return _deepspeed_run(rank, engine, engine.basic_optimizer, stage, step)


# ---------------------------------------------------------------------------------------------
# Accelerate: DeepSpeed plugin (bf16) and DDP.
# ---------------------------------------------------------------------------------------------
def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_deepspeed_case(rank: int, world: int, stage: int, built: str) -> dict:
    """``built``: ``"before"`` (an AdaScale handed to ``prepare``, which casts through
    ``deepspeed.initialize``) or ``"json"`` (``DummyOptim``; DeepSpeed builds AdaScale after its cast)."""
    _dist_env(rank, world)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    from adascale_shard import AdaScale, unwrap

    try:
        _reset_accelerate()
        config = ds_config(stage, json_optimizer=built == "json")
        plugin = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)
        accelerator = Accelerator(
            deepspeed_plugin=plugin, mixed_precision="bf16", gradient_accumulation_steps=ACCUMULATION
        )
        model = Net()
        if built == "json":
            optimizer = DummyOptim(model.parameters(), lr=LR)
        else:
            optimizer = AdaScale(model.parameters(), optimizer="SGD", lr=LR, momentum=MOMENTUM)
        engine, prepared = accelerator.prepare(model, optimizer)
        adascale = unwrap(prepared)
        assert adascale is unwrap(accelerator) is engine.basic_optimizer
        if built == "before":
            assert adascale is optimizer

        def step(loss):
            with accelerator.accumulate(engine):
                accelerator.backward(loss)
                prepared.step()
                prepared.zero_grad()

        return _deepspeed_run(rank, engine, adascale, stage, step)
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        _reset_accelerate()


def accelerate_ddp_case(rank: int, world: int, built: str) -> dict:
    """``built``: ``"before"`` (AdaScale, then ``model.to(float64)``, then ``prepare``) or
    ``"after"`` (the cast, then AdaScale, then ``prepare``)."""
    _dist_env(rank, world)
    from accelerate import Accelerator

    from adascale_shard import unwrap

    try:
        _reset_accelerate()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
        model = Net()
        optimizer = _cast_to_float64(model, built)
        wrapped, prepared = accelerator.prepare(model, optimizer)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)
        adascale = unwrap(prepared)
        assert adascale is optimizer
        out: dict = {}
        for u in range(UPDATES):
            for k in range(ACCUMULATION):
                x, y = micro_batch(u, rank * ACCUMULATION + k)
                with accelerator.accumulate(wrapped):
                    loss = torch.nn.functional.mse_loss(wrapped(x.double()), y.double())
                    accelerator.backward(loss)
                    prepared.step()
                    prepared.zero_grad()
            _record(out, adascale, list(model.parameters()))
        return out
    finally:
        _reset_accelerate()


# ---------------------------------------------------------------------------------------------
# Plain DDP.
# ---------------------------------------------------------------------------------------------
def ddp_case(rank: int, world: int, built: str) -> dict:
    """``built``: ``"before"`` (AdaScale, ``model.to(float64)``, then ``DistributedDataParallel``)
    or ``"after"`` (the cast, then AdaScale, then DDP)."""
    from torch.nn.parallel import DistributedDataParallel


    model = Net()
    optimizer = _cast_to_float64(model, built)
    ddp = DistributedDataParallel(model)
    out: dict = {}
    for u in range(UPDATES):
        for k in range(ACCUMULATION):
            x, y = micro_batch(u, rank * ACCUMULATION + k)
            sync = ddp.no_sync() if k < ACCUMULATION - 1 else contextlib.nullcontext()
            with sync:
                (torch.nn.functional.mse_loss(ddp(x.double()), y.double()) / ACCUMULATION).backward()
        optimizer.step()
        optimizer.zero_grad()
        _record(out, optimizer, list(model.parameters()))
    return out


# ---------------------------------------------------------------------------------------------
# One launch for every case.
# ---------------------------------------------------------------------------------------------
DEEPSPEED_BUILDS = ("before", "cast_first", "json")


def _cases() -> list[Case]:
    # The cases without DeepSpeed first: a ZeRO-3 engine leaves torch.nn.functional.linear patched
    # (zero3_linear_wrap) in its process, which changes the order the hooks fire in.
    cases = [Case(f"ddp_{built}", ddp_case, (built,)) for built in ("before", "after")]
    if HAVE_ACCELERATE:
        cases += [Case(f"accelerate_ddp_{built}", accelerate_ddp_case, (built,)) for built in ("before", "after")]
    if HAVE_DEEPSPEED:
        cases += [Case(f"ds_zero{s}_{b}", deepspeed_case, (s, b)) for s in STAGES for b in DEEPSPEED_BUILDS]
    if HAVE_ACCELERATE and HAVE_DEEPSPEED:
        cases += [
            Case(f"accelerate_zero{s}_{b}", accelerate_deepspeed_case, (s, b))
            for s in ACCELERATE_STAGES
            for b in ("before", "json")
        ]
    return cases


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_cases(_cases(), WORLD, timeout=600, env={"DS_ACCELERATOR": "cpu"})


def _compare(results: list[dict], got_name: str, want_name: str) -> dict[str, float]:
    """Assert ``got_name`` equals ``want_name`` on every rank and update, within ``STAT_RTOL``;
    return the largest differences (relative for the statistics, absolute for the parameters)."""
    worst = {"gain": 0.0, "tau": 0.0, "var": 0.0, "sqr": 0.0, "params": 0.0}
    for rank, per_rank in enumerate(results):
        got, want = per_rank[got_name], per_rank[want_name]
        # Every backward pass recorded, none dropped, in both runs.
        assert got["N"] == want["N"] == [float(WORLD * ACCUMULATION)] * UPDATES, (rank, got["N"], want["N"])
        assert got["dropped_windows"] == want["dropped_windows"] == [0.0] * UPDATES
        assert got["nonfinite_updates"] == [0.0] * UPDATES
        for key in ("gain", "tau", "var", "sqr"):
            assert got[key] == pytest.approx(want[key], rel=STAT_RTOL), (key, rank)
            worst[key] = max(
                worst[key], *(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(got[key], want[key]))
            )
        for key in ("params", "module_params"):
            if key not in want:
                continue
            for u, (ps, qs) in enumerate(zip(got[key], want[key])):
                assert len(ps) == len(qs)
                for p, q in zip(ps, qs):
                    assert p.dtype == q.dtype and p.shape == q.shape
                    worst["params"] = max(worst["params"], (p - q).abs().max().item() if p.numel() else 0.0)
                    torch.testing.assert_close(p, q, rtol=STAT_RTOL, atol=STAT_RTOL, msg=f"{key} {rank} {u}")
    assert results[0][got_name]["gain"] == results[1][got_name]["gain"]  # the ranks agree
    assert results[0][got_name]["gain"][-1] > 1.2  # informative: far from the identity limit
    table = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    print(f"\n{got_name} vs {want_name}: max {table} (relative; params absolute)")
    return worst


@pytest.mark.parametrize("built", ["before", "cast_first"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed not installed")
def test_deepspeed_python_path_equals_the_json_path(results, stage, built):
    """AdaScale handed to ``deepspeed.initialize`` (built before its bf16 cast, or after the user's
    own cast) takes the same updates as the one DeepSpeed builds from the JSON after its cast."""
    for name in (f"ds_zero{stage}_json", f"ds_zero{stage}_{built}"):
        assert results[0][name]["module_dtypes"] == ["torch.bfloat16"], name
    _compare(results, f"ds_zero{stage}_{built}", f"ds_zero{stage}_json")


@pytest.mark.parametrize("stage", ACCELERATE_STAGES)
@pytest.mark.skipif(not (HAVE_DEEPSPEED and HAVE_ACCELERATE), reason="accelerate or deepspeed not installed")
def test_accelerate_deepspeed_prepare_after_build(results, stage):
    """Accelerate's DeepSpeed plugin under bf16: an AdaScale handed to ``prepare`` (cast inside it)
    equals ``DummyOptim`` with the JSON's AdaScale, and both equal plain DeepSpeed's JSON run."""
    for built in ("before", "json"):
        assert results[0][f"accelerate_zero{stage}_{built}"]["module_dtypes"] == ["torch.bfloat16"], built
    _compare(results, f"accelerate_zero{stage}_before", f"accelerate_zero{stage}_json")
    _compare(results, f"accelerate_zero{stage}_json", f"ds_zero{stage}_json")


@pytest.mark.skipif(not HAVE_ACCELERATE, reason="accelerate not installed")
def test_accelerate_ddp_prepare_after_a_cast(results):
    _compare(results, "accelerate_ddp_before", "accelerate_ddp_after")
    _compare(results, "accelerate_ddp_after", "ddp_after")  # Accelerate's DDP is plain DDP


def test_ddp_after_a_cast(results):
    _compare(results, "ddp_before", "ddp_after")
