"""AdaScale's device-sensitive checks, on CUDA (or, with ``--cpu``, the same code on the CPU).

Run it through ``bash scripts/gpu_check.sh`` (which picks a Python whose torch sees the GPU);
``docs/gpu.md`` says what each row means. Every check trains a tiny MLP on 2 ranks x 2
accumulation steps (N = 4 micro-batches per update) and compares the gain of every update with a
single-process fp32 AdaScale fed the same N micro-batches (computed here, on the CPU, with no
process group):

* DDP; FSDP2 (``fully_shard``) in fp32 and with a bf16 ``MixedPrecisionPolicy``; DeepSpeed
  ZeRO-0/1/2/3 in fp16 (dynamic loss scale from 2^8, growing every 2 clean updates) and bf16;
* AdaScale built *before* the model is moved (plain DDP, and DeepSpeed's Python path
  ``deepspeed.initialize(model=..., optimizer=AdaScale(...))``): every backward pass recorded
  (``stats()["N"] == 2 x 2``), gains equal to AdaScale built after the move, and the statistics
  on the GPU afterwards;
* ``benchmarks/overhead.py --device cuda`` on the GPT-2 workload, briefly: AdaScale's time per
  update against the plain optimizer (informational).

Ranks: 2, sharing one GPU over gloo (NCCL refuses two ranks on one GPU; gloo all-reduces CUDA
tensors through pinned host copies), or one GPU each over NCCL when 2+ GPUs are visible. On the
CPU (``--cpu``): gloo, the move becomes a cast to float64, and DeepSpeed's fp16 capability check
is lifted inside the worker processes (its CPU accelerator says no, the fp16 wrappers run).

Prints one table; exit code 0 when every check passes, 1 when any fails (or could not run),
2 when none failed but some were skipped (DeepSpeed not importable, the time budget).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORLD = 2
ACCUMULATION = 2
NUM_MICRO = WORLD * ACCUMULATION  # N = S: the gain lies in [1, 4]
D_IN, HIDDEN, MICRO_BATCH = 8, 24, 8
LR, MOMENTUM = 0.05, 0.9
UPDATES, QUICK_UPDATES = 6, 3
FP16 = {  # dynamic loss scale: 2^8 at first, doubled after every 2 updates without overflow
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 8,
    "loss_scale_window": 2,
    "hysteresis": 1,
    "min_loss_scale": 1,
}

# Tolerances on |gain - reference gain| (gains lie in [1, 4] here; a normalisation bug, a factor
# of K, of the world size or of the loss scale in a squared norm, moves the gain by 0.3 or more).
#
# fp32 (DDP, FSDP2): the reference sums the same N micro-gradients in one process in another
# order, and on a GPU its matrix products run on the CPU: the GPU's kernels associate the sums
# differently (TF32 is switched off), so each gradient differs by a few float32 ulps (1e-7
# relative); the statistics' var ~ A - B amplifies that by A / (A - B) ~ 3 here, and the
# trajectories (lr 0.05 x gain, momentum 0.9) carry it over 6 updates. Measured on the CPU:
# 1.3e-7 (DDP), 1.8e-7 (FSDP2). 1e-4 leaves a factor of ~500 for the GPU's reordering and is
# still 3000x below a bug.
FP32_TOL = 1e-4
# bf16 (FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); DeepSpeed bf16): forward
# and backward run in bf16 (8-bit mantissa, unit roundoff 2^-8 = 3.9e-3), against an fp32
# reference whose weights and inputs are rounded to bf16 the same way, with lr 0 so that both see
# the same weights at every update. What is left is bf16 rounding of the activations and the
# micro-gradients: each squared norm is off by ~1e-2 relative and var ~ A - B amplifies it.
# Measured on the CPU (this script, 6 updates): 4.5e-3 (FSDP2), 6.8e-3 (ZeRO-0..3). 3e-2 keeps 4x
# headroom for the GPU's bf16 kernels, which round inside their sums differently, and is 10x
# below a bug.
BF16_TOL = 3e-2
# fp16 (DeepSpeed ZeRO-0/1/2/3, dynamic loss scale): 11 significant bits (unit roundoff 2^-11 =
# 4.9e-4), 8x finer than bf16, same protocol (lr 0, reference rounded to fp16). AdaScale divides
# the loss scale out of the hooked squares; a scale left in (or the new scale after a growth used
# for the old one) is a factor 4 in a squared norm: a gain error of the order of 1.
# Measured on the CPU: 5.8e-4 (ZeRO-0/1), 1.1e-3 (ZeRO-2/3). 1e-2 is 10x above that and 30x below
# a bug.
FP16_TOL = 1e-2
# AdaScale built before the move against AdaScale built after it, same device, same gradients:
# the same norm kernels on the same gradients, the statistics slots possibly summed in another
# order (float64): equal to ~1e-15. 1e-9 allows only that.
MOVE_TOL = 1e-9
#: The reference gains must move away from 1 for the comparison to say anything.
MIN_INFORMATIVE_GAIN = 1.3


# ---------------------------------------------------------------------------------------------
# Model and data: identical in every process (CPU generators, then moved).
# ---------------------------------------------------------------------------------------------
def _model():
    import torch

    class MLP(torch.nn.Module):
        """Three layers; fc3's bias has one element, so rank 1's FSDP2 shard of it is empty."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = torch.nn.Linear(D_IN, HIDDEN)
            self.fc2 = torch.nn.Linear(HIDDEN, HIDDEN)
            self.fc3 = torch.nn.Linear(HIDDEN, 1)

        def forward(self, x):
            return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    return MLP()


