"""AdaScale's cost per update on one engine, against the same run without AdaScale.

Launch on 2 gloo ranks (one thread each, as torchrun sets)::

    DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node=2 benchmarks/overhead.py --engine ddp --workload gpt2

``--device cuda`` runs the same comparison on GPUs: model and micro-batches on the device, each
timed update bracketed by ``torch.cuda.synchronize()``, the NCCL backend with one GPU per rank when
2+ GPUs are visible, else gloo with every rank sharing GPU 0 (NCCL refuses two ranks on one GPU).
The default ``--device cpu`` is the CPU/gloo run the README's tables were measured with, unchanged.

Both variants (the plain base optimizer, and AdaScale around it; with ``--fairscale`` on DDP also
fairscale's AdaScale) are built in the same processes from the same weights and timed in
alternation, update by update (forward + backward for each micro-batch, then ``step``), so
machine drift cancels. Pairs are added until the 95% confidence interval of the time ratio
(geometric mean of the paired ratios) is narrower than ``--target-ci`` (2%) or ``--max-pairs`` is
reached. Also measured, outside the timed loop: the tensor bytes each variant allocates during one
update (every non-view op output, counted with a dispatch mode; CPU has no peak-memory counter
per variant), and the collectives each issues through ``torch.distributed`` during one update.

Results are appended, one JSON object per run, to ``--output`` (default
``benchmarks/results/overhead.jsonl``); rank 0 prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import adascale_shard
from adascale_shard import AdaScale

ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
WORKLOADS = ("gpt2", "gpt2_batch32", "many_small")
# Sequences of 64 tokens per micro-batch: gpt2_batch32 is the same model with 4x the tokens per
# micro-batch (the compute grows with the tokens, AdaScale's reads of the gradients do not).
SEQUENCES = {"gpt2": 8, "gpt2_batch32": 32}
LR, MOMENTUM = 0.01, 0.9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--workload", choices=WORKLOADS, default="gpt2")
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--fairscale", action="store_true", help="also time fairscale's AdaScale (DDP only)")
    p.add_argument("--min-pairs", type=int, default=20)
    p.add_argument("--max-pairs", type=int, default=300)
    p.add_argument("--max-seconds", type=float, default=240.0)
    p.add_argument("--target-ci", type=float, default=0.02, help="stop when the ratio's 95%% CI is this narrow")
    p.add_argument("--output", default="benchmarks/results/overhead.jsonl")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where model and data live (default cpu)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# Workloads: a model and a micro-batch maker.
# ---------------------------------------------------------------------------------------------
class ManySmall(torch.nn.Module):
    """64 small linear layers: 128 parameters, where per-parameter hooks cost the most."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + 0.1 * torch.tanh(block(x))
        return x.pow(2).mean()


def build_model(workload: str) -> torch.nn.Module:
    """The workload's model, built on the CPU (the same weights whatever the device)."""
    torch.manual_seed(0)
    if workload in SEQUENCES:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=1024, n_positions=64, n_embd=128, n_layer=4, n_head=4)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return GPT2LMHeadModel(config)
    return ManySmall()


#: Where the model and the micro-batches live (``--device``); set once in ``main``.
DEVICE = torch.device("cpu")


def micro_batch(workload: str, step: int, rank: int) -> dict:
    # Drawn on the CPU (the same numbers whatever the device), then moved.
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    if workload in SEQUENCES:
        ids = torch.randint(1024, (SEQUENCES[workload], 64), generator=gen).to(DEVICE)
        return {"input_ids": ids, "labels": ids}
    return {"x": torch.randn(16, 32, generator=gen).to(DEVICE)}


