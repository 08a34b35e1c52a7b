"""Train a small character-level transformer with AdaScale SGD under DDP.

The README's main job. Launch with ``torchrun --nproc_per_node=2 recipes/train_ddp.py`` (gloo on
CPU) or run it in one process. The corpus is the Python standard library's own source, which
every machine has; nothing is downloaded.

Each update averages ``world_size x accumulation`` micro-gradients; with the default
``--scale`` (none) the base batch is one micro-batch, so ``S = N``. The learning-rate schedule
(linear warm-up, cosine decay) is the one you would tune at the base batch for ``--budget``
steps; AdaScale reads it at ``floor(tau)`` and training stops when ``tau`` reaches the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adascale_shard import AdaScale, follow_tau


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=500, help="steps the schedule was tuned for at the base batch (T1)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (the base batch)")
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches per rank per update")
    p.add_argument("--scale", type=float, default=None, help="global batch / base batch (default: N)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps of the base schedule")
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/train_ddp")
    args = p.parse_args()
    if not 0 <= args.warmup < args.budget:
        p.error(f"--warmup {args.warmup} must be at least 0 and below --budget {args.budget} (the cosine decays after it)")
    return args


def load_corpus(limit: int) -> torch.Tensor:
    """Bytes of the standard library's top-level modules, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class CharTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, seq_len: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.zeros(seq_len, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def batch(data: torch.Tensor, size: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(len(data) - seq_len - 1, (size,), generator=gen)
    idx = start[:, None] + torch.arange(seq_len + 1)
    window = data[idx]
    return window[:, :-1], window[:, 1:]


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def main() -> None:
    args = parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(args.seed)  # identical initial weights on every rank

    data = load_corpus(args.corpus_bytes)
    split = int(0.95 * len(data))
    train_data, val_data = data[:split], data[split:]

    model = CharTransformer(seq_len=args.seq_len)
    ddp = DistributedDataParallel(model) if distributed else model
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum), scale=args.scale)

    def schedule(step: int) -> float:  # tuned at the base batch: warm-up, then cosine to 0
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - args.warmup) / (args.budget - args.warmup))))

    sched = follow_tau(torch.optim.lr_scheduler.LambdaLR(opt, schedule), opt)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own micro-batches
    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "metrics.jsonl").open("w")
        print(
            f"AdaScale demo: {world} rank(s) x {args.accumulation} micro-batches of {args.micro_batch} "
            f"sequences; budget {args.budget} scale-invariant steps",
            flush=True,
        )

    started = time.perf_counter()
    update = 0
    while not opt.budget_spent(args.budget):
        total = 0.0
        for k in range(args.accumulation):
            x, y = batch(train_data, args.micro_batch, args.seq_len, gen)
            last = k == args.accumulation - 1
            with ddp.no_sync() if distributed and not last else nullcontext():
                loss = lm_loss(ddp, x, y) / args.accumulation
                loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        sched.step()
        update += 1
        if rank == 0:
            record = {"update": update, "loss": total, **opt.stats()}  # lr, effective_lr: of this update
            log.write(json.dumps(record) + "\n")
            if update % 10 == 0 or opt.budget_spent(args.budget):
                print(
                    f"update {update:4d}  tau {opt.tau:7.1f}/{args.budget}  gain {opt.gain():5.2f}  "
                    f"loss {total:.3f}  lr {record['effective_lr']:.4f}",
                    flush=True,
                )

    model.eval()
    with torch.no_grad():
        gen_val = torch.Generator().manual_seed(12345)
        val = sum(lm_loss(model, *batch(val_data, 64, args.seq_len, gen_val)).item() for _ in range(8)) / 8
    if rank == 0:
        log.close()
        elapsed = time.perf_counter() - started
        summary = {
            "updates": update,
            "tau": opt.tau,
            "final_gain": opt.gain(),
            "N": opt.stats()["N"],
            "S": opt.stats()["S"],
            "val_loss": val,
            "seconds": elapsed,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"done: {update} updates for {opt.tau:.1f} scale-invariant steps "
            f"({opt.tau / update:.2f}x fewer updates than the base schedule), "
            f"validation loss {val:.3f}, {elapsed:.0f} s",
            flush=True,
        )
        plot(out)
    if distributed:
        dist.destroy_process_group()


def plot(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib, or pip install -e '.[plots]' in a clone of adascale-shard)")
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tau = [r["tau"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, key, label in zip(
        axes.flat,
        ("gain", "loss", "effective_lr", "noise_scale"),
        ("gain r", "training loss", "effective lr (lr x gain)", "noise scale var/sqr (base batches)"),
    ):
        ax.plot(tau, [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(rows[-1]["S"], ls="--", c="gray", label="S")
    axes[0, 0].legend()
    axes[1, 1].set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("scale-invariant steps tau")
    fig.suptitle("AdaScale on DDP: gain, loss and learning rate against tau")
    fig.tight_layout()
    fig.savefig(out / "adascale.png", dpi=110)
    print(f"plot: {out / 'adascale.png'}")


if __name__ == "__main__":
    main()
