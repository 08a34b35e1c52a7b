"""A custom training loop with Hugging Face Accelerate and AdaScale: DDP, FSDP2, DeepSpeed ZeRO-2/3.

A tiny GPT-2 (built from ``transformers.GPT2Config``, nothing downloaded) learns the bytes of the
Python standard library's own source. One script for every engine; the engine comes from the
Accelerate config it is launched with (from the repository root)::

    accelerate launch --config_file configs/accelerate_ddp.yaml recipes/accelerate_loop.py --cpu
    DS_ACCELERATOR=cpu accelerate launch --config_file configs/accelerate_zero2.yaml recipes/accelerate_loop.py
    DS_ACCELERATOR=cpu accelerate launch --config_file configs/accelerate_zero3.yaml recipes/accelerate_loop.py
    DS_ACCELERATOR=cpu accelerate launch --config_file configs/accelerate_zero2_instance.yaml recipes/accelerate_loop.py
    accelerate launch --config_file configs/accelerate_fsdp2.yaml recipes/accelerate_loop.py    # GPUs only
    torchrun --standalone --nproc_per_node=2 recipes/accelerate_loop.py --manual_fsdp2      # FSDP2 on CPU

How AdaScale meets Accelerate here:

* DDP and FSDP2: the Python API, ``AdaScale(torch.optim.SGD(...))`` passed to
  ``accelerator.prepare``. Nothing more on FSDP2: Accelerate swaps the optimizer's parameters for
  the sharded ones in ``prepare``, and AdaScale attaches itself to the sharded model at its first
  forward (``adascale.attach(model)`` after ``prepare`` would do the same explicitly).
* DeepSpeed with a JSON ``"optimizer": {"type": "AdaScale"}`` block (``configs/zero2.json``,
  ``zero3.json``): Accelerate's ``DummyOptim``; the block builds AdaScale inside
  ``deepspeed.initialize`` (``import adascale_shard`` registers the type).
* DeepSpeed without an ``"optimizer"`` block (configured from the Accelerate YAML alone,
  ``configs/accelerate_zero2_instance.yaml``): the same ``AdaScale(torch.optim.SGD(...))`` as on
  DDP, which Accelerate hands to ``deepspeed.initialize``.
* ``unwrap`` gets the AdaScale instance behind whatever ``prepare`` returned; the schedule
  (warm-up, cosine) is a ``LambdaLR`` on it, read at ``floor(tau)`` (``follow_tau``), stepped after
  each update and registered for checkpointing. It is not handed to ``prepare``: a torch scheduler
  handed to ``prepare`` becomes an ``AcceleratedScheduler``, which steps it ``num_processes`` times
  per update (a schedule counted in per-process batches). Under DeepSpeed the engine has no
  scheduler here (no ``"scheduler"`` block in the JSON); the same scheduler drives the rate.
* ``accelerator.accumulate`` + ``accelerator.clip_grad_norm_``: AdaScale takes its statistics
  before the clipping (on DeepSpeed the JSON's ``gradient_clipping`` clips, and ``"auto"`` is
  filled with ``--max_grad_norm``). Training stops when ``tau`` reaches ``--budget``.
* ``accelerator.save_state`` / ``load_state`` with ``AdaScaleCheckpoint`` and the scheduler
  registered for checkpointing (FSDP2 through Accelerate drops the optimizer's ``"adascale"``
  entry; the registered object carries it on every engine). With ``--manual_fsdp2`` the model is
  sharded here with ``fully_shard`` and checkpoints go through ``torch.distributed.checkpoint``
  with ``adascale_shard.fsdp2.AdaScaleStateful``.

Why ``--cpu`` for DDP and ``--manual_fsdp2`` for FSDP2 on a machine without a GPU (Accelerate
1.15): ``accelerate launch`` starts several CPU processes only through its multi-GPU launcher
(``distributed_type: MULTI_GPU``), which does not pass the config's ``use_cpu`` on, so the script
asks for the CPU itself (``Accelerator(cpu=True)``, as Accelerate's own examples do); Accelerate
turns DeepSpeed off when ``cpu=True`` but runs it on CPU without it (``DS_ACCELERATOR=cpu``; this
script then asks for the gloo backend so that Accelerate counts the processes); and Accelerate
enables FSDP only for GPU-type devices, on CPU it falls back to plain data parallelism without a
word, so on CPU FSDP2 runs with this same loop under ``torchrun``, sharded by the script.

Each update is logged by rank 0 to ``<output_dir>/log.jsonl`` (tau, gain, lr, loss, gradient
norm, statistics); ``<output_dir>/summary.json`` is written at the end. ``--output_dir`` defaults
to ``outputs/accelerate_loop/<engine>`` (``ddp``, ``fsdp2``, ``zero2``, ``zero3``, ``single``), so
runs on different engines do not overwrite each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import adascale_shard  # noqa: F401  registers "type": "AdaScale" with DeepSpeed: before prepare
from adascale_shard import AdaScale, follow_tau, unwrap
from adascale_shard.integrations.accelerate import AdaScaleCheckpoint

ENGINES_HELP = "ddp, fsdp2, zero2, zero3 (from the Accelerate config), fsdp2 with --manual_fsdp2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=300, help="scale-invariant steps the schedule was tuned for (T1); stop when tau reaches it")
    p.add_argument("--per_device_batch_size", type=int, default=4, help="sequences per micro-batch: the base batch")
    p.add_argument("--gradient_accumulation_steps", type=int, default=4, help="micro-batches per process per update")
    p.add_argument("--learning_rate", type=float, default=0.1, help="peak learning rate at the base batch")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps of the base schedule (scale-invariant steps)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--scale", type=float, default=None, help="AdaScale's S = global batch / base batch (default: N, the micro-batches per update)")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--corpus_bytes", type=int, default=2_000_000, help="bytes of standard-library source to train on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=None, help="where the log, summary and checkpoints go (default: outputs/accelerate_loop/<engine>)")
    p.add_argument("--checkpointing_steps", type=int, default=0, help="save the state every N updates into <output_dir>/update_<n> (0: never)")
    p.add_argument("--resume_from_checkpoint", default=None, help="a directory written by --checkpointing_steps")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (DDP on a machine without a GPU; not with DeepSpeed)")
    p.add_argument(
        "--manual_fsdp2",
        action="store_true",
        help="shard the model with torch's fully_shard here instead of Accelerate's FSDP plugin "
        "(Accelerate enables FSDP only on GPUs); launch with torchrun",
    )
    args = p.parse_args(argv)
    checks = {
        "--budget": args.budget > 0,
        "--per_device_batch_size": args.per_device_batch_size >= 1,
        "--gradient_accumulation_steps": args.gradient_accumulation_steps >= 1,
        "--learning_rate": args.learning_rate > 0,
        "--max_grad_norm": args.max_grad_norm >= 0,
        "--seq_len": 2 <= args.seq_len,
        "--checkpointing_steps": args.checkpointing_steps >= 0,
        "--warmup": args.warmup >= 0,
    }
    for name, ok in checks.items():
        if not ok:
            p.error(f"{name}={getattr(args, name[2:])} is out of range (see --help)")
    if args.n_embd % args.n_head:
        p.error(f"--n_embd={args.n_embd} must be a multiple of --n_head={args.n_head}")
    if args.cpu and args.manual_fsdp2:
        p.error("--cpu asks Accelerate for DDP on the CPU; --manual_fsdp2 shards with FSDP2 instead: pass one of them")
    return args


# ---------------------------------------------------------------------------------------------
# Data and model: the same in every process and in the plain-PyTorch references of the tests.
# ---------------------------------------------------------------------------------------------
def load_corpus(limit: int) -> torch.Tensor:
    """Bytes of the standard library's top-level modules, in a fixed order (nothing downloaded)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class Windows(Dataset):
    """Non-overlapping windows of ``seq_len`` bytes in a fixed pseudo-random order (``seed``),
    cut to a whole number of updates: ``group`` windows each (every update then has the same
    micro-batches on every process, also across epochs)."""

    def __init__(self, data: torch.Tensor, seq_len: int, group: int, seed: int) -> None:
        count = len(data) // seq_len
        count -= count % group
        if count == 0:
            raise ValueError(
                f"--corpus_bytes={len(data)} gives fewer than {group} windows of --seq_len={seq_len} "
                "(one update's worth on all processes): raise --corpus_bytes"
            )
        order = torch.randperm(len(data) // seq_len, generator=torch.Generator().manual_seed(seed))[:count]
        self.windows = data[: (len(data) // seq_len) * seq_len].view(-1, seq_len)[order]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]


def build_dataset(args: argparse.Namespace, num_processes: int) -> Windows:
    group = args.per_device_batch_size * args.gradient_accumulation_steps * num_processes
    return Windows(load_corpus(args.corpus_bytes), args.seq_len, group, args.seed)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A GPT-2 over bytes, without dropout (runs are reproducible and comparable)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=args.seq_len,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # mean token cross-entropy (transformers' default, named)
    return model


def base_schedule(args: argparse.Namespace):
    """The learning-rate factor at base-batch step ``t``: linear warm-up, cosine decay to 0 at the budget."""

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        span = max(1.0, args.budget - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - args.warmup) / span)))

    return factor