def micro_batch(update: int, index: int):
    import torch

    gen = torch.Generator().manual_seed(1000 * update + index + 7)
    return torch.randn(MICRO_BATCH, D_IN, generator=gen), torch.randn(MICRO_BATCH, 1, generator=gen)


def reference(updates: int, lr: float, round_to: str | None = None) -> list[float]:
    """One process, no torch.distributed, fp32 on the CPU: all N micro-batches of each update
    accumulated (loss / N). ``round_to`` ("fp16", "bf16") rounds the weights and the inputs to
    that dtype first (the low-precision runs see those values)."""
    import torch

    from adascale_shard import AdaScale

    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(round_to)
    model = _model()
    if low is not None:
        for p in model.parameters():
            p.data = p.data.to(low).float()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM))
    gains = []
    for u in range(updates):
        for i in range(NUM_MICRO):
            x, y = micro_batch(u, i)
            if low is not None:
                x = x.to(low).float()
            (torch.nn.functional.mse_loss(model(x), y) / NUM_MICRO).backward()
        opt.step()
        opt.zero_grad()
        gains.append(opt.gain())
    return gains


# ---------------------------------------------------------------------------------------------
# Workers: run in each rank by tests/harness.py (module-level, pickled by reference).
# ---------------------------------------------------------------------------------------------
def _device(rank: int, spec: dict):
    """This rank's device: cuda:(rank % GPUs) (2 ranks share GPU 0 on a 1-GPU machine)."""
    import torch

    if spec["device"] != "cuda":
        return torch.device("cpu")
    index = rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    # fp32 means fp32: no TF32 matrix products (the reference has none).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda", index)


def _moved_dtype(spec: dict, engine: str = "ddp"):
    """The parameters' dtype after the move: float32 on CUDA; on the CPU the proxy's cast,
    float64, or bfloat16 under DeepSpeed (its reducer takes no float64 gradients)."""
    import torch

    if spec["device"] == "cuda":
        return torch.float32
    return torch.bfloat16 if engine == "deepspeed" else torch.float64


def _move(model, spec: dict, device, engine: str = "ddp") -> None:
    """The move AdaScale must survive: ``model.to("cuda")``; on the CPU its proxy, a dtype cast
    (the same ``p.data`` assignment, a new gradient accumulator per parameter)."""
    model.to(device if spec["device"] == "cuda" else _moved_dtype(spec, engine))


def _record_update(out: dict, opt) -> None:
    out["gain"].append(opt.gain())
    out["N"].append(opt.stats()["N"])


def _capture_facts(opt) -> dict:
    capture = opt._capture
    return {
        "stats_device": str(capture.device),
        "slot_dtypes": sorted({str(chunk.norms.dtype) for chunk in capture._chunks}),
    }


