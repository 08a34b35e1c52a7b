"""FSDP2 (``fully_shard``) on 2 gloo ranks: AdaScale's statistics equal the single-process ones.

The same model, the same N micro-batches per update in the same order, SGD (lr 0.05,
momentum 0.9) for 6 updates:

* reference: one process, no process group, N accumulation steps (loss / N), plain AdaScale;
* FSDP2: 2 ranks, K = N / 2 micro-batches each (loss / K; FSDP2 averages over the 2 ranks), with
  ``opt.attach(model)`` or, in the ``auto-attach`` cases, without it (AdaScale attaches itself at
  the first forward), in the modes of ``FSDP_CASES`` (name = layout): N in {2, 4, 8}
  (accumulation 1, 2, 4 per rank), ``set_requires_gradient_sync(False)`` on the non-final
  micro-steps or a reduce-scatter after every backward, nested ``fully_shard`` units or only the
  root, ``reshard_after_forward`` True / False, an optimizer built before ``fully_shard`` whose
  parameters are then swapped for the DTensors (what Accelerate's ``prepare`` does), a GPT-2-style
  model with tied input/output embeddings, and bf16 ``MixedPrecisionPolicy``.

Gain, tau, var, sqr and the full gathered parameters (``p.full_tensor()``) must equal the
reference at every update. Also checked here: the order of FSDP2's final backward callback and
AdaScale's ``||G||^2`` snapshot; a ``torch.distributed.checkpoint`` save mid-run, loaded into a
fresh process group, continues bit for bit like the uninterrupted run; that an auto-attach run
equals its explicit-attach twin; what the automatic attach does with a submodule run first and
with another model's forward; the error of an update whose hooks never fired; and the
collectives AdaScale adds per update.

Two launches in all (one for every case, one for the resume). ``pytest -s`` prints the
difference table.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adascale_shard import AdaScale
from tests.distributed._reference import assert_bf16_close, assert_matches_reference
from tests.harness import Case, error_of, run_cases

pytestmark = pytest.mark.distributed

UPDATES = 6
LR, MOMENTUM = 0.05, 0.9
MODEL_SEED, DATA_SEED = 0, 4321
CKPT_AT = 3  # the checkpoint is taken after this many updates
CLIP_MAX_NORM = 0.05  # far below ||G|| here: clipping acts at every update

# fp32 tolerance. FSDP2 sums the same micro-gradients in another association order than one
# process ((h1 + .. + hK) on each rank, then the reduce-scatter's average of 2 shards, vs
# (g1 + .. + gN) / N), so G differs by a few ulps (float32 eps 1.2e-7) per element; that
# travels through 6 momentum updates at lr * gain <= 0.4. rtol 1e-5 / atol 1e-6 is ~100 ulps of
# headroom and still far below what a normalisation bug does (a factor K or 2 in A, ||G||^2 off
# by the missing root shard: see test_tolerance_catches_a_normalisation_bug).
RTOL, ATOL = 1e-5, 1e-6
# bf16 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) against the fp32 reference:
# forward and backward run in bf16 (8-bit mantissa, unit roundoff 2^-8 = 3.9e-3), so every
# micro-gradient carries a relative error of ~1e-2 and the parameters drift by ~lr * |G| * 1e-2
# per update. The statistics come from those bf16 micro-gradients and their fp32 reduction, so
# they move by a few percent of the gain's distance from 1 (var ~ A - B amplifies the relative
# error of A and B). Measured worst over 6 updates (printed table): gain 1.3e-3 relative, tau
# 4.4e-4 relative, parameters 2.9e-3 absolute (they are O(0.3)). The bounds leave 3-8x headroom
# and are still far tighter than a normalisation bug (gain off by 2.7, see the bug case).
BF16_GAIN_RTOL = 1e-2
BF16_PARAM_ATOL = 1e-2


# ---------------------------------------------------------------------------------------------
# Models and data: identical in every process (deterministic CPU generators).
# ---------------------------------------------------------------------------------------------
D_IN, HIDDEN, MICRO_BATCH = 8, 24, 8


class MLP(nn.Module):
    """Three layers; fc3's bias has one element, so rank 1's shard of it is empty (padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    def units(self) -> list[nn.Module]:
        return [self.fc1, self.fc2]


VOCAB, CONTEXT, D_MODEL, HEADS, LAYERS, SEQS = 32, 8, 16, 2, 2, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.fc = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.out = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, HEADS, d // HEADS).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // HEADS)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """GPT-2 layout in pure torch: token + position embeddings, pre-LN blocks, final LayerNorm,
    and an LM head whose weight *is* the token embedding (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D_MODEL)
        self.wpe = nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # tied input/output embedding

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def units(self) -> list[nn.Module]:
        return list(self.blocks)


def build_model(kind: str) -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return {"mlp": MLP, "gpt": TinyGPT}[kind]()


def micro_batches(kind: str, update: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``count`` micro-batches of one update: a noisy teacher, so the gain is inside (1, N)."""
    gen = torch.Generator().manual_seed(DATA_SEED + 1000 * count + update)
    out = []
    if kind == "mlp":
        w = torch.randn(D_IN, generator=torch.Generator().manual_seed(DATA_SEED))
        for _ in range(count):
            x = torch.randn(MICRO_BATCH, D_IN, generator=gen)
            # The offset gives a consistent gradient direction: the gain stays inside (1, N).
            y = torch.sin(x @ w).unsqueeze(1) + 0.5 + 0.3 * torch.randn(MICRO_BATCH, 1, generator=gen)
            out.append((x, y))
        return out
    # Sequences of a noisy "add 3 mod VOCAB" chain: learnable, with sampling noise.
    for _ in range(count):
        start = torch.randint(0, VOCAB, (SEQS, 1), generator=gen)
        steps = 3 + (torch.rand(SEQS, CONTEXT, generator=gen) < 0.3).long() * torch.randint(
            1, VOCAB, (SEQS, CONTEXT), generator=gen
        )
        seq = (start + steps.cumsum(1)) % VOCAB
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def loss_fn(kind: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    out = model(x)
    if kind == "mlp":
        return F.mse_loss(out.float(), y)
    return F.cross_entropy(out.float().reshape(-1, VOCAB), y.reshape(-1))


def flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter, gathered if sharded, flattened (float32)."""
    parts = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(full.detach().float().reshape(-1))
    return torch.cat(parts)


def record(out: dict, opt: AdaScale, model: nn.Module) -> None:
    stats = opt.stats()
    for key in ("gain", "tau", "var", "sqr", "N", "S", "dropped_windows", "updates"):
        out.setdefault(key, []).append(stats[key])
    out.setdefault("params", []).append(flat_params(model))


# ---------------------------------------------------------------------------------------------
# Single-process reference (runs in the pytest parent: no process group).
# ---------------------------------------------------------------------------------------------
def train_reference(kind: str, count: int) -> dict:
    model = build_model(kind)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    out: dict = {}
    for update in range(UPDATES):
        for batch in micro_batches(kind, update, count):
            (loss_fn(kind, model, batch) / count).backward()
        opt.step()
        opt.zero_grad()
        record(out, opt, model)
    return out


# ---------------------------------------------------------------------------------------------
# FSDP2 runs (each rank of a launch).
# ---------------------------------------------------------------------------------------------
def shard(model: nn.Module, *, nested: bool, reshard: bool, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if nested:
        for unit in model.units():
            fully_shard(unit, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=mp)


def swap_in(opt: AdaScale, model: nn.Module, names: dict[int, str]) -> None:
    """Replace the optimizer's parameters by the model's current ones of the same name (``names``:
    id of the old parameter -> name), as Accelerate's ``prepare`` does after sharding."""
    new = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [new[names[id(p)]] for p in group["params"]]


def build_fsdp(
    kind: str, *, nested: bool = True, reshard: bool = True, bf16: bool = False, swap: bool = False
) -> tuple[nn.Module, AdaScale]:
    model = build_model(kind)
    if swap:
        # Accelerate's order: optimizer on the plain parameters, then prepare() shards the model
        # and swaps the optimizer's parameters for the new DTensors (matched by name).
        opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
        names = {id(p): name for name, p in model.named_parameters()}
        shard(model, nested=nested, reshard=reshard, bf16=bf16)
        swap_in(opt, model, names)
    else:
        shard(model, nested=nested, reshard=reshard, bf16=bf16)
        opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    return model, opt


def run_updates(
    rank, world_size, kind, count, model, opt, updates, *, no_sync, out, trace=None, clip=None
) -> dict:
    k_per_rank = count // world_size
    from adascale_shard.engines.base import grad_sqr_norms

    for update in updates:
        batches = micro_batches(kind, update, count)[rank * k_per_rank : (rank + 1) * k_per_rank]
        for k, batch in enumerate(batches):
            if no_sync:
                model.set_requires_gradient_sync(k == k_per_rank - 1)
            if trace is not None:
                trace.append(f"forward {k}")
            (loss_fn(kind, model, batch) / k_per_rank).backward()
        # The snapshot taken when the last pass closed must be the final reduced gradient.
        capture = opt._capture
        now = grad_sqr_norms(capture.groups, capture.device)
        out.setdefault("snapshot_vs_final", []).append(float((opt._engine.take_grad_sqr(capture)[0] - now).abs().max()))
        out.setdefault("local_grad_sqr", []).append(float(now.sum()))
        if clip is not None:  # what Accelerate and the HF Trainer do between backward and step()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
            out.setdefault("clip_total_norm", []).append(float(total.full_tensor()))
        opt.step()
        opt.zero_grad()
        record(out, opt, model)
    return out


def fsdp_case(rank: int, world_size: int, opts: dict) -> dict:
    opts = dict(opts)
    kind, count = opts.pop("model"), opts.pop("micro_batches")
    no_sync = opts.pop("no_sync")
    bug = opts.pop("bug", False)
    clip = opts.pop("clip", None)
    explicit = opts.pop("attach")
    model, opt = build_fsdp(kind, **opts)
    if explicit:
        opt.attach(model)
    if bug:
        opt._engine.grad_sqr_is_part = lambda capture: False  # a deliberate bug (shards not summed), to size the tolerance against
    out: dict = {"world_size": dist.get_world_size()}
    start = time.perf_counter()
    run_updates(rank, world_size, kind, count, model, opt, range(UPDATES), no_sync=no_sync, out=out, clip=clip)
    out["seconds"] = time.perf_counter() - start
    out["hooked"] = opt._engine.hooks.num_hooked
    out["still_waiting_to_attach"] = opt._auto_attach is not None
    return out


# ---------------------------------------------------------------------------------------------
# Special cases.
# ---------------------------------------------------------------------------------------------
def order_case(rank: int, world_size: int) -> dict:
    """Record when FSDP2's root post-backward callback and AdaScale's snapshot run, per pass."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    model, opt = build_fsdp("gpt")
    opt.attach(model)
    trace: list[str] = []
    root = _get_module_fsdp_state(model)
    fsdp_final = root._root_post_backward_final_callback
    close = opt._capture._close_pass

    def traced_fsdp_final() -> None:
        grads = [p.grad is not None for p in sharded]
        trace.append(f"fsdp root post-backward callback: start, sharded grads {sum(grads)}/{len(grads)}")
        fsdp_final()
        grads = [p.grad is not None for p in sharded]
        trace.append(f"fsdp root post-backward callback: end, sharded grads {sum(grads)}/{len(grads)}")

    def traced_close() -> None:
        trace.append("adascale snapshot of ||G||^2")
        close()

    # Both are looked up on the instance when queued (FSDPState._register_root_post_backward_
    # final_callback, MicroGradCapture._queue_close_pass), so instance attributes take effect.
    # The sharded parameters (model.parameters() gives the unsharded ones while a unit is unsharded).
    sharded = [
        fsdp_param.sharded_param
        for module in [model, *model.units()]
        for group in _get_module_fsdp_state(module)._fsdp_param_groups
        for fsdp_param in group.fsdp_params
    ]
    root._root_post_backward_final_callback = traced_fsdp_final
    opt._capture._close_pass = traced_close
    out: dict = {}
    run_updates(rank, world_size, "gpt", 4, model, opt, range(2), no_sync=True, out=out, trace=trace)
    out["trace"] = trace
    return out


def never_fired_case(rank: int, world_size: int) -> dict:
    """Without attach(), an update trains: AdaScale attaches itself at the first forward, built
    after fully_shard or swapped in before it (after a zero-gradient step(), DCP's, which neither
    raises nor advances tau). The hooks genuinely never fire, and step() raises, when the forward
    ran before AdaScale was built (or before its parameters were swapped in), or when the
    gradients were written by hand; the next window of the first kind trains."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    errors: dict = {}
    batch = micro_batches("mlp", 0, 2)[rank]
    for swap in (False, True):
        model, opt = build_fsdp("mlp", swap=swap)
        if swap:
            # DCP's optimizer-state init: step() with zero gradients, before any backward.
            get_optimizer_state_dict(model, opt)
            errors["dcp_init_tau"] = opt.tau
            errors["dcp_init_updates"] = opt.stats()["updates"]
        loss_fn("mlp", model, batch).backward()
        errors[f"no attach swap={swap}"] = error_of(opt.step)
        errors[f"no attach tau swap={swap}"] = opt.tau
        # The forward ran before AdaScale was built / before its parameters were swapped in.
        model = build_model("mlp")
        if swap:
            opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
            names = {id(p): name for name, p in model.named_parameters()}
            shard(model, nested=True, reshard=True, bf16=False)
            loss = loss_fn("mlp", model, batch)  # the sharded model holds none of opt's parameters yet
            swap_in(opt, model, names)
        else:
            shard(model, nested=True, reshard=True, bf16=False)
            loss = loss_fn("mlp", model, batch)
            opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
        loss.backward()
        errors[f"forward first swap={swap}"] = error_of(opt.step)
        errors[f"forward first tau swap={swap}"] = opt.tau
        opt.zero_grad()
        loss_fn("mlp", model, batch).backward()  # this forward attaches
        errors[f"next window swap={swap}"] = error_of(opt.step)
        errors[f"next window tau swap={swap}"] = opt.tau
        # Gradients written by hand: no forward, no backward.
        model, opt = build_fsdp("mlp", swap=swap)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        errors[f"by hand swap={swap}"] = error_of(opt.step)
        errors[f"by hand tau swap={swap}"] = opt.tau
    # attach() on a model without fully_shard, and on an optimizer of another model.
    plain = build_model("mlp")
    try:
        AdaScale(torch.optim.SGD(plain.parameters(), lr=LR)).attach(plain)
    except ValueError as err:
        errors["no_fully_shard"] = str(err)
    model_a, _ = build_fsdp("mlp")
    _, opt_b = build_fsdp("mlp")
    try:
        opt_b.attach(model_a)
    except ValueError as err:
        errors["foreign_params"] = str(err)
    model, opt = build_fsdp("mlp")
    model.set_gradient_divide_factor(1.0)  # a sum over ranks instead of the mean
    try:
        opt.attach(model)
    except ValueError as err:
        errors["divide_factor"] = str(err)
    return errors


def auto_attach_case(rank: int, world_size: int) -> dict:
    """The automatic attach: a submodule run first is refused with attach()'s error and the root's
    forward then attaches; another model's forward is passed over; the global hook goes when the
    optimizer is attached (explicitly or not) or dies."""
    import gc

    from torch.nn.modules.module import _global_forward_pre_hooks

    out: dict = {}
    x, y = micro_batches("mlp", 0, 2)[rank]
    model, opt = build_fsdp("mlp")
    out["submodule first"] = error_of(lambda: model.fc1(x))
    out["submodule first waiting"] = opt._auto_attach is not None
    (F.mse_loss(model(x), y)).backward()
    out["submodule first then root"] = error_of(opt.step)
    out["submodule first then root: tau, hooked"] = (opt.tau, opt._engine.hooks.num_hooked)
    # Model A runs first; B's optimizer must not take it, and attaches at B's forward.
    model_a, opt_a = build_fsdp("mlp")
    model_b, opt_b = build_fsdp("mlp")
    opt_a.attach(model_a)
    out["explicit attach: waiting"] = opt_a._auto_attach is not None
    with torch.no_grad():
        model_a(x)
    out["other model first: b waiting"] = opt_b._auto_attach is not None
    F.mse_loss(model_b(x), y).backward()
    out["other model first: b waiting after its forward"] = opt_b._auto_attach is not None
    out["other model first"] = error_of(opt_b.step)
    out["other model first: tau, hooked"] = (opt_b.tau, opt_b._engine.hooks.num_hooked)
    out["other model first: a's capture untouched"] = opt_a._capture.passes == 0 and opt_a.tau == 0.0
    # An optimizer that dies unattached takes its global hook with it.
    gc.collect()
    before = len(_global_forward_pre_hooks)
    model, opt = build_fsdp("mlp")
    with_one = len(_global_forward_pre_hooks)
    del opt
    gc.collect()
    out["global hooks: before, with one, after its death"] = (before, with_one, len(_global_forward_pre_hooks))
    return out


def _dist_all_reduce_spy(calls: list):
    real = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        calls.append((str(tensor.dtype), tensor.numel()))
        return real(tensor, *args, **kwargs)

    return real, spy


def collectives_case(rank: int, world_size: int) -> dict:
    """Collectives per update (2 micro-steps per rank, no_sync on the first), AdaScale vs plain
    SGD, counted at the dispatcher with the profiler (every ``c10d::`` op, whoever issues it) and
    at ``torch.distributed.all_reduce`` for the dtype and size."""
    out = {}
    for label in ("adascale", "sgd"):
        model, opt = build_fsdp("gpt")
        if label == "adascale":
            opt.attach(model)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        per_update = []
        all_reduce_calls: list = []
        real, spy = _dist_all_reduce_spy(all_reduce_calls)
        for update in range(3):
            batches = micro_batches("gpt", update, 4)[rank * 2 : rank * 2 + 2]
            dist.all_reduce = spy
            try:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for k, batch in enumerate(batches):
                        model.set_requires_gradient_sync(k == 1)
                        (loss_fn("gpt", model, batch) / 2).backward()
                    opt.step()
                    opt.zero_grad()
            finally:
                dist.all_reduce = real
            names = [e.name for e in prof.events() if e.name.startswith(("c10d::", "_c10d_functional::"))]
            per_update.append(dict(Counter(names)))
        out[label] = {"per_update": per_update, "all_reduce_calls": all_reduce_calls}
    out["groups"] = 1
    return out


def checkpoint_case(rank: int, world_size: int, path: str) -> dict:
    """The uninterrupted run; saves a DCP checkpoint after CKPT_AT updates."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from adascale_shard.fsdp2 import AdaScaleStateful

    model, opt = build_fsdp("gpt")
    opt.attach(model)
    out: dict = {}
    run_updates(rank, world_size, "gpt", 4, model, opt, range(CKPT_AT), no_sync=True, out=out)
    # torch's helpers keep only the base optimizer's keys: why AdaScaleStateful exists.
    out["dcp_optimizer_keys"] = sorted(get_optimizer_state_dict(model, opt))
    dcp.save({"train": AdaScaleStateful(model, opt)}, checkpoint_id=path)
    out["saved_state"] = opt.state_dict()["adascale"]
    run_updates(rank, world_size, "gpt", 4, model, opt, range(CKPT_AT, UPDATES), no_sync=True, out=out)
    return out


def resume_case(rank: int, world_size: int, path: str) -> dict:
    """A fresh process group: build, attach, load the checkpoint, continue."""
    import torch.distributed.checkpoint as dcp

    from adascale_shard.fsdp2 import AdaScaleStateful

    model, opt = build_fsdp("gpt")
    opt.attach(model)
    fresh_tau = opt.tau
    dcp.load({"train": AdaScaleStateful(model, opt)}, checkpoint_id=path)
    out: dict = {
        "fresh_tau": fresh_tau,
        "loaded_state": opt.state_dict()["adascale"],
        "loaded_params": flat_params(model),
    }
    run_updates(rank, world_size, "gpt", 4, model, opt, range(CKPT_AT, UPDATES), no_sync=True, out=out)
    return out


# ---------------------------------------------------------------------------------------------
# Cases and launches.
# ---------------------------------------------------------------------------------------------
def case(model="mlp", n=8, no_sync=True, nested=True, reshard=True, bf16=False, swap=False, attach=True) -> dict:
    return {"model": model, "micro_batches": n, "no_sync": no_sync, "nested": nested, "reshard": reshard,
            "bf16": bf16, "swap": swap, "attach": attach}


FSDP_CASES = {
    "mlp N=8 acc=4 no_sync nested reshard": case(),
    "mlp N=8 acc=4 sync nested reshard": case(no_sync=False),
    "mlp N=8 acc=4 no_sync nested keep": case(reshard=False),
    "mlp N=8 acc=4 sync nested keep": case(no_sync=False, reshard=False),
    "mlp N=8 acc=4 no_sync root-only reshard": case(nested=False),
    "mlp N=8 acc=4 sync root-only keep": case(no_sync=False, nested=False, reshard=False),
    "mlp N=4 acc=2 no_sync nested reshard": case(n=4),
    "mlp N=4 acc=2 sync nested keep": case(n=4, no_sync=False, reshard=False),
    "mlp N=2 acc=1 nested reshard": case(n=2, no_sync=False),
    "mlp N=2 acc=1 root-only keep": case(n=2, no_sync=False, nested=False, reshard=False),
    "mlp N=8 acc=4 no_sync nested reshard accelerate-swap": case(swap=True),
    "gpt N=8 acc=4 no_sync nested reshard": case(model="gpt"),
    "gpt N=4 acc=2 no_sync nested reshard": case(model="gpt", n=4),
    "gpt N=4 acc=2 sync nested keep": case(model="gpt", n=4, no_sync=False, reshard=False),
    "gpt N=2 acc=1 nested reshard": case(model="gpt", n=2, no_sync=False),
    "mlp N=8 acc=4 no_sync nested reshard bf16": case(bf16=True),
    "gpt N=4 acc=2 no_sync nested reshard bf16": case(model="gpt", n=4, bf16=True),
    # No attach() call: AdaScale attaches itself at the first forward (the root's own parameters
    # are hooked when that forward ends). Each has an explicit-attach twin above (AUTO_TWINS).
    "mlp N=8 acc=4 no_sync nested reshard auto-attach": case(attach=False),
    "mlp N=8 acc=4 no_sync nested reshard accelerate-swap auto-attach": case(swap=True, attach=False),
    "mlp N=8 acc=4 sync root-only keep auto-attach": case(no_sync=False, nested=False, reshard=False, attach=False),
    "gpt N=4 acc=2 no_sync nested reshard auto-attach": case(model="gpt", n=4, attach=False),
}
AUTO_TWINS = {name: name.removesuffix(" auto-attach") for name in FSDP_CASES if name.endswith(" auto-attach")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    assert not dist.is_initialized(), "the reference must run without a process group"
    references = {(kind, n): train_reference(kind, n) for kind in ("mlp", "gpt") for n in (2, 4, 8)}
    path = str(tmp_path_factory.mktemp("fsdp2_dcp") / "ckpt")
    cases = [Case(name, fsdp_case, (opts,)) for name, opts in FSDP_CASES.items()]
    cases += [
        Case("order", order_case),
        Case("never_fired", never_fired_case),
        Case("auto_attach", auto_attach_case),
        Case("collectives", collectives_case),
        Case("checkpoint", checkpoint_case, (path,)),
        Case("bug: shards not summed", fsdp_case, ({**case(), "bug": True},)),
        Case("clipped", fsdp_case, ({**case(), "clip": CLIP_MAX_NORM},)),
    ]
    start = time.perf_counter()
    ranks = run_cases(cases, 2, timeout=300)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    resumed = run_cases([Case("resume", resume_case, (path,))], 2, timeout=180)
    second_s = time.perf_counter() - start
    print(f"\n[fsdp2] launch 1 ({len(cases)} cases): {first_s:.1f} s; launch 2 (resume): {second_s:.1f} s")
    return {"references": references, "ranks": ranks, "resumed": resumed}


def reference_for(runs, name: str) -> dict:
    opts = FSDP_CASES[name]
    return runs["references"][(opts["model"], opts["micro_batches"])]


def diffs(x: dict, y: dict) -> dict[str, float]:
    return {
        "gain": max(abs(p - q) for p, q in zip(x["gain"], y["gain"])),
        "tau": max(abs(p - q) for p, q in zip(x["tau"], y["tau"])),
        "param": max(float((p - q).abs().max()) for p, q in zip(x["params"], y["params"])),
    }


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------
def nan_max(values) -> float:
    """``max`` that returns NaN if any value is NaN (the builtin skips a NaN after the first)."""
    return max(values, key=lambda v: math.inf if math.isnan(v) else v)


def tolerance_use(name: str, run: dict, ref: dict) -> dict[str, float]:
    """The largest ``|run - ref| / allowed`` of gain, tau and the parameters over the updates, with
    ``allowed`` the bound of the per-case tests: ``ATOL + RTOL * |ref|`` in fp32, ``BF16_GAIN_RTOL
    * |ref|`` (gain, tau) and ``BF16_PARAM_ATOL`` (parameters) in bf16. Above 1: out of tolerance."""
    bf16 = FSDP_CASES[name]["bf16"]
    out = {}
    for key in ("gain", "tau"):
        out[key] = nan_max(
            abs(p - q) / (BF16_GAIN_RTOL * abs(q) if bf16 else ATOL + RTOL * abs(q)) for p, q in zip(run[key], ref[key])
        )
    out["param"] = nan_max(
        float(((p - q).abs() / (BF16_PARAM_ATOL if bf16 else ATOL + RTOL * q.abs())).max())
        for p, q in zip(run["params"], ref["params"])
    )
    return out


def test_difference_table(runs):
    """Mode x accumulation: the largest differences to the single-process reference (printed with
    ``-s``), every one within the tolerance of its per-case test, for every case and update."""
    lines = [f"{'case':66s} {'|gain diff|':>12s} {'|tau diff|':>12s} {'|param diff|':>12s} {'/bound':>7s}  gains"]
    out_of_tolerance = []
    for name in FSDP_CASES:
        run, ref = runs["ranks"][0][name], reference_for(runs, name)
        for key in ("gain", "tau", "params"):  # zip() in diffs() must not hide a missing update
            assert len(run[key]) == len(ref[key]) == UPDATES, (name, key, len(run[key]), len(ref[key]))
        d = diffs(run, ref)
        use = tolerance_use(name, run, ref)
        worst = nan_max(use.values())
        if not worst <= 1.0:  # also catches NaN
            out_of_tolerance.append(f"{name}: {use}")
        gains = ", ".join(f"{g:.3f}" for g in run["gain"][:3])
        lines.append(f"{name:66s} {d['gain']:12.3g} {d['tau']:12.3g} {d['param']:12.3g} {worst:7.3f}  {gains}, ...")
    table = "\n".join(lines)
    print("\n[fsdp2] largest difference to the single-process reference over 6 updates (fp32 bound: "
          f"rtol {RTOL:g} / atol {ATOL:g}; bf16: gain/tau rtol {BF16_GAIN_RTOL:g}, params atol {BF16_PARAM_ATOL:g}; "
          "/bound: largest fraction of the bound used)\n" + table)
    assert len(lines) == 1 + len(FSDP_CASES)
    assert not out_of_tolerance, "out of tolerance (/bound > 1):\n" + "\n".join(out_of_tolerance) + "\n" + table


@pytest.mark.parametrize("name", [n for n in FSDP_CASES if "bf16" not in n])
def test_fsdp2_equals_single_process_reference(runs, name):
    run, ref = runs["ranks"][0][name], reference_for(runs, name)
    n = float(FSDP_CASES[name]["micro_batches"])
    assert run["world_size"] == 2
    assert_matches_reference(name, run, ref, n, UPDATES, RTOL, ATOL)


@pytest.mark.parametrize("name", [n for n in FSDP_CASES if "bf16" in n])
def test_fsdp2_bf16_mixed_precision_close_to_fp32_reference(runs, name):
    run, ref = runs["ranks"][0][name], reference_for(runs, name)
    assert_bf16_close(name, run, ref, UPDATES, BF16_GAIN_RTOL, BF16_PARAM_ATOL)


def test_both_ranks_agree_bit_for_bit(runs):
    rank0, rank1 = runs["ranks"]
    for name in FSDP_CASES:
        for key in ("gain", "tau", "var", "sqr"):
            assert rank0[name][key] == rank1[name][key], (name, key)
        for p, q in zip(rank0[name]["params"], rank1[name]["params"]):
            assert torch.equal(p, q), name


def test_every_trainable_parameter_was_hooked(runs):
    for name, opts in FSDP_CASES.items():
        expected = len(list(build_model(opts["model"]).parameters()))  # the tied weight once
        assert runs["ranks"][0][name]["hooked"] == expected, name
        assert runs["ranks"][0][name]["still_waiting_to_attach"] is False, name  # the global hook is gone


def test_auto_attach_equals_explicit_attach(runs):
    """No attach() call (AdaScale attaches itself at the first forward) gives the statistics and
    parameters of the explicit-attach run of the same case, update by update, within the
    tolerance of the reference tests: built after fully_shard, swapped in (Accelerate's order),
    root-only (every parameter is the root's, hooked when the first forward ends), tied GPT."""
    lines = []
    for auto, explicit in AUTO_TWINS.items():
        for rank in (0, 1):
            run, twin = runs["ranks"][rank][auto], runs["ranks"][rank][explicit]
            for key in ("gain", "tau", "var", "sqr", "N", "updates"):
                assert len(run[key]) == len(twin[key]) == UPDATES, (auto, key)
                for update, (p, q) in enumerate(zip(run[key], twin[key])):
                    assert math.isclose(p, q, rel_tol=RTOL, abs_tol=ATOL), f"{auto}: {key}, update {update}: {p} vs {q}"
            for update, (p, q) in enumerate(zip(run["params"], twin["params"])):
                torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m: f"{auto}, update {update}: {m}")
        d = diffs(runs["ranks"][0][auto], runs["ranks"][0][explicit])
        lines.append(f"{auto:66s} {d['gain']:10.3g} {d['tau']:10.3g} {d['param']:10.3g}")
    assert len(lines) == 4
    print("\n[fsdp2] auto-attach vs explicit attach, largest |diff| of gain, tau, parameters:\n" + "\n".join(lines))


def test_auto_attach_submodule_first_other_model_first_and_lifetime(runs):
    for rank in (0, 1):
        out = runs["ranks"][rank]["auto_attach"]
        message = out["submodule first"]
        assert message.startswith("ValueError: AdaScale could not attach itself at the first forward of FSDPLinear"), message
        assert "call opt.attach(model) with that model" in message, message
        assert message.endswith("(see docs/troubleshooting.md#attach-with-foreign-parameters)"), message
        assert out["submodule first waiting"] is True
        assert out["submodule first then root"] is None
        tau, hooked = out["submodule first then root: tau, hooked"]
        assert tau >= 1.0 and hooked == 6
        assert out["explicit attach: waiting"] is False
        assert out["other model first: b waiting"] is True
        assert out["other model first: b waiting after its forward"] is False
        assert out["other model first"] is None
        tau, hooked = out["other model first: tau, hooked"]
        assert tau >= 1.0 and hooked == 6
        assert out["other model first: a's capture untouched"] is True
        before, with_one, after = out["global hooks: before, with one, after its death"]
        assert (with_one, after) == (before + 1, before), (before, with_one, after)


def test_snapshot_is_the_final_reduced_gradient(runs):
    """``||G||^2`` snapshotted at the end of the last pass equals the sharded ``.grad`` that
    ``step()`` applies (both ranks' local squares), in every mode."""
    for rank in (0, 1):
        for name in FSDP_CASES:
            run = runs["ranks"][rank][name]
            assert max(run["snapshot_vs_final"]) == 0.0, (rank, name, run["snapshot_vs_final"])
            assert min(run["local_grad_sqr"]) > 0.0, (rank, name)


def test_fsdp2_final_callback_runs_before_the_snapshot(runs):
    trace = runs["ranks"][0]["order"]["trace"]
    print("\n[fsdp2] callback order, update 1:\n  " + "\n  ".join(trace[: len(trace) // 2]))
    # Per backward pass: FSDP2's root callback starts and ends (every sharded grad written on the
    # syncing pass), then AdaScale's snapshot.
    passes = [i for i, line in enumerate(trace) if line.startswith("forward")]
    assert len(passes) == 4
    for begin, end in zip(passes, passes[1:] + [len(trace)]):
        events = trace[begin + 1 : end]
        assert events[0].startswith("fsdp root post-backward callback: start"), events
        assert events[1].startswith("fsdp root post-backward callback: end"), events
        assert events[2] == "adascale snapshot of ||G||^2", events
    # On the syncing passes the root group (token embedding = LM head, final LayerNorm) is
    # reduce-scattered inside FSDP2's callback (its input, the token ids, needs no gradient):
    # a snapshot before that callback would miss those shards.
    model = build_model("gpt")
    n_params = len(list(model.parameters()))
    n_root = n_params - sum(len(list(unit.parameters())) for unit in model.units())
    for i in passes[1::2]:
        assert trace[i + 1].endswith(f"sharded grads {n_params - n_root}/{n_params}"), trace[i + 1]
        assert trace[i + 2].endswith(f"sharded grads {n_params}/{n_params}"), trace[i + 2]


def test_update_without_attach_trains_and_one_whose_hooks_never_fired_raises(runs):
    for rank in (0, 1):
        errors = runs["ranks"][rank]["never_fired"]
        for swap in (False, True):
            assert errors[f"no attach swap={swap}"] is None, errors[f"no attach swap={swap}"]
            assert errors[f"no attach tau swap={swap}"] >= 1.0
            for how in ("forward first", "by hand"):
                message = errors[f"{how} swap={swap}"]
                assert message is not None, f"{how}, swap={swap}: step() did not raise"
                assert message.startswith(
                    "RuntimeError: AdaScale: the FSDP2 (DTensor) parameters have gradients but no backward pass "
                    "was recorded, because the hooks were never attached"
                ), message
                assert "opt.attach(model)" in message and "#fsdp2-hooks-never-attached" in message, message
                assert errors[f"{how} tau swap={swap}"] == 0.0
            assert errors[f"next window swap={swap}"] is None
            assert errors[f"next window tau swap={swap}"] >= 1.0
        # DCP's zero-gradient step() neither raised nor advanced tau.
        assert errors["dcp_init_tau"] == 0.0 and errors["dcp_init_updates"] == 0.0
        assert "has no fully_shard module" in errors["no_fully_shard"]
        assert "not the sharded parameters" in errors["foreign_params"]
        assert "set_gradient_divide_factor(1.0)" in errors["divide_factor"]


def test_one_all_reduce_of_2g_plus_2_float64_scalars_per_update(runs):
    result = runs["ranks"][0]["collectives"]
    groups = result["groups"]
    for ada, sgd in zip(result["adascale"]["per_update"], result["sgd"]["per_update"]):
        added = Counter(ada)
        added.subtract(Counter(sgd))
        added = {op: count for op, count in added.items() if count}
        assert added == {"c10d::allreduce_": 1}, (ada, sgd)
    assert result["sgd"]["all_reduce_calls"] == []
    assert result["adascale"]["all_reduce_calls"] == [("torch.float64", 2 * groups + 2)] * 3
    print(f"\n[fsdp2] collectives per update, plain SGD: {result['sgd']['per_update'][0]}; "
          f"AdaScale adds: 1 x c10d::allreduce_ of {2 * groups + 2} float64 scalars")


def test_checkpoint_resume_in_a_fresh_process_group_is_identical(runs):
    for rank in (0, 1):
        full = runs["ranks"][rank]["checkpoint"]
        resumed = runs["resumed"][rank]["resume"]
        assert resumed["fresh_tau"] == 0.0
        assert full["dcp_optimizer_keys"] == ["param_groups", "state"]  # "adascale" dropped
        assert resumed["loaded_state"] == full["saved_state"]  # tau, averages, counters: exact
        assert torch.equal(resumed["loaded_params"], full["params"][CKPT_AT - 1])
        for key in ("gain", "tau", "var", "sqr", "updates"):
            assert resumed[key] == full[key][CKPT_AT:], key
        for p, q in zip(resumed["params"], full["params"][CKPT_AT:]):
            assert torch.equal(p, q)


def test_tolerance_catches_a_normalisation_bug(runs):
    """The same run with ||G||^2 divided by the world size instead of summed over the shards
    (the DDP normalisation applied to sharded gradients) misses the tolerance by far."""
    name = "mlp N=8 acc=4 no_sync nested reshard"
    bug = runs["ranks"][0]["bug: shards not summed"]
    d = diffs(bug, reference_for(runs, name))
    print(f"\n[fsdp2] with the bug: |gain diff| {d['gain']:.3g}, |tau diff| {d['tau']:.3g}")
    assert d["gain"] > 1000 * RTOL


def test_clipping_between_backward_and_step_keeps_the_pre_clip_statistics(runs):
    """clip_grad_norm_ on the DTensor gradients before step() (Accelerate, the HF Trainer) does
    not change ||G||^2: the first update's statistics equal the unclipped run's bit for bit."""
    clipped, plain = runs["ranks"][0]["clipped"], runs["ranks"][0]["mlp N=8 acc=4 no_sync nested reshard"]
    assert min(clipped["clip_total_norm"]) > 5 * CLIP_MAX_NORM  # clipping really acted
    for key in ("gain", "tau", "var", "sqr"):
        assert clipped[key][0] == plain[key][0], key
    assert not torch.allclose(clipped["params"][0], plain["params"][0], rtol=RTOL, atol=ATOL)
