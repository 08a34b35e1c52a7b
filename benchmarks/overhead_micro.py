"""The absolute costs behind the README's overhead analysis, in microseconds (not ratios).

    .venv/bin/python benchmarks/overhead_micro.py                          # one process, one thread
    .venv/bin/torchrun --nproc_per_node=2 benchmarks/overhead_micro.py     # also a tiny gloo all-reduce

One process: the squared norm of a 64 K-element float32 gradient (GPT-2's MLP weight) in cache by
each candidate kernel; what the autograd engine spends calling a no-op Python pre-hook on a
gradient accumulator (a backward over 512 one-element parameters with and without such hooks,
interleaved); and the Python of AdaScale's hook around its norm kernel (the hook called directly
against the bare kernel); and reading the local shards of 52 DTensor gradients (FSDP2's
``||G||^2``) through ``to_local()`` against ``_local_tensor``. Under torchrun, rank 0 also prints the latency distribution of an
all-reduce of 6 float64, the size of AdaScale's statistics, between the ranks, and how waiting for
it compares with polling it (with a little work before each call, as in an update).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from adascale_shard.capture import MicroGradCapture


def median_us(fn, repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def norm_kernels() -> None:
    grad = torch.randn(128 * 512)
    flat = grad.view(-1)
    out = torch.zeros(())
    kernels = {
        "linalg.vector_norm(out=) (AdaScale's)": lambda: torch.linalg.vector_norm(grad, out=out),
        "dot(g, g, out=)": lambda: torch.dot(flat, flat, out=out),
        "square().sum()": lambda: grad.square().sum(),
        "mv(g[None], g)": lambda: torch.mv(flat[None], flat),
        "vector_norm(dtype=float64)": lambda: torch.linalg.vector_norm(grad, dtype=torch.float64),
    }
    print(f"squared norm of a {grad.numel()}-element float32 tensor in cache, median of 2000:")
    for name, fn in kernels.items():
        print(f"  {name:40s} {median_us(fn, 2000):6.1f} us")


def hook_dispatch(num_params: int = 512, rounds: int = 300) -> None:
    params = [torch.nn.Parameter(torch.randn(1)) for _ in range(num_params)]
    nodes = [torch.autograd.graph.get_gradient_edge(p).node for p in params]  # kept: autograd reuses them

    def backward() -> float:
        loss = sum(p * p for p in params).sum()
        start = time.perf_counter()
        loss.backward()
        seconds = time.perf_counter() - start
        for p in params:
            p.grad = None
        return seconds

    bare, node_hooked, tensor_hooked = [], [], []
    for _ in range(rounds):  # interleaved, so that drift cancels
        bare.append(backward())
        handles = [node.register_prehook(lambda grads: None) for node in nodes]
        node_hooked.append(backward())
        for handle in handles:
            handle.remove()
        handles = [p.register_hook(lambda grad: None) for p in params]  # what AdaScale's capture uses
        tensor_hooked.append(backward())
        for handle in handles:
            handle.remove()
    for name, hooked in (("a tensor hook (Tensor.register_hook, AdaScale's)", tensor_hooked),
                         ("a pre-hook on the gradient-accumulator node", node_hooked)):
        per_hook = 1e6 * (statistics.median(hooked) - statistics.median(bare)) / num_params
        print(f"no-op Python {name}, called by backward: {per_hook:.2f} us per call "
              f"({num_params} one-element parameters, median of {rounds} interleaved backward passes)")


def hook_python() -> None:
    param = torch.nn.Parameter(torch.randn(128))
    capture = MicroGradCapture([[param]])
    hook = capture._make_hook(0, param, None)
    grads = torch.randn(128)
    capture._pass_open, capture._pass_task_id = True, torch._C._current_graph_task_id()  # as inside a pass
    slot = torch.zeros(())

    def one_call() -> None:
        capture._fired.clear()
        hook(grads)

    with_hook = median_us(one_call, 20000)
    bare = median_us(lambda: torch.linalg.vector_norm(grads, out=slot), 20000)
    print(f"AdaScale's hook on a 128-element gradient: {with_hook:.2f} us, its norm kernel alone {bare:.2f} us: "
          f"{with_hook - bare:.2f} us of Python per call")


def all_reduce_latency(calls: int = 2000) -> None:
    values = torch.zeros(6, dtype=torch.float64)
    for _ in range(50):
        dist.all_reduce(values)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        dist.all_reduce(values)
        times.append(time.perf_counter() - start)
    times.sort()
    if dist.get_rank() == 0:
        quantiles = ", ".join(f"p{int(100 * q)} {1e6 * times[int(q * len(times))]:.0f}" for q in (0.1, 0.5, 0.75, 0.9, 0.99))
        print(f"all_reduce of 6 float64 on {dist.get_world_size()} gloo ranks, {calls} calls, us: {quantiles}; "
              f"mean {1e6 * statistics.mean(times):.0f}")


def wait_or_poll(rounds: int = 600) -> None:
    values = torch.zeros(6, dtype=torch.float64)
    work_before = torch.randn(256, 256)

    def one(mode: str) -> float:
        for _ in range(3):
            work_before @ work_before
        start = time.perf_counter()
        work = dist.all_reduce(values, async_op=True)
        if mode == "sched_yield polling":
            while not work.is_completed():
                os.sched_yield()
        elif mode == "spinning":
            while not work.is_completed():
                pass
        work.wait()
        return time.perf_counter() - start

    modes = ("blocking wait", "sched_yield polling", "spinning")
    times = {mode: [] for mode in modes}
    for r in range(rounds):  # interleaved, in alternating order
        for mode in modes if r % 2 else modes[::-1]:
            times[mode] += [one(mode) for _ in range(3)]
    if dist.get_rank() == 0:
        for mode in modes:
            print(f"all_reduce of 6 float64 after some work, {mode}: median {1e6 * statistics.median(times[mode]):.0f} us, "
                  f"mean {1e6 * statistics.mean(times[mode]):.0f} us ({len(times[mode])} calls, interleaved)")


def dtensor_shard_access(num_params: int = 52) -> None:
    """FSDP2's ``||G||^2`` reads the local shard of each DTensor gradient: ``to_local()`` is an
    autograd Function; the shard is also the DTensor's ``_local_tensor`` (what AdaScale reads)."""
    from tempfile import TemporaryDirectory

    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from adascale_shard.engines.base import grad_sqr_norms

    with TemporaryDirectory() as tmp:
        own = not dist.is_initialized()
        if own:  # a one-rank group of its own: DTensors need a device mesh
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("shard",))
        params = []
        for _ in range(num_params):
            p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)]))
            p.grad = distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)])
            params.append(p)
        grads = [p.grad for p in params]
        print(f"{num_params} DTensor gradients (64x64): shard access, microseconds for all of them")
        print(f"  to_local()                 {median_us(lambda: [g.to_local() for g in grads], 300):8.1f}")
        print(f"  _local_tensor              {median_us(lambda: [g._local_tensor for g in grads], 300):8.1f}")
        print(f"  grad_sqr_norms (AdaScale)  {median_us(lambda: grad_sqr_norms([params], torch.device('cpu')), 300):8.1f}")
        if own:
            dist.destroy_process_group()


def main() -> None:
    torch.set_num_threads(1)
    launched = "RANK" in os.environ
    if launched:
        dist.init_process_group("gloo")
    if not launched or dist.get_rank() == 0:
        norm_kernels()
        hook_dispatch()
        hook_python()
    if not launched:
        dtensor_shard_access()
    if launched:
        dist.barrier()
        all_reduce_latency()
        wait_or_poll()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