def ddp_worker(rank: int, world: int, spec: dict) -> dict:
    """DDP, ``no_sync`` on the first micro-step. ``spec["move"]``: "none" (model on the device,
    then AdaScale), "before" (AdaScale, then the move) or "after" (the move, then AdaScale)."""
    import torch

    from adascale_shard import AdaScale

    device = _device(rank, spec)
    model = _model()
    dtype = torch.float32

    def build():
        return AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))

    if spec["move"] == "none":
        model.to(device)
        opt = build()
    elif spec["move"] == "before":
        opt = build()
        _move(model, spec, device)
        dtype = _moved_dtype(spec)
    else:
        _move(model, spec, device)
        opt = build()
        dtype = _moved_dtype(spec)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    out = {"gain": [], "N": []}
    for u in range(spec["updates"]):
        for k in range(ACCUMULATION):
            x, y = micro_batch(u, rank * ACCUMULATION + k)
            with ddp.no_sync() if k < ACCUMULATION - 1 else nullcontext():
                loss = torch.nn.functional.mse_loss(ddp(x.to(device, dtype)), y.to(device, dtype))
                (loss / ACCUMULATION).backward()
        opt.step()
        opt.zero_grad()
        _record_update(out, opt)
    out.update(_capture_facts(opt))
    out["param_device"] = str(next(model.parameters()).device)
    return out


def _reduce_scatter_avg_works(device) -> bool:
    """Whether this process group's reduce_scatter_tensor(AVG) averages. gloo's summed instead
    in some torch releases (pytorch/pytorch#162338): FSDP2 then gets twice the gradient."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    rank = dist.get_rank()
    inp = torch.full((2 * world,), float(rank + 1), device=device)
    out = torch.zeros(2, device=device)
    try:
        dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.AVG)
    except Exception:  # noqa: BLE001 - AVG refused: FSDP2 must sum and divide itself
        return False
    return bool(torch.allclose(out.cpu(), torch.full((2,), (world + 1) / 2)))


def fsdp2_worker(rank: int, world: int, spec: dict) -> dict:
    """FSDP2: fc1, fc2 and the root as ``fully_shard`` units on a 1-D mesh of the device type,
    ``set_requires_gradient_sync(False)`` on the first micro-step; ``spec["dtype"]`` "bf16" adds
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (and lr 0)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from adascale_shard import AdaScale

    device = _device(rank, spec)
    mesh = init_device_mesh(device.type, (world,))
    bf16 = spec["dtype"] == "bf16"
    model = _model().to(device)
    kwargs = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = [model.fc1, model.fc2, model]
    for unit in units:
        fully_shard(unit, **kwargs)
    notes = []
    if not _reduce_scatter_avg_works(device):
        if all(hasattr(unit, "set_force_sum_reduction_for_comms") for unit in units):
            for unit in units:
                unit.set_force_sum_reduction_for_comms(True)
            notes.append("this torch's reduce_scatter AVG does not average: FSDP2 set to sum, then divide")
        else:  # the gradients will be summed, not averaged: the row fails and says why
            notes.append(
                "this torch's reduce_scatter AVG does not average (pytorch/pytorch#162338) and it has no "
                "set_force_sum_reduction_for_comms: FSDP2's gradients are summed, not AdaScale's fault"
            )
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.0 if bf16 else LR, momentum=MOMENTUM))
    opt.attach(model)
    out = {"gain": [], "N": [], "notes": notes}
    for u in range(spec["updates"]):
        for k in range(ACCUMULATION):
            model.set_requires_gradient_sync(k == ACCUMULATION - 1)
            x, y = micro_batch(u, rank * ACCUMULATION + k)
            loss = torch.nn.functional.mse_loss(model(x.to(device)).float(), y.to(device))
            (loss / ACCUMULATION).backward()
        opt.step()
        opt.zero_grad()
        _record_update(out, opt)
    out.update(_capture_facts(opt))
    return out


def _ds_config(stage: int, dtype: str, lr: float, optimizer_block: bool) -> dict:
    zero = {"stage": stage}
    if stage >= 2:  # as configs/zero2.json and zero3.json ship
        zero.update(overlap_comm=True, contiguous_gradients=True)
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if dtype == "fp16":
        config["fp16"] = dict(FP16)
    elif dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if optimizer_block:
        config["optimizer"] = {"type": "AdaScale", "params": {"optimizer": "SGD", "lr": lr, "momentum": MOMENTUM}}
    return config


