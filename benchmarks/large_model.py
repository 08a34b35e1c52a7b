"""AdaScale on a GPT-2-small-sized model (124M parameters): time per update and memory per rank,
with and without AdaScale, on DeepSpeed ZeRO-3, ZeRO-3 + offload, FSDP1 and FSDP2 (issue 24).

Launch on 2 gloo ranks (one thread each, as torchrun sets)::

    DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node=2 benchmarks/large_model.py --engine zero3 --adascale both
    DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node=2 benchmarks/large_model.py --engine zero3 --adascale off
    DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node=2 benchmarks/large_model.py --engine zero3 --adascale on
    .venv/bin/python benchmarks/large_model.py --table        # benchmarks/results/large_model.md from the JSONL

(``benchmarks/run_large_model.sh`` runs the three launches for every engine, then the table.)

The model is ``GPT2LMHeadModel(GPT2Config())`` (built from the config, nothing downloaded; dropout
off so that both variants compute the same thing), fp32, micro-batches of 2 sequences x 64 random
token ids from a fixed generator, 2 micro-batches per rank per update (N = 4 micro-gradients on 2
ranks), SGD with momentum 0.9 as the base optimizer.

``--adascale both``: both variants (the plain SGD, and AdaScale around the same SGD) are built in
the same processes from the same weights and timed in alternation, update by update, each
variant first in every other pair, so machine drift cancels; the time ratio is the geometric mean of the paired
ratios with a t-interval. Also measured there, outside the timed pairs: the tensor bytes each
variant allocates during one update (every non-view op output, counted with a dispatch mode) and
the bytes of the tensors AdaScale itself keeps between updates (found by walking the AdaScale
object, its capture, engine and estimator; the base optimizer, the model and DeepSpeed's objects
are not entered), next to the same number computed from the capture's chunks.

``--adascale off`` / ``--adascale on``: one variant only, so that the process's peak resident set
(``getrusage(RUSAGE_SELF).ru_maxrss``, per rank) is that variant's. CPU has no per-variant peak
memory counter inside one process; the two launches are the same script with the same weights and
batches, so the difference of their peaks is what AdaScale adds (up to the allocator's noise).

Each launch appends one JSON object to ``--output`` (default ``benchmarks/results/large_model.jsonl``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ENGINES = ("zero3", "zero3_offload", "fsdp1", "fsdp2")
LR, MOMENTUM = 0.01, 0.9
SEQUENCES, TOKENS = 2, 64
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "large_model.jsonl"

# Two-sided 95% quantiles of Student's t for df = 1..30 (beyond: 1.96).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES)
    p.add_argument(
        "--adascale",
        choices=("both", "on", "off"),
        default="both",
        help="both: paired timing and byte counts in one launch; on/off: one variant, for its peak RSS",
    )
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per rank per update")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates per variant first")
    p.add_argument("--pairs", type=int, default=6, help="timed updates per variant (--adascale both)")
    p.add_argument("--updates", type=int, default=3, help="updates after the warm-up (--adascale on/off)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--table", action="store_true", help="write the Markdown table from --output and exit")
    p.add_argument("--table-output", default=None, help="default: --output with .md")
    args = p.parse_args(argv)
    if not args.table and args.engine is None:
        p.error("--engine is required (or --table)")
    return args


# ---------------------------------------------------------------------------------------------
# Model, data, variants.
# ---------------------------------------------------------------------------------------------
def build_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50257 tokens, 124M parameters
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def micro_batch(step: int, rank: int, vocab: int = 50257) -> dict:
    import torch

    gen = torch.Generator().manual_seed(10_000 * rank + step)
    ids = torch.randint(vocab, (SEQUENCES, TOKENS), generator=gen)
    return {"input_ids": ids, "labels": ids}


def ds_config(engine: str, kind: str, accumulation: int) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": SEQUENCES,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if engine == "zero3_offload":
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    if kind == "adascale":
        config["optimizer"] = {"type": "AdaScale", "params": {"optimizer": "SGD", "lr": LR, "momentum": MOMENTUM}}
    else:
        config["optimizer"] = {"type": "SGD", "params": {"lr": LR, "momentum": MOMENTUM}}
        config["zero_allow_untested_optimizer"] = True  # torch's SGD under ZeRO
        if engine == "zero3_offload":
            config["zero_force_ds_cpu_optimizer"] = False  # torch's SGD under offload
    return config


def make_variant(engine: str, kind: str, accumulation: int):
    """``kind`` is "base" or "adascale"; returns (update_fn, adascale_or_None, n_params)."""
    import torch
    import torch.distributed as dist

    from adascale_shard import AdaScale

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    rank = dist.get_rank()

    def batch(step: int, k: int) -> dict:
        return micro_batch(step * accumulation + k, rank)

    if engine.startswith("zero3"):
        import deepspeed

        config = ds_config(engine, kind, accumulation)
        engine_, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

        def update(step: int) -> None:
            for k in range(accumulation):
                engine_.backward(engine_(**batch(step, k)).loss)
                engine_.step()

        adascale = engine_.basic_optimizer
        if kind == "adascale":
            assert isinstance(adascale, AdaScale), type(adascale)
        else:
            assert type(adascale) is torch.optim.SGD, type(adascale)
            adascale = None
        return update, adascale, n_params

    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({GPT2Block})
        )

        def context(k: int):
            return wrapped.no_sync() if k < accumulation - 1 else nullcontext()

    else:  # fsdp2
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        wrapped = model

        def context(k: int):
            wrapped.set_requires_gradient_sync(k == accumulation - 1)
            return nullcontext()

    base = torch.optim.SGD(wrapped.parameters(), lr=LR, momentum=MOMENTUM)
    # No attach call: AdaScale attaches itself at the first forward (docs/engines/fsdp1.md, fsdp2.md).
    opt = AdaScale(base) if kind == "adascale" else base

    def update(step: int) -> None:
        for k in range(accumulation):
            with context(k):
                (wrapped(**batch(step, k)).loss / accumulation).backward()
        opt.step()
        opt.zero_grad()

    return update, (opt if kind == "adascale" else None), n_params


# ---------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(update, step: int) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    update(step)
    dist.barrier()  # the update is over on every rank
    return time.perf_counter() - start


def ratio_ci(ratios: list[float]) -> tuple[float, float, float]:
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    t = T95[len(logs) - 2] if len(logs) - 1 <= len(T95) else 1.96
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def allocated_bytes(update, step: int) -> int:
    """Bytes of every non-view tensor produced by an op during one update: overhead.py's count."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from overhead import allocated_bytes as count

    return count(update, step)


