"""A DDP + AdaScale training loop that survives a killed rank (``torchrun --max-restarts``).

Launch (gloo on CPU)::

    torchrun --standalone --nproc_per_node=2 --max-restarts=1 tests/distributed/killable_train.py --dir RUN_DIR

Every ``--every`` updates rank 0 writes one checkpoint, ``RUN_DIR/checkpoint.pt``, holding
everything the next update depends on: the model's weights, ``optimizer.state_dict()`` (the base
optimizer's momentum and AdaScale's ``tau``, gain and averages), the scheduler, the number of
updates done, the data generator's state and the gain/tau history (for the log). It is written
atomically: the bytes go to a temporary file in the same directory, which is fsynced and then
renamed over the checkpoint with ``os.replace`` (and the directory fsynced), so at every moment
``checkpoint.pt`` is either the previous complete checkpoint or the new complete one. At start,
every rank loads ``checkpoint.pt`` if it exists; rank 0 first removes temporary files that a
killed save left behind (and logs them).

The data are drawn from one generator seeded identically on every rank: each update draws the
whole global batch (``world_size x accumulation`` micro-batches) and each rank takes its own
slice, so the generator's state on rank 0 is every rank's and one saved state resumes them all.

Fault injection, each on the first attempt only (a marker file in ``RUN_DIR`` records that it
fired, so the restarted group runs clean):

* ``--kill-rank R --kill-update U --kill-micro M``: rank ``R`` sends itself SIGKILL right after
  the backward pass of micro-batch ``M`` of update ``U`` (0-based: ``U`` updates are complete),
  i.e. in the middle of an accumulation window, with AdaScale's statistics half gathered;
* ``--kill-in-save U``: rank 0, saving the checkpoint after update ``U``, writes half of the
  serialized bytes to the temporary file, fsyncs it and sends itself SIGKILL before the rename:
  a half-written checkpoint on disk.

torchrun sees the dead rank, stops the other one and restarts both (``--max-restarts=1``); they
resume from the last complete checkpoint. Rank 0 appends one JSON line per event to
``RUN_DIR/events.jsonl`` and, at the end, writes ``RUN_DIR/result.pt`` (atomically) with the
final parameters, ``tau``, the full gain and tau history and the AdaScale state.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import signal
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from adascale_shard import AdaScale, follow_tau

D_IN, HIDDEN, MICRO_BATCH = 8, 32, 8
CHECKPOINT = "checkpoint.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="run directory: checkpoint, events, result, markers")
    p.add_argument("--budget", type=float, default=30.0, help="scale-invariant steps to train for (T1)")
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per rank per update")
    p.add_argument("--every", type=int, default=3, help="checkpoint every this many updates")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-update", type=int, default=None)
    p.add_argument("--kill-micro", type=int, default=0)
    p.add_argument("--kill-in-save", type=int, default=None, help="update after which rank 0's save is cut short")
    return p.parse_args(argv)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def global_batch(gen: torch.Generator, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All micro-batches of one update (every rank draws the same ones and takes its slice)."""
    x = torch.randn(micro_batches, MICRO_BATCH, D_IN, generator=gen)
    teacher = torch.linspace(-1.0, 1.0, D_IN)
    y = torch.sin(x @ teacher).unsqueeze(-1) + 0.5 * torch.randn(micro_batches, MICRO_BATCH, 1, generator=gen)
    return x, y


def schedule(step: int) -> float:
    """Linear warm-up over 5 steps, then cosine decay over 40 (the base-batch schedule)."""
    if step < 5:
        return (step + 1) / 5
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 5) / 40)))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: object, path: str, *, die_halfway: bool = False) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, ``os.replace``, fsync dir."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data[: len(data) // 2] if die_halfway else data)
        handle.flush()
        os.fsync(handle.fileno())
    if die_halfway:  # fault injection: the process dies between writing and renaming
        die(f"killed while saving {path}: {len(data) // 2} of {len(data)} bytes in {tmp}")
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def die(why: str) -> None:
    print(f"[killable_train] rank {os.environ.get('RANK')} pid {os.getpid()}: {why}; SIGKILL", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def first_time(run_dir: str, name: str) -> bool:
    """Create the marker ``name`` (durably) and return True, or return False if it exists."""
    path = os.path.join(run_dir, name)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.fsync(fd)
    os.close(fd)
    fsync_dir(run_dir)
    return True


class Events:
    """Rank 0's event log (JSON lines); the other ranks log nothing."""

    def __init__(self, run_dir: str, rank: int, attempt: int) -> None:
        self.handle = open(os.path.join(run_dir, "events.jsonl"), "a") if rank == 0 else None
        self.attempt = attempt

    def __call__(self, event: str, **fields: object) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps({"attempt": self.attempt, "event": event, **fields}) + "\n")
            self.handle.flush()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    run_dir = args.dir
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    log = Events(run_dir, rank, attempt)
    log("start", world=world, pid=os.getpid())

    torch.manual_seed(args.seed)
    model = Net()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum))
    sched = follow_tau(torch.optim.lr_scheduler.LambdaLR(opt, schedule), opt)
    gen = torch.Generator().manual_seed(args.seed + 1)
    done, gains, taus = 0, [], []

    if rank == 0:  # leftovers of a save that was killed before its rename
        for stale in sorted(glob.glob(f"{ckpt_path}.tmp.*")):
            try:
                torch.load(stale, weights_only=True)
                loadable = True
            except Exception:
                loadable = False
            log("stale_tmp", path=os.path.basename(stale), bytes=os.path.getsize(stale), loadable=loadable)
            os.remove(stale)
    dist.barrier()
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=True)
        if ckpt["world_size"] != world:
            raise RuntimeError(f"{ckpt_path} was written by {ckpt['world_size']} ranks, this run has {world}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["data_rng"])
        done, gains, taus = ckpt["update"], list(ckpt["gains"]), list(ckpt["taus"])
        log("resumed", update=done, tau=opt.tau)
    ddp = DDP(model)  # after loading: DDP broadcasts rank 0's weights, identical anyway

    k_local = args.accumulation
    while not opt.budget_spent(args.budget):
        x, y = global_batch(gen, world * k_local)
        for k in range(k_local):
            index = rank * k_local + k
            with ddp.no_sync() if k < k_local - 1 else nullcontext():
                loss = nn.functional.mse_loss(ddp(x[index]), y[index]) / k_local
                loss.backward()
            if (rank, done, k) == (args.kill_rank, args.kill_update, args.kill_micro) and first_time(run_dir, "killed_rank"):
                die(f"mid-window at update {done}, after micro-batch {k}")
        opt.step()
        opt.zero_grad()
        sched.step()
        done += 1
        gains.append(opt.gain())
        taus.append(opt.tau)
        log("update", update=done, gain=opt.gain(), tau=opt.tau, lr=sched.get_last_lr()[0])
        if done % args.every == 0 and rank == 0:
            state = {
                "format": 1,
                "world_size": world,
                "update": done,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "data_rng": gen.get_state(),
                "gains": gains,
                "taus": taus,
            }
            cut = done == args.kill_in_save and first_time(run_dir, "killed_in_save")
            atomic_save(state, ckpt_path, die_halfway=cut)
            log("saved", update=done)

    if rank == 0:
        result = {
            "params": [p.detach().clone() for p in model.parameters()],
            "tau": opt.tau,
            "gains": gains,
            "taus": taus,
            "updates": done,
            "adascale": opt.state_dict()["adascale"],
            "attempt": attempt,
        }
        atomic_save(result, os.path.join(run_dir, "result.pt"))
        log("done", update=done, tau=opt.tau)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