def deepspeed_worker(rank: int, world: int, spec: dict) -> dict:
    """DeepSpeed ZeRO-``spec["stage"]``. ``spec["path"]``: "json" (``"optimizer": {"type":
    "AdaScale"}`` in the config) or "python" (``deepspeed.initialize(model=m,
    optimizer=AdaScale(...))``, AdaScale built before (``spec["move"] == "before"``) or after the
    model's move)."""
    import torch

    device = _device(rank, spec)
    os.environ.update(
        {
            "RANK": str(rank),
            # DeepSpeed's engine places itself on cuda:LOCAL_RANK: the GPU this rank uses.
            "LOCAL_RANK": str(device.index if device.type == "cuda" else rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
        }
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29597")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import adascale_shard  # noqa: F401 - registers "type": "AdaScale"
    from adascale_shard import AdaScale

    from adascale_shard.engines import deepspeed as integration

    dtype = spec["dtype"]
    if dtype == "fp16" and spec["device"] == "cpu":
        # DeepSpeed's CPU accelerator calls fp16 unsupported, but the fp16 wrappers are plain
        # torch and run on the CPU: lift the capability check in this worker process only.
        get_accelerator().is_fp16_supported = lambda: True
    lr = LR if dtype == "fp32" else 0.0
    model = _model()
    if spec["path"] == "refusal":  # ZeRO-0 + fp16 must be refused at initialize, naming the fix
        config = _ds_config(spec["stage"], dtype, lr, optimizer_block=True)
        try:
            deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        except ValueError as err:
            return {"refused": str(err)}
        return {"refused": None}
    refuse = getattr(integration, "refuse_unscaled_fp16_step", None)
    if spec.get("lift_refusal") and refuse is not None:
        # ZeRO-0 fp16 is refused because DeepSpeed's own step is off by the loss scale (lr 0 here
        # makes that moot); lifted, as tests/distributed/test_deepspeed_fp16.py does, to keep
        # AdaScale's statistics on this wrapper checked.
        integration.refuse_unscaled_fp16_step = lambda engine, wrapper: None
    try:
        if spec["path"] == "json":
            config = _ds_config(spec["stage"], dtype, lr, optimizer_block=True)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            in_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
        else:

            def build():
                return AdaScale(model.parameters(), optimizer="SGD", lr=lr, momentum=MOMENTUM)

            if spec["move"] == "before":
                optimizer = build()
                _move(model, spec, device, "deepspeed")
            else:
                _move(model, spec, device, "deepspeed")
                optimizer = build()
            in_dtype = _moved_dtype(spec, "deepspeed")
            config = _ds_config(
                spec["stage"], "bf16" if in_dtype == torch.bfloat16 else dtype, lr, optimizer_block=False
            )
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    finally:
        if refuse is not None:
            integration.refuse_unscaled_fp16_step = refuse
    adascale = engine.basic_optimizer
    assert isinstance(adascale, AdaScale), type(adascale)
    wrapper = engine.optimizer
    loss_dtype = torch.float32
    out = {"gain": [], "N": [], "scale_before": [], "scale_after": [], "wrapper": type(wrapper).__name__}
    for u in range(spec["updates"]):
        out["scale_before"].append(float(getattr(wrapper, "loss_scale", 1.0)))
        for k in range(ACCUMULATION):
            x, y = micro_batch(u, rank * ACCUMULATION + k)
            prediction = engine(x.to(engine.device, in_dtype))
            loss = torch.nn.functional.mse_loss(prediction.to(loss_dtype), y.to(engine.device, loss_dtype))
            engine.backward(loss)
            engine.step()
        out["scale_after"].append(float(getattr(wrapper, "loss_scale", 1.0)))
        _record_update(out, adascale)
    out.update(_capture_facts(adascale))
    out["param_device"] = str(engine.device)
    return out


# ---------------------------------------------------------------------------------------------
# The checks: launches, rows, table.
# ---------------------------------------------------------------------------------------------
def fsdp1_worker(rank: int, world: int, spec: dict) -> dict:
    """FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True`` as Accelerate and the HF Trainer
    build it): fc1, fc2 as units under the root, ``no_sync()`` on the first micro-step, no attach call
    (AdaScale hooks the flat parameters at the first forward); ``spec["dtype"]`` "bf16" adds
    ``MixedPrecision(param_dtype=bf16, reduce_dtype=fp32)`` (and lr 0)."""
    import contextlib

    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from adascale_shard import AdaScale

    device = _device(rank, spec)
    bf16 = spec["dtype"] == "bf16"
    kwargs = {"device_id": device, "use_orig_params": True, "auto_wrap_policy": ModuleWrapPolicy({torch.nn.Linear})}
    if bf16:
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = FullyShardedDataParallel(_model(), **kwargs)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.0 if bf16 else LR, momentum=MOMENTUM))
    out = {"gain": [], "N": [], "notes": []}
    for u in range(spec["updates"]):
        for k in range(ACCUMULATION):
            with model.no_sync() if k < ACCUMULATION - 1 else contextlib.nullcontext():
                x, y = micro_batch(u, rank * ACCUMULATION + k)
                loss = torch.nn.functional.mse_loss(model(x.to(device)).float(), y.to(device))
                (loss / ACCUMULATION).backward()
        opt.step()
        opt.zero_grad()
        _record_update(out, opt)
    out.update(_capture_facts(opt))
    return out