def adascale_tensors(adascale) -> dict:
    """The tensors AdaScale keeps between updates: walk the AdaScale object, its capture, engine and
    estimator (objects of adascale_shard's own classes and plain containers), never entering the
    base optimizer, the model, DeepSpeed's or torch's objects. Parameters and their gradients are
    not AdaScale's and are skipped. Returns the total bytes, the count, and the largest tensor."""
    import torch

    base = adascale.optimizer
    seen: set[int] = set()
    storages: dict[int, int] = {}
    largest = 0
    stack = [adascale]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is base:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, torch.nn.Parameter) or obj.device.type == "meta":
                continue
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a DTensor or a tensor subclass: not ours
                continue
            storages[storage.data_ptr()] = storage.nbytes()
            largest = max(largest, storage.nbytes())
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
            continue
        module = type(obj).__module__ or ""
        if not module.startswith("adascale_shard"):
            continue
        if hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(obj, name):
                    stack.append(getattr(obj, name))
    return {"bytes": sum(storages.values()), "tensors": len(storages), "largest_bytes": largest}


def adascale_analytic(adascale) -> dict:
    """AdaScale's persistent bytes from the capture's chunks: per norm slot (one per hooked tensor,
    slots allocated ahead in chunks) the norm in the gradient's float dtype (4 bytes in fp32), its
    float64 window sum (8 bytes) and its int64 group index (8 bytes); plus per statistics group a
    float64 micro-gradient sum and the engine's float64 part of ||G||^2."""
    capture = adascale._capture
    chunks = capture._chunks
    slots = sum(len(c.norms) for c in chunks)
    hooks = capture.num_hooks
    per_chunk = sum(
        c.norms.numel() * c.norms.element_size()
        + c.sqr.numel() * c.sqr.element_size()
        + (0 if c.index is None else c.index.numel() * c.index.element_size())
        for c in chunks
    )
    groups = len(capture.groups)
    # FSDP1/FSDP2 keep each rank's part of ||G||^2 per group (float64); ZeRO takes DeepSpeed's norm.
    engine_part = getattr(getattr(adascale, "_engine", None), "_grad_sqr", None)
    engine_groups = groups if engine_part is not None else 0
    return {
        "hooks": hooks,
        "slots": slots,
        "chunks": len(chunks),
        "groups": groups,
        "chunk_bytes": per_chunk,
        "formula": "slots x (4 B norm + 8 B float64 sum + 8 B int64 index) + groups x 8 B (micro sum) "
        "+ groups x 8 B (||G||^2 part, FSDP only)",
        "bytes": per_chunk + groups * 8 + engine_groups * 8,
    }


