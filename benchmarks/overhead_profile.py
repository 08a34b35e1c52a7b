"""Where AdaScale's time goes inside a DDP update, function by function (wall time per update).

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/overhead_profile.py --workload gpt2 --updates 200

Runs AdaScale on DDP (2 micro-batches, ``no_sync`` on the first, as in ``overhead.py``) with
timers wrapped around its parts: the gradient hooks (all calls, and the norm kernel inside them),
opening and closing a backward pass, the per-group sums, the ``||G||^2`` of the replicated
gradients at ``step()``, launching the all-reduce and waiting for it, and the base optimizer's
step. Each timer adds a Python call and two clock reads, so the figures are a little high; the ratios
against a run without AdaScale are ``overhead.py``'s business, this tells which part to attack.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead

from adascale_shard import capture as capture_module
from adascale_shard import optimizer as optimizer_module
from adascale_shard.engines import replicated as replicated_module

SECONDS: dict[str, float] = {}
ORDER = (
    "opening a pass",
    "hooks (every call)",
    "  of which the norm kernels",
    "closing a pass",
    "statistics at step() (all of it)",
    "  per-group sums",
    "  launching the all-reduce",
    "  ||G||^2 at step()",
    "  waiting for the all-reduce",
    "the base optimizer's step",
)


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[name] = SECONDS.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def instrument() -> None:
    """Wrap the parts; must run before the optimizer (and so its hooks) is built."""
    capture_cls = capture_module.MicroGradCapture
    torch.linalg.vector_norm = timed("  of which the norm kernels", torch.linalg.vector_norm)
    make_hook = capture_cls._make_hook
    capture_cls._make_hook = lambda self, *a, **k: timed("hooks (every call)", make_hook(self, *a, **k))
    capture_cls._open_pass = timed("opening a pass", capture_cls._open_pass)
    capture_cls._close_pass = timed("closing a pass", capture_cls._close_pass)
    capture_cls.micro_sqr = property(timed("  per-group sums", capture_cls.micro_sqr.fget))
    replicated = replicated_module.ReplicatedEngine
    replicated.take_grad_sqr = timed("  ||G||^2 at step()", replicated.take_grad_sqr)
    start = optimizer_module.start_all_reduce_sum

    def start_then_time_wait(*args, **kwargs):
        return timed("  waiting for the all-reduce", start(*args, **kwargs))

    optimizer_module.start_all_reduce_sum = timed("  launching the all-reduce", start_then_time_wait)
    optimizer_module.AdaScale._update_statistics = timed(
        "statistics at step() (all of it)", optimizer_module.AdaScale._update_statistics
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=overhead.WORKLOADS, default="gpt2")
    p.add_argument("--updates", type=int, default=200)
    args = p.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    instrument()
    update, adascale = overhead.make_variant("ddp", args.workload, "adascale", 2)
    adascale.optimizer.step = timed("the base optimizer's step", adascale.optimizer.step)
    for step in range(5):  # warm-up
        update(step)
    SECONDS.clear()
    start = time.perf_counter()
    for step in range(5, 5 + args.updates):
        dist.barrier()
        update(step)
    total = time.perf_counter() - start
    unlisted = set(SECONDS) - set(ORDER)
    if unlisted:  # a label of instrument() missing from ORDER would not be printed
        raise RuntimeError(f"timed parts missing from ORDER: {sorted(unlisted)}")
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, dict(SECONDS))  # the ranks wait for each other differently
    if dist.get_rank() == 0:
        print(f"{args.workload} DDP x {dist.get_world_size()}: {1e3 * total / args.updates:.1f} ms per update "
              f"({args.updates} updates); AdaScale's parts, microseconds per update, per rank:")
        print(f"  {'':36s} " + " ".join(f"{f'rank {r}':>8s}" for r in range(len(every_rank))))
        for name in ORDER:
            print(f"  {name:36s} " + " ".join(f"{1e6 * seconds.get(name, 0.0) / args.updates:8.0f}" for seconds in every_rank))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