def build_plan(device: str, updates: int, merge_deepspeed: bool = False) -> list[dict]:
    """Launches (each a separate set of 2 processes, so that one that breaks costs only its own
    rows) and, per case, what its row compares. ``merge_deepspeed`` (``--quick``) runs the two
    DeepSpeed launches as one: the same cases, one start-up less."""

    def spec(**kw):
        return {"device": device, "updates": updates, **kw}

    moved = "fp32, model.to(cuda)" if device == "cuda" else "fp32->fp64 cast (CPU proxy of the move)"
    moved_ds = "fp32, model.to(cuda)" if device == "cuda" else "fp32->bf16 cast (CPU proxy of the move)"
    plan = [
        {
            "name": "torch engines",
            "deepspeed": False,
            "cases": [
                ("ddp", "ddp_worker", spec(move="none")),
                ("ddp-move-before", "ddp_worker", spec(move="before")),
                ("ddp-move-after", "ddp_worker", spec(move="after")),
                ("fsdp2-fp32", "fsdp2_worker", spec(dtype="fp32")),
                ("fsdp2-bf16", "fsdp2_worker", spec(dtype="bf16")),
                ("fsdp1-fp32", "fsdp1_worker", spec(dtype="fp32")),
                ("fsdp1-bf16", "fsdp1_worker", spec(dtype="bf16")),
            ],
            "rows": [
                ("gain vs reference", "ddp", "fp32", "ddp", "ref-fp32", FP32_TOL),
                ("gain vs reference", "fsdp2", "fp32", "fsdp2-fp32", "ref-fp32", FP32_TOL),
                ("gain vs reference", "fsdp2", "bf16 MixedPrecisionPolicy", "fsdp2-bf16", "ref-bf16", BF16_TOL),
                ("gain vs reference", "fsdp1", "fp32", "fsdp1-fp32", "ref-fp32", FP32_TOL),
                ("gain vs reference", "fsdp1", "bf16 MixedPrecision", "fsdp1-bf16", "ref-bf16", BF16_TOL),
                ("AdaScale built before move", "ddp", moved, "ddp-move-before", "case:ddp-move-after", MOVE_TOL),
            ],
        },
        {
            "name": "DeepSpeed fp16",
            "deepspeed": True,
            "cases": [("zero0-fp16-refusal", "deepspeed_worker", spec(stage=0, dtype="fp16", path="refusal"))]
            + [
                (f"zero{s}-fp16", "deepspeed_worker", spec(stage=s, dtype="fp16", path="json", lift_refusal=s == 0))
                for s in range(4)
            ],
            "rows": [("refused at initialize", "zero0", "fp16", "zero0-fp16-refusal", "refusal", None)]
            + [
                (
                    "gain vs reference",
                    f"zero{s}",
                    "fp16 dynamic loss scale" + (" (refusal lifted)" if s == 0 else ""),
                    f"zero{s}-fp16",
                    "ref-fp16",
                    FP16_TOL,
                )
                for s in range(4)
            ],
        },
        {
            "name": "DeepSpeed bf16 + Python path",
            "deepspeed": True,
            "cases": [(f"zero{s}-bf16", "deepspeed_worker", spec(stage=s, dtype="bf16", path="json")) for s in range(4)]
            + [
                (f"zero{s}-py-move-{when}", "deepspeed_worker", spec(stage=s, dtype="fp32", path="python", move=when))
                for s in (0, 2)
                for when in ("before", "after")
            ],
            "rows": [("gain vs reference", f"zero{s}", "bf16", f"zero{s}-bf16", "ref-bf16", BF16_TOL) for s in range(4)]
            + [
                (
                    "AdaScale built before move",
                    f"zero{s} Python path",
                    moved_ds,
                    f"zero{s}-py-move-before",
                    f"case:zero{s}-py-move-after",
                    MOVE_TOL,
                )
                for s in (0, 2)
            ],
        },
    ]
    if merge_deepspeed:
        fp16, bf16 = plan[1], plan[2]
        plan[1:] = [
            {
                "name": "DeepSpeed",
                "deepspeed": True,
                "cases": fp16["cases"] + bf16["cases"],
                "rows": fp16["rows"] + bf16["rows"],
            }
        ]
    return plan


