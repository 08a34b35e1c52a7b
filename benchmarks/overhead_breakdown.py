"""Where AdaScale's overhead goes on DDP: its hooks, its step's computation, its one collective.

Four variants of the same DDP update (2 micro-batches, ``no_sync`` on the first), timed in
alternation in one process run as in ``overhead.py``: the plain optimizer; the plain optimizer
with AdaScale's gradient hooks installed (``MicroGradCapture``, reset after each update, no
AdaScale ``step``); AdaScale on a one-rank process group of its own (``local``: everything but the
all-reduce of the statistics; each rank's gain then comes from its own micro-gradients, which is
fine for timing and nothing else); and AdaScale. ``hooks / base`` is the hooks' cost,
``local / hooks`` the step's computation (``||G||^2`` read in full, the probes, the estimator),
and ``adascale / local`` the all-reduce of 4 float64, less the half of ``||G||^2`` that each of
the 2 ranks no longer reads (each measures its share of the replicated gradient).

More variants on request (``--extra``):

* ``sync``: the plain optimizer plus one all-reduce of 4 float64 after each step (what any added
  synchronisation point costs here, AdaScale or not);
* ``replicated``: AdaScale with every rank reading all of ``||G||^2`` while the all-reduce is in
  flight (the behaviour before the shares), also printed paired against ``adascale``;
* ``noop-hooks`` and ``norm-hooks``: the plain optimizer with a Python tensor hook on every gradient
  accumulator that does nothing, or runs only the norm kernel AdaScale's hook runs. Their ratios
  to ``base``, read beside ``hooks / base`` (the whole capture), split the hooks' cost into the
  Python call, the norm kernels and the capture's bookkeeping.

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/overhead_breakdown.py --workload gpt2 --pairs 300
    .venv/bin/torchrun --nproc_per_node=2 benchmarks/overhead_breakdown.py --workload gpt2 --pairs 300 --extra sync replicated

Without torchrun (``--single``) it times the plain optimizer, AdaScale and fairscale's AdaScale in
one process instead (``S = 2`` micro-batches per update), where the per-hook cost is not blurred by
the ranks' communication threads.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import LR, MOMENTUM, WORKLOADS, build_model, loss_of, micro_batch, ratio_ci

from adascale_shard import AdaScale
from adascale_shard.capture import MicroGradCapture


def make_update(workload: str, kind: str, ranks: bool, own_group=None):
    model = build_model(workload)
    module = torch.nn.parallel.DistributedDataParallel(model) if ranks else model
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    opt, capture = base, None
    if kind == "adascale":
        opt = AdaScale(base, scale=None if ranks else 2)
    elif kind == "replicated":
        opt = AdaScale(base, scale=None)
        opt._engine.replicas = lambda: (0, 1)  # every rank reads all of G, as if it were alone
    elif kind == "local":
        opt = AdaScale(base, scale=2, process_group=own_group)
    elif kind == "fairscale":
        from fairscale.optim import AdaScale as FairscaleAdaScale

        opt = FairscaleAdaScale(base, world_size=1, num_gradients_to_accumulate=2)
    elif kind == "hooks":
        capture = MicroGradCapture([list(model.parameters())])
    elif kind in ("noop-hooks", "norm-hooks"):
        # What a Python tensor hook per parameter costs in context, empty or running only the norm
        # kernel AdaScale's hook runs (into a slot of one preallocated tensor), without any bookkeeping.
        slots = torch.zeros(len(list(model.parameters())))

        def norm_into(slot: torch.Tensor):
            def hook(grad):
                torch.linalg.vector_norm(grad, out=slot)

            return hook

        for slot, param in zip(slots, model.parameters()):
            param.register_hook((lambda grad: None) if kind == "noop-hooks" else norm_into(slot))
    rank = dist.get_rank() if ranks else 0

    def update(step: int) -> None:
        for k in range(2):
            with module.no_sync() if ranks and k == 0 else nullcontext():
                (loss_of(module, micro_batch(workload, 2 * step + k, rank)) / 2).backward()
        opt.step()
        opt.zero_grad()
        if capture is not None:
            capture.reset()
        if kind == "sync":
            dist.all_reduce(torch.zeros(4, dtype=torch.float64))

    return update


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS, default="gpt2")
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--single", action="store_true", help="one process: base, AdaScale, fairscale")
    p.add_argument("--extra", nargs="*", choices=("sync", "replicated", "noop-hooks", "norm-hooks"), default=[], help="more DDP variants")
    args = p.parse_args()
    torch.set_num_threads(1)
    ranks = not args.single
    if ranks:
        dist.init_process_group("gloo")
    kinds = ["base", "hooks", "local", "adascale", *args.extra] if ranks else ["base", "adascale", "fairscale"]
    own_group = None
    if ranks:  # every rank takes part in creating every group
        singletons = [dist.new_group([r], backend="gloo") for r in range(dist.get_world_size())]
        own_group = singletons[dist.get_rank()]
    updates = {kind: make_update(args.workload, kind, ranks, own_group) for kind in kinds}
    for step in range(3):  # warm-up
        for kind in kinds:
            updates[kind](step)
    rng = random.Random(0)
    ratios = {kind: [] for kind in kinds[1:]}
    for step in range(3, 3 + args.pairs):
        order = kinds[:]
        rng.shuffle(order)  # the same order on every rank
        seconds = {}
        for kind in order:
            if ranks:
                dist.barrier()
            start = time.perf_counter()
            updates[kind](step)
            if ranks:
                dist.barrier()
            seconds[kind] = time.perf_counter() - start
        for kind in ratios:
            ratios[kind].append(seconds[kind] / seconds["base"])
    if not ranks or dist.get_rank() == 0:
        where = f"DDP x {dist.get_world_size()}" if ranks else "one process"
        for kind, values in ratios.items():
            mean, lo, hi = ratio_ci(values)
            print(f"{args.workload} {where} {kind} / base: {mean:.4f} [{lo:.4f}, {hi:.4f}] ({len(values)} pairs)")
        if ranks:  # the parts, each paired within a round
            pairs = [("local", "hooks"), ("adascale", "local")]
            if "replicated" in kinds:
                pairs.append(("adascale", "replicated"))
            for upper, lower in pairs:
                part = [u / v for u, v in zip(ratios[upper], ratios[lower])]
                mean, lo, hi = ratio_ci(part)
                print(f"{args.workload} {where} {upper} / {lower}: {mean:.4f} [{lo:.4f}, {hi:.4f}]")
        if not ranks:
            head = [a / f for a, f in zip(ratios["adascale"], ratios["fairscale"])]
            mean, lo, hi = ratio_ci(head)
            print(f"{args.workload} {where} adascale / fairscale: {mean:.4f} [{lo:.4f}, {hi:.4f}]")
    if ranks:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