def shard_fsdp2(model: torch.nn.Module) -> None:
    """What Accelerate's FSDP2 plugin does with ``TRANSFORMER_BASED_WRAP`` on ``GPT2Block``:
    ``fully_shard`` each block, then the root."""
    from torch.distributed.fsdp import fully_shard
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    for module in model.modules():
        if isinstance(module, GPT2Block):
            fully_shard(module)
    fully_shard(model)


# ---------------------------------------------------------------------------------------------
# Checks of the set-up: what Accelerate really started, against what the config asked for.
# ---------------------------------------------------------------------------------------------
def engine_name(accelerator, args: argparse.Namespace) -> str:
    """``ddp``, ``fsdp2``, ``zero<stage>`` or ``single``; raises where Accelerate silently set up
    something other than the config asked for."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if wants_deepspeed and kind != DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"the Accelerate config asks for DeepSpeed but Accelerate set up {kind}: Accelerate turns "
            "DeepSpeed off when cpu=True. Drop --cpu (and ACCELERATE_USE_CPU) and select DeepSpeed's "
            "CPU accelerator with DS_ACCELERATOR=cpu instead"
        )
    if wants_fsdp and kind != DistributedType.FSDP and not args.manual_fsdp2:
        raise RuntimeError(
            f"the Accelerate config asks for FSDP but Accelerate set up {kind}: Accelerate enables FSDP "
            "only on GPU-type devices and otherwise falls back to plain data parallelism without a "
            "word. On a machine without a GPU run FSDP2 with this loop under torchrun: "
            "torchrun --standalone --nproc_per_node=2 recipes/accelerate_loop.py --manual_fsdp2"
        )
    if args.manual_fsdp2:
        if kind != DistributedType.NO:
            raise RuntimeError(
                f"--manual_fsdp2 shards the model in this script, but Accelerate already set up {kind} "
                "and would wrap it again: launch with torchrun (no Accelerate config), or drop "
                "--manual_fsdp2 and use configs/accelerate_fsdp2.yaml on GPUs"
            )
        if not dist.is_initialized():
            raise RuntimeError("--manual_fsdp2 needs several processes: launch with torchrun --nproc_per_node=2")
        return "fsdp2"
    if accelerator.num_processes != launched or (kind == DistributedType.NO and launched > 1):
        raise RuntimeError(
            f"the launcher started {launched} processes but Accelerate set up {kind} with "
            f"{accelerator.num_processes} process(es) and no data parallelism: each process would train "
            "alone. On a machine without a GPU "
            "pass --cpu (DDP on gloo; `accelerate launch` does not pass the config's use_cpu on to a "
            "multi-process launch), or use a DeepSpeed config with DS_ACCELERATOR=cpu"
        )
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise ValueError("AdaScale supports FSDP2 (fully_shard) only: set fsdp_version: 2 in the Accelerate config")
        return "fsdp2"
    if kind == DistributedType.NO:
        return "single"
    return "ddp"


def output_dir(args: argparse.Namespace, engine: str) -> Path:
    """``--output_dir``, or ``outputs/accelerate_loop/<engine>`` (``engine`` from :func:`engine_name`)."""
    return Path(args.output_dir) if args.output_dir else Path("outputs") / "accelerate_loop" / engine


def check_deepspeed_config(config: dict, args: argparse.Namespace, source: str = "the DeepSpeed config") -> bool:
    """The DeepSpeed config (``config``, as Accelerate read it: a JSON file or the Accelerate YAML's
    ``deepspeed_config`` fields) must build AdaScale, or build no optimizer, and agree with the
    script's settings; its ``"auto"`` values are filled from them in place (Accelerate alone would
    fill ``gradient_clipping`` with 1.0). True: the JSON's ``"optimizer"`` block builds AdaScale
    (the script passes ``DummyOptim``); False: no block, the script passes an ``AdaScale``."""
    optimizer = config.get("optimizer")
    if optimizer is None:
        _fill_clipping(config, args, source)
        return False
    if not isinstance(optimizer, dict) or str(optimizer.get("type", "")).lower() != "adascale":
        raise ValueError(
            f'{source} has no "optimizer": {{"type": "AdaScale", ...}} block (found {optimizer!r}): this '
            "recipe builds AdaScale from the JSON through accelerate.utils.DummyOptim, or passes an "
            'AdaScale instance when the config has no "optimizer" block; use configs/zero2.json, '
            "configs/zero3.json or configs/accelerate_zero2_instance.yaml"
        )
    params = optimizer.setdefault("params", {})
    wanted = {"lr": ("--learning_rate", args.learning_rate), "momentum": ("--momentum", args.momentum), "scale": ("--scale", args.scale)}
    for key, (flag, value) in wanted.items():
        saved = params.get(key, "auto" if key == "lr" else None)
        if saved == "auto":
            params[key] = value
            continue
        same = saved is None and value is None
        if saved is not None and value is not None:
            same = math.isclose(float(saved), float(value))
        if not same:
            raise ValueError(
                f'{source}: optimizer.params.{key}={saved!r} but {flag}={value!r}: set "{key}": "auto" '
                "in the JSON, or pass the same value to the script"
            )
    _fill_clipping(config, args, source)
    return True


def _fill_clipping(config: dict, args: argparse.Namespace, source: str) -> None:
    clipping = config.get("gradient_clipping", "auto")
    if clipping == "auto":
        config["gradient_clipping"] = args.max_grad_norm
    elif not math.isclose(float(clipping), args.max_grad_norm):
        raise ValueError(
            f"{source}: gradient_clipping={clipping} but --max_grad_norm={args.max_grad_norm}: under "
            'DeepSpeed the JSON value clips; set "gradient_clipping": "auto" or pass the same value'
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, path: Path, args, model, adascale: AdaScale, scheduler) -> None:
    if not args.manual_fsdp2:
        accelerator.save_state(str(path))  # with AdaScaleCheckpoint and the scheduler registered
        return
    import torch.distributed.checkpoint as dcp

    from adascale_shard.fsdp2 import AdaScaleStateful

    dcp.save({"train": AdaScaleStateful(model, adascale)}, checkpoint_id=str(path / "dcp"))
    if accelerator.is_main_process:
        torch.save({"scheduler": scheduler.state_dict()}, path / "scheduler.pt")
    dist.barrier()


def load_checkpoint(accelerator, path: Path, args, model, adascale: AdaScale, scheduler) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint={path} is not a directory written by --checkpointing_steps")
    if not args.manual_fsdp2:
        accelerator.load_state(str(path))
    else:
        import torch.distributed.checkpoint as dcp

        from adascale_shard.fsdp2 import AdaScaleStateful

        dcp.load({"train": AdaScaleStateful(model, adascale)}, checkpoint_id=str(path / "dcp"))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])
    # The learning rate the schedule had set (engines differ in whether they restore group["lr"]).
    for group, lr in zip(adascale.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------
def mean_over_processes(values: list[torch.Tensor]) -> float:
    local = torch.stack(values).mean().detach().float()  # on the training device (NCCL needs it there)
    if dist.is_initialized():
        dist.all_reduce(local)
        local /= dist.get_world_size()
    return float(local)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, DummyOptim, InitProcessGroupKwargs

    # Several processes without a GPU: name the backend, or Accelerate picks none for DeepSpeed
    # (and counts one process).
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if several and not torch.cuda.is_available() else []
    accelerator = Accelerator(
        cpu=args.cpu, gradient_accumulation_steps=args.gradient_accumulation_steps, kwargs_handlers=handlers
    )
    engine = engine_name(accelerator, args)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    world = accelerator.num_processes
    accumulation = args.gradient_accumulation_steps

    dataset = build_dataset(args, world)
    loader = DataLoader(dataset, batch_size=args.per_device_batch_size, shuffle=False, drop_last=True)
    model = build_model(args)
    if args.manual_fsdp2:
        shard_fsdp2(model)
    json_block = False
    if deepspeed:
        source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the Accelerate config's deepspeed_config")
        json_block = check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, args, source)
    if json_block:
        optimizer = DummyOptim(model.parameters(), lr=args.learning_rate)  # the JSON builds AdaScale
    else:  # DDP, FSDP2, and DeepSpeed without an "optimizer" block (deepspeed.initialize gets the instance)
        optimizer = AdaScale(
            torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum), scale=args.scale
        )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    adascale = unwrap(optimizer)  # on FSDP2 it attaches itself to the sharded model at the first forward
    scheduler = follow_tau(torch.optim.lr_scheduler.LambdaLR(adascale, base_schedule(args)), adascale)
    if not args.manual_fsdp2:
        accelerator.register_for_checkpointing(AdaScaleCheckpoint(adascale), scheduler)

    start_update = 0
    if args.resume_from_checkpoint:
        load_checkpoint(accelerator, Path(args.resume_from_checkpoint), args, model, adascale, scheduler)
        start_update = int(adascale.stats()["updates"])
    out = output_dir(args, engine)
    log = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "log.jsonl").open("a" if args.resume_from_checkpoint else "w")
        accelerator.print(
            f"accelerate_loop: engine {engine}, {world} process(es) x {accumulation} micro-batches of "
            f"{args.per_device_batch_size} sequences, budget {args.budget:g} scale-invariant steps"
            + (f", resumed at update {start_update} (tau {adascale.tau:.3f})" if start_update else "")
        )

    batches_per_epoch = len(loader)
    epoch, skip = divmod(start_update * accumulation, batches_per_epoch)
    update = start_update
    losses: list[torch.Tensor] = []
    grad_norm = float("nan")
    batches = loader
    started = time.perf_counter()
    model.train()
    while not adascale.budget_spent(args.budget):
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                losses.append(loss.detach())
                accelerator.backward(loss)  # under DeepSpeed the engine also steps here
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()  # to floor(tau)
            update += 1
            stats = adascale.stats()  # lr and effective_lr of this update, whenever the engine moved the schedule
            record = {
                "update": update,
                "epoch": epoch,
                "tau": stats["tau"],
                "gain": stats["gain"],
                "lr": stats["lr"],
                "effective_lr": stats["effective_lr"],
                "loss": mean_over_processes(losses),
                "grad_norm": float(grad_norm),
                "var": stats["var"],
                "sqr": stats["sqr"],
                "noise_scale": stats["noise_scale"],
                "N": stats["N"],
                "S": stats["S"],
            }
            losses = []
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if args.checkpointing_steps and update % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, out / f"update_{update}", args, model, adascale, scheduler)
            if adascale.budget_spent(args.budget):
                break
        epoch += 1

    if log is not None:
        log.close()
        summary = {
            "engine": engine,
            "optimizer_source": "the JSON block" if json_block else "an AdaScale instance",
            "processes": world,
            "gradient_accumulation_steps": accumulation,
            "budget": args.budget,
            "start_update": start_update,
            "updates": update,
            "tau": adascale.tau,
            "seconds": time.perf_counter() - started,
            "final": adascale.stats(),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(
            f"accelerate_loop: done after {update} updates, tau {adascale.tau:.3f} >= budget {args.budget:g}, "
            f"last gain {adascale.gain():.3f}; log in {out / 'log.jsonl'}"
        )
    accelerator.wait_for_everyone()
    # Release the engines (DDP's reducer, DeepSpeed's engine hold the process group) before the
    # group is destroyed; the other way round, gloo sometimes aborts at exit.
    del model, optimizer, adascale, scheduler, loader, batches
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main()