REFERENCE_NAMES = {
    "refusal": "ValueError naming the fix",
    "ref-fp32": "1 process, fp32, CPU",
    "ref-bf16": "1 process, fp32, CPU, weights+inputs rounded to bf16",
    "ref-fp16": "1 process, fp32, CPU, weights+inputs rounded to fp16",
}


def make_row(check, engine, dtype, case, ref_key, tol, results, references, device) -> dict:
    row = {"check": check, "engine": engine, "dtype": dtype, "tolerance": tol, "diff": None}
    if ref_key == "refusal":
        messages = [results[r][case]["refused"] for r in range(WORLD)]
        ok = all(m and "stage" in m and "bf16" in m for m in messages)
        row["reference"] = REFERENCE_NAMES[ref_key]
        row["result"] = "PASS" if ok else "FAIL"
        row["detail"] = (
            "ValueError on every rank (docs/deepspeed-fp16.md#zero-0)"
            if ok
            else f"not refused as expected: {messages[0]!r}"
        )
        return row
    if ref_key.startswith("case:"):
        other = ref_key[len("case:") :]
        row["reference"] = "AdaScale built after the move"
        ref = results[0][other]["gain"] if other in results[0] else None
    else:
        row["reference"] = REFERENCE_NAMES[ref_key]
        ref = references[ref_key]
    r0, r1 = results[0][case], results[1][case]
    gains = r0["gain"]
    problems, detail = [], []
    if ref is None or len(gains) != len(ref):
        problems.append("no reference")
    else:
        row["diff"] = max(abs(g - h) for g, h in zip(gains, ref))
        if not all(math.isfinite(g) for g in gains):
            problems.append("non-finite gain")
        elif not row["diff"] <= tol:
            problems.append(f"gain off by {row['diff']:.2e} > {tol:.0e}")
    if r1["gain"] != gains:
        problems.append("ranks disagree")
    if not ref_key.startswith("case:") and references[ref_key] and min(references[ref_key]) < MIN_INFORMATIVE_GAIN:
        problems.append(f"reference gain < {MIN_INFORMATIVE_GAIN} (uninformative)")
    if [float(n) for n in r0["N"]] == [float(NUM_MICRO)] * len(gains):
        detail.append(f"N={NUM_MICRO} in each of {len(gains)} updates")
    else:
        problems.append(f"N per update {r0['N']}, not {NUM_MICRO} (backward passes lost)")
    stats_device = r0["stats_device"]
    detail.append(f"stats on {stats_device}")
    if not stats_device.startswith(device):
        problems.append(f"statistics on {stats_device}, not {device}")
    if "move" in case and device == "cpu":
        # float64 gradients get float64 slots; bf16 ones keep float32 slots (their norms in fp32).
        want = "torch.float32" if case.startswith("zero") else "torch.float64"
        if r0["slot_dtypes"] != [want]:
            problems.append(f"statistics slots {r0['slot_dtypes']} after the cast, not {want}")
        detail.append(f"slots {'/'.join(d.replace('torch.', '') for d in r0['slot_dtypes'])}")
    if "scale_before" in r0 and "fp16" in case:
        grew = sum(a > b for a, b in zip(r0["scale_after"], r0["scale_before"]))
        detail.append(f"loss scale {int(r0['scale_before'][0])}->{int(r0['scale_after'][-1])}")
        if grew < 1:
            problems.append("the loss scale never grew")
    if "wrapper" in r0:
        detail.append(r0["wrapper"])
    detail.extend(r0.get("notes", []))
    row["result"] = "FAIL" if problems else "PASS"
    row["detail"] = "; ".join([d for d in detail if d] + problems)
    return row


def error_rows(launch: dict, result: str, why: str) -> list[dict]:
    return [
        {
            "check": c,
            "engine": e,
            "dtype": d,
            "reference": REFERENCE_NAMES.get(r, "AdaScale built after the move"),
            "diff": None,
            "tolerance": t,
            "result": result,
            "detail": why,
        }
        for c, e, d, _case, r, t in launch["rows"]
    ]