def gather(value):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import adascale_shard

    if args.engine.startswith("zero3"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()

    def say(message: str) -> None:
        if rank == 0:
            print(f"[large_model {args.engine} {args.adascale}] {message}", flush=True)

    kinds = {"both": ["base", "adascale"], "off": ["base"], "on": ["adascale"]}[args.adascale]
    rss_start = current_rss_bytes()
    variants = {}
    for kind in kinds:
        t0 = time.perf_counter()
        variants[kind] = make_variant(args.engine, kind, args.accumulation)
        gc.collect()
        say(f"built {kind} in {time.perf_counter() - t0:.1f} s, RSS {current_rss_bytes() / 2**30:.2f} GiB")
    n_params = variants[kinds[0]][2]
    rss_built = current_rss_bytes()

    step = 0
    warmup_s = {kind: [] for kind in kinds}
    for kind in kinds:  # the first update allocates the gradients, the momentum, DeepSpeed's buffers
        for _ in range(args.warmup):
            warmup_s[kind].append(timed(variants[kind][0], step))
            say(f"warm-up {kind}: {warmup_s[kind][-1]:.2f} s")
            step += 1

    result = {
        "engine": args.engine,
        "mode": args.adascale,
        "world_size": dist.get_world_size(),
        "parameters": n_params,
        "accumulation": args.accumulation,
        "micro_batches_per_update": args.accumulation * dist.get_world_size(),
        "micro_batch": f"{SEQUENCES} x {TOKENS} tokens",
        "torch": torch.__version__,
        "adascale_shard": adascale_shard.__version__,
        "command": "DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node=2 benchmarks/large_model.py "
        + " ".join(sys.argv[1:]),
        "warmup_s": warmup_s,
    }
    if args.engine.startswith("zero3"):
        import deepspeed

        result["deepspeed"] = deepspeed.__version__

    if args.adascale == "both":
        times = {kind: [] for kind in kinds}
        ratios = []
        orders = []
        for pair in range(args.pairs):
            # Alternating order (base first, then AdaScale first, ...): each variant runs first in
            # half the pairs, so an order effect or a linear drift cancels (a random order drew
            # 7 of 8 pairs with base first in a trial run).
            order = kinds[:] if pair % 2 == 0 else kinds[::-1]
            sample = {kind: timed(variants[kind][0], step) for kind in order}
            step += 1
            for kind in kinds:
                times[kind].append(sample[kind])
            ratios.append(sample["adascale"] / sample["base"])
            orders.append(order[0])
            say(
                f"pair {pair + 1}/{args.pairs} ({order[0]} first): base {sample['base']:.2f} s, "
                f"adascale {sample['adascale']:.2f} s, ratio {ratios[-1]:.3f}"
            )
        mean, lo, hi = ratio_ci(ratios)
        result["pairs"] = args.pairs
        result["seconds_per_update"] = times
        result["median_s"] = {kind: statistics.median(t) for kind, t in times.items()}
        result["ratio"] = {"mean": mean, "ci95": [lo, hi], "per_pair": ratios, "first": orders}
        for first in kinds:  # the ratio over the pairs where each variant ran first
            subset = [r for r, o in zip(ratios, orders) if o == first]
            if subset:
                result["ratio"][f"mean_{first}_first"] = math.exp(statistics.fmean(math.log(r) for r in subset))
        # Untimed: bytes allocated in one update, per variant, and what AdaScale keeps.
        result["allocated_bytes_per_update"] = {}
        for kind in kinds:
            result["allocated_bytes_per_update"][kind] = allocated_bytes(variants[kind][0], step)
            step += 1
        adascale = variants["adascale"][1]
        result["adascale_persistent"] = gather(adascale_tensors(adascale))
        result["adascale_analytic"] = gather(adascale_analytic(adascale))
        stats = adascale.stats()
        result["adascale_stats"] = {k: stats[k] for k in ("gain", "N", "S", "tau")}
        say(
            f"ratio {mean:.3f} [{lo:.3f}, {hi:.3f}], AdaScale keeps "
            f"{result['adascale_persistent'][0]['bytes']} B on rank 0, allocates "
            f"{result['allocated_bytes_per_update']['adascale'] - result['allocated_bytes_per_update']['base']:+d} B "
            "per update more than the base"
        )
    else:
        times = []
        for u in range(args.updates):
            times.append(timed(variants[kinds[0]][0], step))
            step += 1
            say(f"update {u + 1}/{args.updates}: {times[-1]:.2f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
        result["updates"] = args.updates
        result["seconds_per_update"] = times
        if kinds == ["adascale"]:
            result["adascale_persistent"] = gather(adascale_tensors(variants["adascale"][1]))

    result["rss_bytes"] = gather(
        {"start": rss_start, "built": rss_built, "end": current_rss_bytes(), "peak": peak_rss_bytes()}
    )
    if rank == 0:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        say(f"peak RSS per rank {[r['peak'] / 2**30 for r in result['rss_bytes']]} GiB; appended to {out}")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------
def write_table(path: Path, out: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[tuple[str, str], tuple[int, dict]] = {}
    for number, row in enumerate(rows, 1):
        latest[(row["engine"], row["mode"])] = (number, row)
    lines = [
        "# AdaScale on GPT-2 small (124M parameters), 2 gloo ranks, CPU",
        "",
        f"Generated by `python benchmarks/large_model.py --table` from `{path.name}` (the latest launch of each "
        "engine x mode; the JSONL line numbers are given). See `docs/performance.md` for what each number means.",
        "",
        "| engine | ranks | params | micro-batches / update | s/update without | s/update with | ratio (95% CI) | median paired ratio | pairs "
        "| peak RSS / rank without (GiB) | peak RSS / rank with (GiB) | RSS ratio | AdaScale's persistent bytes / rank "
        "| extra bytes allocated / update | gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    commands = []
    for engine in ENGINES:
        both = latest.get((engine, "both"))
        off = latest.get((engine, "off"))
        on = latest.get((engine, "on"))
        if both is None and off is None and on is None:
            continue
        any_row = next(r for r in (both, off, on) if r is not None)[1]
        cells = [engine, str(any_row["world_size"]), f"{any_row['parameters'] / 1e6:.1f}M",
                 str(any_row["micro_batches_per_update"])]  # fmt: skip
        if both is not None:
            b = both[1]
            r = b["ratio"]
            cells += [
                f"{b['median_s']['base']:.2f}",
                f"{b['median_s']['adascale']:.2f}",
                f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
                f"{statistics.median(r['per_pair']):.3f}" if r.get("per_pair") else "-",
                str(b["pairs"]),
            ]
        else:
            cells += ["-"] * 5
        peaks = {}
        for name, entry in (("off", off), ("on", on)):
            if entry is not None:
                peaks[name] = [x["peak"] / 2**30 for x in entry[1]["rss_bytes"]]
        cells.append(" / ".join(f"{p:.2f}" for p in peaks["off"]) if "off" in peaks else "-")
        cells.append(" / ".join(f"{p:.2f}" for p in peaks["on"]) if "on" in peaks else "-")
        if "off" in peaks and "on" in peaks:
            cells.append(" / ".join(f"{a / b:.3f}" for a, b in zip(peaks["on"], peaks["off"])))
        else:
            cells.append("-")
        if both is not None:
            b = both[1]
            cells.append(" / ".join(f"{x['bytes']:,}" for x in b["adascale_persistent"]))
            alloc = b["allocated_bytes_per_update"]
            cells.append(f"{alloc['adascale'] - alloc['base']:+,}")
            cells.append(f"{b['adascale_stats']['gain']:.3f}")
        else:
            cells += ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
        for entry in (both, off, on):
            if entry is not None:
                commands.append(f"{entry[1]['command']}    # line {entry[0]}")
    every = [(n, r) for n, r in enumerate(rows, 1) if r["mode"] in ("off", "on")]
    if every:
        lines += [
            "",
            "Every single-variant launch in the file (the launch-to-launch spread of the peak is the noise "
            "against which the with/without difference is read):",
            "",
            "| line | engine | AdaScale | peak RSS rank 0 (GiB) | peak RSS rank 1 (GiB) | s/update (after warm-up) |",
            "|---|---|---|---|---|---|",
        ]
        for number, row in every:
            peaks = [x["peak"] / 2**30 for x in row["rss_bytes"]]
            secs = ", ".join(f"{t:.1f}" for t in row["seconds_per_update"])
            lines.append(f"| {number} | {row['engine']} | {row['mode']} | {peaks[0]:.3f} | {peaks[1]:.3f} | {secs} |")
    lines += [
        "",
        "- **s/update**: median wall time of one update (2 micro-batches of forward and backward per rank, "
        "then the step), timed with a barrier on both sides; both variants in the same processes, alternated "
        "update by update (`--adascale both`). **ratio**: geometric mean of the paired ratios with AdaScale / "
        "without, 95% t-interval; **median paired ratio**: the median of the same ratios (robust to a pair "
        "that another job on the machine slowed).",
        "- **peak RSS / rank**: `getrusage(RUSAGE_SELF).ru_maxrss` of rank 0 / rank 1, each from a launch "
        "that built only that variant (`--adascale off` / `--adascale on`): the whole process (Python, torch, "
        "the model as built before sharding, the engine's buffers).",
        "- **AdaScale's persistent bytes / rank**: the tensors the AdaScale object keeps between updates "
        "(capture chunks: one fp32 norm, one float64 sum and one int64 group index per hooked tensor; a "
        "float64 per statistics group), rank 0 / rank 1.",
        "- **extra bytes allocated / update**: bytes of all op outputs during one update with AdaScale minus "
        "without (rank 0, a dispatch mode), i.e. AdaScale's transient allocations.",
        "",
        "Commands (each `DS_ACCELERATOR=cpu`, `PYTHONPATH` at the checkout):",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        output = Path(args.output)
        print(write_table(output, Path(args.table_output) if args.table_output else output.with_suffix(".md")))
        return
    run(args)


if __name__ == "__main__":
    main()