def loss_of(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out.loss if hasattr(out, "loss") else out


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return list(model.blocks)


# ---------------------------------------------------------------------------------------------
# Engines: each variant is a callable that runs one full update.
# ---------------------------------------------------------------------------------------------
def make_variant(engine: str, workload: str, kind: str, accumulation: int):
    """``kind`` is "base", "adascale" or "fairscale"; returns (update_fn, adascale_or_None)."""
    model = build_model(workload)
    if engine in ("ddp", "fsdp2"):
        model.to(DEVICE)  # before the optimizer, as a training script does (DeepSpeed moves it itself)
    if engine == "ddp":
        device_ids = [DEVICE.index] if DEVICE.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        if kind == "adascale":
            opt = AdaScale(base)
        elif kind == "fairscale":
            from fairscale.optim import AdaScale as FairscaleAdaScale

            opt = FairscaleAdaScale(base, world_size=dist.get_world_size(), num_gradients_to_accumulate=accumulation)
        else:
            opt = base

        def update(step: int) -> None:
            for k in range(accumulation):
                context = ddp.no_sync() if k < accumulation - 1 else nullcontext()
                with context:
                    (loss_of(ddp, micro_batch(workload, step * accumulation + k, dist.get_rank())) / accumulation).backward()
            opt.step()
            opt.zero_grad()

        return update, opt if isinstance(opt, AdaScale) else None

    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))
        for block in blocks_of(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        opt = AdaScale(base) if kind == "adascale" else base
        if isinstance(opt, AdaScale):
            opt.attach(model)

        def update(step: int) -> None:
            for k in range(accumulation):
                model.set_requires_gradient_sync(k == accumulation - 1)
                (loss_of(model, micro_batch(workload, step * accumulation + k, dist.get_rank())) / accumulation).backward()
            opt.step()
            opt.zero_grad()

        return update, opt if isinstance(opt, AdaScale) else None

    import deepspeed

    stage = int(engine[-1])
    config = {
        "train_micro_batch_size_per_gpu": SEQUENCES.get(workload, 16),
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,  # the plain SGD baseline
    }
    if kind == "adascale":
        config["optimizer"] = {"type": "AdaScale", "params": {"optimizer": "SGD", "lr": LR, "momentum": MOMENTUM}}
        engine_, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        engine_, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def update(step: int) -> None:
        for k in range(accumulation):
            engine_.backward(loss_of(engine_, micro_batch(workload, step * accumulation + k, dist.get_rank())))
            engine_.step()

    adascale = engine_.basic_optimizer if isinstance(engine_.basic_optimizer, AdaScale) else None
    return update, adascale


# ---------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------
def synchronize() -> None:
    """Wait for the device's queued kernels (a no-op on the CPU, where every op is done on return)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(update, step: int) -> float:
    synchronize()  # nothing of the previous update still running on the device
    dist.barrier()
    start = time.perf_counter()
    update(step)
    synchronize()  # the update's kernels are done, not only queued
    dist.barrier()  # the update is over on every rank
    return time.perf_counter() - start


def ratio_ci(ratios: list[float]) -> tuple[float, float, float]:
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def allocated_bytes(update, step: int) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        Count.total += t.numel() * t.element_size()
            return out

    with Count():
        update(step)
    return Count.total


class CollectiveCount:
    NAMES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "all_gather", "reduce_scatter")

    def __enter__(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.saved = {}
        for name in self.NAMES:
            original = getattr(dist, name)
            self.saved[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                tensor = args[0] if args else None
                if isinstance(tensor, (list, tuple)):
                    tensor = tensor[0] if tensor else None
                self.calls[_name] += 1
                if isinstance(tensor, torch.Tensor):
                    self.bytes[_name] += tensor.numel() * tensor.element_size()
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def setup_device(device: str) -> str:
    """Set :data:`DEVICE` for this rank and return the process-group backend to use."""
    global DEVICE
    if device == "cpu":
        DEVICE = torch.device("cpu")
        return "gloo"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (a CPU build of torch, or no GPU)")
    count = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    DEVICE = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(DEVICE)
    # DeepSpeed's engine places itself on cuda:LOCAL_RANK: name the shared GPU when ranks share one.
    os.environ["LOCAL_RANK"] = str(DEVICE.index)
    # NCCL needs a GPU per rank; with one GPU every rank shares it and gloo carries the CUDA tensors.
    return "nccl" if count >= 2 else "gloo"


def main() -> None:
    args = parse_args()
    backend = setup_device(args.device)
    if args.device == "cuda":
        # The process group first, without binding it to a device (DeepSpeed would bind cuda:LOCAL_RANK);
        # deepspeed.init_distributed below then adopts it.
        dist.init_process_group(backend)
    if args.engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif args.device == "cpu":
        dist.init_process_group(backend)
    torch.set_num_threads(1)
    rank = dist.get_rank()
    kinds = ["base", "adascale"] + (["fairscale"] if args.fairscale else [])
    if args.fairscale and args.engine != "ddp":
        raise SystemExit("--fairscale runs on DDP only (fairscale's AdaScale needs full gradients on every rank)")
    variants = {kind: make_variant(args.engine, args.workload, kind, args.accumulation) for kind in kinds}
    step = 0
    for kind in kinds:  # warm-up: allocator, DeepSpeed buffers, first-call costs
        for _ in range(3):
            variants[kind][0](step)
            step += 1

    memory = {kind: allocated_bytes(variants[kind][0], step) for kind in kinds}
    collectives = {}
    for kind in kinds:
        with CollectiveCount() as count:
            variants[kind][0](step)
        collectives[kind] = {"calls": dict(count.calls), "bytes": dict(count.bytes)}
    step += 1

    times = {kind: [] for kind in kinds}
    ratios = {kind: [] for kind in kinds if kind != "base"}
    # The direct comparison, paired within each round: sharper than comparing two ratios to base.
    head_to_head: list[float] = []
    rng = random.Random(0)
    started = time.perf_counter()
    pairs = 0
    while pairs < args.max_pairs and time.perf_counter() - started < args.max_seconds:
        order = kinds[:]
        rng.shuffle(order)  # the same order on every rank: same seed, same calls
        sample = {kind: timed(variants[kind][0], step) for kind in order}
        step += 1
        pairs += 1
        for kind in kinds:
            times[kind].append(sample[kind])
        for kind in ratios:
            ratios[kind].append(sample[kind] / sample["base"])
        if "fairscale" in sample:
            head_to_head.append(sample["adascale"] / sample["fairscale"])
        if pairs >= args.min_pairs:
            widths = [hi - lo for _, lo, hi in (ratio_ci(r) for r in ratios.values())]
            # Every rank must take the same decision: rank 0's.
            done = torch.tensor([float(max(widths) < args.target_ci)], device=DEVICE if backend == "nccl" else "cpu")
            dist.broadcast(done, 0)
            if done.item():
                break

    result = {
        "engine": args.engine,
        "workload": args.workload,
        "accumulation": args.accumulation,
        "world_size": dist.get_world_size(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(DEVICE),
        "backend": backend,
        "torch": torch.__version__,
        "adascale_shard": adascale_shard.__version__,
        "pairs": pairs,
        "median_ms": {kind: 1e3 * statistics.median(t) for kind, t in times.items()},
        "ratio": {},
        "allocated_bytes_per_update": memory,
        "collectives_per_update": collectives,
        "parameters": sum(p.numel() for p in build_model(args.workload).parameters()),
    }
    for kind, r in ratios.items():
        mean, lo, hi = ratio_ci(r)
        result["ratio"][kind] = {"mean": mean, "ci95": [lo, hi]}
    if head_to_head:
        mean, lo, hi = ratio_ci(head_to_head)
        result["ratio"]["adascale/fairscale"] = {"mean": mean, "ci95": [lo, hi]}
    adascale = variants["adascale"][1]
    if adascale is not None:
        result["adascale_stats"] = {k: adascale.stats()[k] for k in ("gain", "N", "S")}
    if rank == 0:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        parts = [
            f"{kind}: x{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" for kind, v in result["ratio"].items()
        ]
        print(
            f"{args.engine:6s} {args.workload:10s} pairs {pairs:3d}  base {result['median_ms']['base']:.1f} ms  "
            + "  ".join(parts),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