def _pythonpath(*first: str) -> str:
    return os.pathsep.join([*first, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout/stderr, and so the ranks' (they inherit the descriptors), to
    ``path`` for the launch: DeepSpeed's and torch's log lines stay out of the table."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_launch(launch: dict, device: str, backend: str, timeout: float) -> list[dict]:
    from tests.harness import Case, run_cases

    module = sys.modules[__name__]  # "gpu_check": the ranks import the workers from it
    cases = [Case(name, getattr(module, fn), (spec,)) for name, fn, spec in launch["cases"]]
    env = {"DS_ACCELERATOR": device, "PYTHONPATH": _pythonpath(str(ROOT), str(Path(__file__).resolve().parent))}
    return run_cases(cases, WORLD, timeout=timeout, env=env, backend=backend)


def run_overhead(args, device: str, out_dir: Path, timeout: float) -> dict:
    """benchmarks/overhead.py on 2 ranks through torchrun (--standalone: a free port)."""
    output = out_dir / "overhead.jsonl"
    if output.exists():
        output.unlink()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(ROOT / "benchmarks" / "overhead.py"),
        "--engine",
        "ddp",
        "--workload",
        args.overhead_workload,
        "--device",
        device,
        "--max-seconds",
        str(args.overhead_seconds),
        "--output",
        str(output),
    ]
    if args.quick:
        cmd += ["--min-pairs", "3", "--max-pairs", "6"]
    env = {
        **os.environ,
        "DS_ACCELERATOR": device,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": _pythonpath(str(ROOT)),
    }
    row = {
        "check": "overhead (informational)",
        "engine": f"ddp {args.overhead_workload}",
        "dtype": "fp32",
        "reference": "plain SGD, same run",
        "diff": None,
        "tolerance": None,
    }
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "result": "FAIL", "detail": f"overhead.py ran past {timeout:.0f} s"}
    (out_dir / "overhead.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not output.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**row, "result": "FAIL", "detail": f"overhead.py exit {proc.returncode}: {tail[0][:200]}"}
    result = json.loads(output.read_text().splitlines()[-1])
    ratio = result["ratio"]["adascale"]
    return {
        **row,
        "result": "INFO",
        "ratio": ratio,
        "detail": (
            f"AdaScale/base x{ratio['mean']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}] over "
            f"{result['pairs']} pairs, base {result['median_ms']['base']:.1f} ms/update, {result['backend']}, "
            f"{time.monotonic() - started:.0f} s; {output}"
        ),
    }


def format_table(rows: list[dict]) -> str:
    head = ["check", "engine", "dtype", "reference", "max abs gain diff", "tolerance", "result", "detail"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        diff = "-" if r["diff"] is None else f"{r['diff']:.2e}"
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.0e}"
        cells = [r["check"], r["engine"], r["dtype"], r["reference"], diff, tol, r["result"], r["detail"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def environment_line(device: str, backend: str) -> str:
    import torch

    ds = "not importable"
    if importlib.util.find_spec("deepspeed") is not None:
        try:
            from importlib.metadata import version

            ds = version("deepspeed")
        except Exception:  # noqa: BLE001
            ds = "installed"
    where = "CPU (the --cpu proxy)"
    if device == "cuda":
        where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (
        f"gpu_check: python {platform.python_version()} ({sys.executable}), torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), deepspeed {ds}; device: {where}; backend {backend}, "
        f"{WORLD} ranks x {ACCUMULATION} micro-batches"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the same checks on the CPU (gloo, the CPU proxies)")
    p.add_argument(
        "--quick", action="store_true", help=f"{QUICK_UPDATES} updates instead of {UPDATES}, a short benchmark"
    )
    p.add_argument("--out", default=None, help="results directory (default $OUT, else outputs/gpu_check)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting launches after this many seconds")
    p.add_argument("--overhead-seconds", type=float, default=None, help="overhead.py --max-seconds (60; --quick 5)")
    p.add_argument("--overhead-workload", default=None, help="overhead.py --workload (gpt2; --quick many_small)")
    p.add_argument("--no-overhead", action="store_true", help="leave out the overhead benchmark")
    args = p.parse_args(argv)
    if args.overhead_seconds is None:
        args.overhead_seconds = 5.0 if args.quick else 60.0
    if args.overhead_workload is None:
        # --quick (CI): the small workload spares each rank the transformers import; same code path.
        args.overhead_workload = "many_small" if args.quick else "gpt2"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch.cuda.is_available() is False in {sys.executable}, torch "
            f"{torch.__version__}); skipped. To run the same checks on the CPU: bash scripts/gpu_check.sh --cpu"
        )
        return 0
    backend = "nccl" if device == "cuda" and torch.cuda.device_count() >= 2 else "gloo"
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "outputs" / "gpu_check")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(environment_line(device, backend), flush=True)
    updates = QUICK_UPDATES if args.quick else UPDATES

    references = {
        "ref-fp32": reference(updates, LR),
        "ref-bf16": reference(updates, 0.0, "bf16"),
        "ref-fp16": reference(updates, 0.0, "fp16"),
    }
    no_deepspeed = None if importlib.util.find_spec("deepspeed") else f"deepspeed is not installed for {sys.executable}"
    rows: list[dict] = []
    errors: list[str] = []
    raw: dict = {}
    for launch in build_plan(device, updates, merge_deepspeed=args.quick):
        left = args.budget_s - (time.monotonic() - started)
        if launch["deepspeed"] and no_deepspeed:
            rows += error_rows(launch, "SKIP", f"{no_deepspeed} (docs/gpu.md#deepspeed-on-the-gpu-machine)")
            continue
        if left < 60:
            rows += error_rows(launch, "SKIP", "time budget spent (--budget-s)")
            continue
        t0 = time.monotonic()
        log = out_dir / f"launch-{launch['name'].replace(' ', '_').replace('+', 'and')}.log"
        log.unlink(missing_ok=True)
        try:
            with _output_to(log):
                results = run_launch(launch, device, backend, timeout=min(300.0, left))
        except Exception as err:  # noqa: BLE001 - a broken launch becomes ERROR rows, the rest runs
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raised = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
            why = (raised or lines or [type(err).__name__])[-1][:200]
            if launch["deepspeed"] and why.startswith(("ModuleNotFoundError", "ImportError")):
                # DeepSpeed (or one of its requirements) does not import here: not AdaScale's failure.
                no_deepspeed = f"deepspeed does not import ({why})"
                rows += error_rows(launch, "SKIP", f"{no_deepspeed} (docs/gpu.md#deepspeed-on-the-gpu-machine)")
                continue
            errors.append(f"launch {launch['name']!r}: {err}\n{traceback.format_exc()}")
            rows += error_rows(launch, "ERROR", f"launch failed ({why}); see {out_dir / 'errors.txt'} and {log}")
            print(f"gpu_check: launch {launch['name']!r} failed after {time.monotonic() - t0:.0f} s", flush=True)
            continue
        raw[launch["name"]] = results
        print(f"gpu_check: launch {launch['name']!r} done in {time.monotonic() - t0:.0f} s", flush=True)
        for check, engine, dtype, case, ref_key, tol in launch["rows"]:
            rows.append(make_row(check, engine, dtype, case, ref_key, tol, results, references, device))
    if not args.no_overhead:
        left = args.budget_s - (time.monotonic() - started)
        if left < args.overhead_seconds + 60:
            rows.append(
                {
                    "check": "overhead (informational)",
                    "engine": f"ddp {args.overhead_workload}",
                    "dtype": "fp32",
                    "reference": "plain SGD, same run",
                    "diff": None,
                    "tolerance": None,
                    "result": "SKIP",
                    "detail": "time budget spent (--budget-s)",
                }
            )
        else:
            rows.append(run_overhead(args, device, out_dir, timeout=left - 10))

    table = format_table(rows)
    print(table)
    failed = [r for r in rows if r["result"] in ("FAIL", "ERROR")]
    skipped = [r for r in rows if r["result"] == "SKIP"]
    elapsed = time.monotonic() - started
    verdict = "FAIL" if failed else ("INCOMPLETE" if skipped else "PASS")
    summary = (
        f"gpu_check: {verdict}: {sum(r['result'] == 'PASS' for r in rows)} passed, {len(failed)} failed, "
        f"{len(skipped)} skipped in {elapsed:.0f} s on {device}; results in {out_dir}"
    )
    print(summary)
    (out_dir / "gpu_check.md").write_text(environment_line(device, backend) + "\n\n" + table + "\n\n" + summary + "\n")
    (out_dir / "gpu_check.json").write_text(
        json.dumps(
            {
                "device": device,
                "backend": backend,
                "updates": updates,
                "references": references,
                "rows": rows,
                "raw": raw,
            },
            indent=1,
            default=str,
        )
    )
    if errors:
        (out_dir / "errors.txt").write_text("\n\n".join(errors))
        print(f"gpu_check: launch errors in {out_dir / 'errors.txt'}; the first:\n{errors[0][-3000:]}")
    return 1 if failed else (2 if skipped else 0)


if __name__ == "__main__":
    # Re-enter as the module ``gpu_check`` (not ``__main__``): the harness pickles the workers by
    # reference, and the spawned ranks import them from there.
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    import gpu_check as _module

    sys.exit(_module.main())
