"""Capture of local micro-gradient statistics with gradient-accumulator hooks.

A pre-hook on a parameter's gradient accumulator (the autograd node that adds into ``.grad``)
sees the gradient that one backward pass contributes to it, before it is accumulated and before
DDP or DeepSpeed reduce it across ranks (their hooks run after the accumulation).
:class:`MicroGradCapture` writes the norm of that gradient into a preallocated slot on the
gradient's device, and a closing pass adds the slots' squares to per-slot float64 sums (summed per
parameter group once per update): no ``.item()``, no host synchronisation and no gradient-sized
buffer inside backward.

Backward passes are counted by the capture itself (a pass opens at its first hook and closes in
a callback queued on the autograd engine), so frozen or unused parameters do not change the
count. ``||G||^2`` is the pre-clip norm of the reduced gradient: replicated gradients are measured
at ``step()`` (a uniform clip or unscale in between is recovered from probe gradients recorded
when the last pass closed); sharded ones when the last pass closes, after the reduction. Either
way each rank reads only its part of the gradient: its shard, or on ranks that hold the same
replicated gradient (DDP) a share of the tensors (:func:`replica_share`); the parts' squares are
summed in the optimizer's one all-reduce.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence

import torch
from torch.autograd import Variable

__all__ = ["MicroGradCapture", "grad_sqr_norms", "local_shard", "replica_share"]

logger = logging.getLogger(__name__)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reduce half-precision gradients in float32; never narrow float64.
    return torch.promote_types(dtype, torch.float32)


def _slot_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else _norm_dtype(dtype)


_MAX_SLOTS_PER_CHUNK = 256  # norm slots allocated together when their number is not known ahead


def local_shard(grad: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor gradient (FSDP2), or the tensor itself."""
    # DTensor.to_local() is an autograd Function (12 us a call here, 0.6 ms per update on a
    # 52-tensor GPT-2); the shard it returns is the DTensor's _local_tensor, read directly.
    local = getattr(grad, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    return grad.to_local() if hasattr(grad, "to_local") else grad


def grad_sqr_norms(groups: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Squared norm of the ``.grad`` of each group, as a float64 tensor on ``device``.

    Uses ``torch._foreach_norm`` (one fused kernel per dtype) and never synchronises the host.
    """
    zero = torch.zeros((), dtype=torch.float64, device=device)
    out = []
    for params in groups:
        # A DTensor (FSDP2) contributes its local shard; the shards are summed over ranks.
        grads = [p.grad for p in params]
        grads = [g if type(g) is torch.Tensor else local_shard(g) for g in grads if g is not None]
        dtypes = {g.dtype for g in grads}
        norms = []
        for dtype in dtypes:
            same = grads if len(dtypes) == 1 else [g for g in grads if g.dtype == dtype]
            norms += torch._foreach_norm(same, 2, dtype=_norm_dtype(dtype))
        if norms:
            if len(dtypes) > 1:
                norms = [n.to(torch.float64) for n in norms]
            norms = torch.stack(norms).to(device=device, dtype=torch.float64)
            out.append(torch.dot(norms, norms))
        else:
            out.append(zero)
    return torch.stack(out)


def replica_share(groups: Sequence[Sequence[torch.Tensor]], rank: int, ranks: int) -> list[list[torch.Tensor]]:
    """The tensors of each group whose squared norms ``rank`` of ``ranks`` measures, when every
    rank holds the same gradients: the whole model dealt out largest first, each tensor to the rank
    with the fewest elements so far, so that each reads about ``1/ranks`` of the gradient. Every
    rank computes the same deal from the same shapes; the shares' squares add up to ``||G||^2``."""
    share: list[list[torch.Tensor]] = [[] for _ in groups]
    loads = [0] * ranks
    # Frozen tensors are dealt too (their .grad is None until they are unfrozen): as before the deal.
    tensors = [(p.numel(), g, i) for g, params in enumerate(groups) for i, p in enumerate(params)]
    for numel, g, i in sorted(tensors, key=lambda t: (-t[0], t[1], t[2])):
        owner = min(range(ranks), key=loads.__getitem__)  # the first rank among equals: deterministic
        loads[owner] += numel
        if owner == rank:
            share[g].append(groups[g][i])
    return share


def _one_replica() -> tuple[int, int]:
    return 0, 1


def _gradient_accumulator(param: torch.Tensor) -> torch.autograd.graph.Node:
    """The autograd node that accumulates into ``param.grad``.

    The node records the parameter's shape when it is created. A ZeRO-3 parameter partitioned at
    construction (``deepspeed.zero.Init``, as the HF Trainer builds models) has shape ``[0]`` until
    gathered, so it is gathered for the moment the node is made, as DeepSpeed does for its own hooks
    (a collective: every rank hooks the same parameters in the same order).
    """
    ds_numel = getattr(param, "ds_numel", None)
    if ds_numel is not None and param.numel() != ds_numel:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return torch.autograd.graph.get_gradient_edge(param).node
    return torch.autograd.graph.get_gradient_edge(param).node


class MicroGradCapture:
    """Per-group sums of squared local micro-gradient norms over an update window.

    A window is the set of backward passes since the last :meth:`reset` (called by the optimizer
    when an update consumes it). If the gradients were reset between two passes without an update
    (``zero_grad`` after a skipped step), the stale window is dropped when the next pass opens,
    so the statistics always describe the gradients that ``.grad`` holds.

    Args:
        groups: the parameters of each optimizer parameter group; those that require gradients
            get a hook, and their ``.grad`` gives ``||G||^2``.
        hook: ``False`` registers no hook; an engine module then hooks the tensors that really
            receive the local micro-gradients with :meth:`hook_parameter` (FSDP2's unsharded
            parameters).

    Attributes:
        sharded_grads (bool): ``False`` when every rank holds the full averaged ``.grad`` (one
            process, DDP): ``||G||^2`` is then taken from one rank. ``True`` when each rank holds
            a shard (FSDP2, ZeRO): the per-rank squares are summed over ranks.
        snapshot_on_close (bool): take ``||G||^2`` from the ``.grad`` of ``groups`` when a pass
            closes (default). An engine that reduces gradients after autograd returns (DeepSpeed)
            turns it off and supplies the value with :meth:`snapshot_grad_sqr` or ``grad_sqr_fn``.
        detect_reset (bool): drop a window whose ``.grad`` was reset before the next pass
            (default). An engine that frees or moves ``.grad`` itself after every pass (ZeRO)
            turns it off and ends skipped windows itself.
        grad_sqr_fn: if set, called at ``step()`` to give ``||G||^2`` per group (float64 tensor).
        loss_scale (float): the factor the loss was multiplied by in this window's backward
            passes (an fp16 loss scale); the hooked squares are divided by its square, so they
            are in the units of an unscaled ``||G||^2``.
        replicas: returns ``(rank, ranks)`` of the processes whose ``.grad`` are replicas of each
            other (the optimizer's process group); with ``ranks > 1`` and replicated gradients,
            each rank measures only :func:`replica_share` of ``||G||^2``.
    """

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], *, hook: bool = True) -> None:
        self.groups: list[list[torch.Tensor]] = []
        self.sharded_grads = False
        self.snapshot_on_close = True
        self.detect_reset = True
        self.grad_sqr_fn: Callable[[], torch.Tensor] | None = None
        self.loss_scale = 1.0
        self.replicas: Callable[[], tuple[int, int]] = _one_replica
        self._share: tuple[tuple, list[list[torch.Tensor]]] | None = None  # (its key, the share)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._nodes: list[torch.autograd.graph.Node] = []
        self.device: torch.device | None = None
        self._micro_sqr: torch.Tensor | None = None
        # Every hook writes its micro-gradient's norm into its own preallocated slot of a chunk
        # (no tensor made and kept per hook: holding ~100 small results per pass cost 1.7% of a
        # DDP update here); a closing pass adds the squares of a chunk's slots to the chunk's
        # float64 accumulator (one kernel per chunk), which are summed per group once per update.
        self._chunks: list[torch.Tensor] = []
        self._chunk_sqr: list[torch.Tensor] = []  # per slot: sum of squared norms in the window
        self._chunk_groups: list[list[int]] = []  # the hook group of each used slot of a chunk
        self._chunk_index: list[torch.Tensor | None] = []  # the slots' statistics groups, cached
        self._open_chunk: dict[tuple[torch.device, torch.dtype], int] = {}
        self._slots_ahead: dict[tuple[torch.device, torch.dtype], int] = {}  # hooks still to come
        self._micro_sqr_stale = False
        self._group_of: list[int] = []  # a hook's group -> its statistics group (merge_groups)
        self._grad_sqr: torch.Tensor | None = None
        self.passes = 0
        self.dropped_windows = 0
        self._pass_open = False
        self._pass_task_id = -1
        self._fired: set[int] = set()
        self._last_owner: weakref.ref | None = None  # whose .grad the last hook fed
        self._sentinel: tuple[weakref.ref, weakref.ref, int] | None = None
        self._warned_reentrant = False
        self._warned_split = False
        self._warned_modified = False
        self._deferred: tuple | None = None
        self._probe_params: list[torch.Tensor] = []  # the smallest trainable parameters
        for params in groups:
            self.add_group(params, hook=hook)

    # -- hooks --------------------------------------------------------------------------------
    def add_group(self, params: Sequence[torch.Tensor], *, hook: bool = True) -> None:
        """Add a parameter group (its ``.grad`` counts in ``||G||^2``), hooked unless ``hook=False``."""
        index = len(self.groups)
        params = list(params)
        self.groups.append(params)
        # Size the next chunk for every parameter of the group (one chunk, one kernel per pass);
        # with hook=False an engine hooks their stand-ins later (FSDP2's unsharded parameters).
        for p in params:
            if p.requires_grad:
                key = (p.device, _slot_dtype(p.dtype))
                self._slots_ahead[key] = self._slots_ahead.get(key, 0) + 1
        for p in params:
            if self.device is None:
                self.device = p.device
            if hook and p.requires_grad:
                self.hook_parameter(p, index)
        trainable = [p for params_ in self.groups for p in params_ if p.requires_grad]
        self._probe_params = sorted(trainable, key=lambda p: p.numel())[:4]
        if self.device is not None:
            self._micro_sqr = self._grow(self._micro_sqr)
            self._grad_sqr = self._grow(self._grad_sqr)
        self._group_of.append(index)

    def merge_groups(self) -> None:
        """Fold every group into one, keeping the hooks: for an engine that reports one gradient
        norm for the whole model (DeepSpeed's ZeRO wrappers)."""
        if self.passes:
            raise RuntimeError("AdaScale's statistics groups can only be merged before the first backward pass")
        self.groups = [[p for params in self.groups for p in params]]
        self._group_of = [0] * len(self._group_of)
        self._micro_sqr = self._grow(None)
        self._micro_sqr_stale = True
        self._grad_sqr = self._grow(None)
        self._chunk_index = [None] * len(self._chunks)

    def _new_slot(self, group_index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A 0-dim view of a chunk, for one hook's norm (chunks never move, so views stay valid)."""
        key = (device, dtype)
        ahead = self._slots_ahead.get(key, 0)
        if ahead:
            self._slots_ahead[key] = ahead - 1
        chunk_id = self._open_chunk.get(key)
        if chunk_id is None or len(self._chunk_groups[chunk_id]) == len(self._chunks[chunk_id]):
            # As many slots as hooks are announced; else 16, 32, ... 256: a few chunks for any model.
            grown = min(_MAX_SLOTS_PER_CHUNK, 16 * 2 ** sum(c.dtype == dtype and c.device == device for c in self._chunks))
            size = max(ahead, grown)
            chunk_id = len(self._chunks)
            self._chunks.append(torch.zeros(size, dtype=dtype, device=device))
            self._chunk_sqr.append(torch.zeros(size, dtype=torch.float64, device=device))
            self._chunk_groups.append([])
            self._chunk_index.append(None)
            self._open_chunk[key] = chunk_id
        slot = self._chunks[chunk_id][len(self._chunk_groups[chunk_id])]
        self._chunk_groups[chunk_id].append(group_index)
        self._chunk_index[chunk_id] = None
        return slot

    def _grow(self, acc: torch.Tensor | None) -> torch.Tensor:
        new = torch.zeros(len(self.groups), dtype=torch.float64, device=self.device)
        if acc is not None:
            new[: acc.numel()] = acc
        return new

    def hook_parameter(
        self, param: torch.Tensor, group_index: int, *, owner: torch.Tensor | None = None
    ) -> torch.utils.hooks.RemovableHandle:
        """Record every gradient that backward computes for ``param`` into group ``group_index``.

        ``owner`` is the tensor whose ``.grad`` ends up holding what ``param`` receives (default
        ``param``); FSDP2 hooks the unsharded parameter, whose ``.grad`` it clears after the
        reduce-scatter, and names the sharded parameter here. Its ``.grad`` is what tells a
        ``zero_grad`` between two passes.
        """
        if param.is_leaf:
            # A pre-hook on the parameter's gradient accumulator runs only when backward is about
            # to add into .grad: torch.autograd.grad() (gradient penalties, norm probes) computes
            # the same gradients without accumulating them and must not count as a micro-batch.
            # The node is kept alive here so autograd keeps using this one for the parameter.
            node = _gradient_accumulator(param)
            handle = node.register_prehook(self._make_hook(group_index, param, owner, leaf=True))
            self._nodes.append(node)
        else:
            handle = param.register_hook(self._make_hook(group_index, param, owner, leaf=False))
        self._handles.append(handle)
        return handle

    def _make_hook(self, group_index: int, param: torch.Tensor, owner: torch.Tensor | None, *, leaf: bool):
        # The hook runs once per parameter per micro-batch, so it is one Python frame with its
        # constants bound here: on models with many small tensors its cost is the overhead.
        key = id(param)
        owner_ref = weakref.ref(param if owner is None else owner)
        slot_dtype = _slot_dtype(param.dtype)
        norm_dtype = None if slot_dtype == param.dtype else slot_dtype  # None: the norm's own dtype
        slot = self._new_slot(group_index, param.device, slot_dtype)
        capture = self
        vector_norm = torch.linalg.vector_norm
        hypot = torch.hypot
        graph_task_id = torch._C._current_graph_task_id

        def hook(grads):
            grad = grads[0] if leaf else grads
            if grad is None:
                return
            task_id = graph_task_id()
            if not capture._pass_open:
                capture._open_pass(task_id)
            elif task_id != capture._pass_task_id:
                capture._note_reentrant()
            fired = capture._fired
            capture._last_owner = owner_ref
            if key in fired:
                # Second partial gradient of one parameter in one pass: ||a||^2 + ||b||^2 != ||a+b||^2.
                capture._warn_split_gradient()
                hypot(slot, vector_norm(grad, dtype=norm_dtype), out=slot)  # slot^2 += ||b||^2
                return
            fired.add(key)
            # One fused norm kernel, written in place.
            if norm_dtype is None:
                vector_norm(grad, out=slot)
            else:
                vector_norm(grad, dtype=norm_dtype, out=slot)

        return hook

    def detach(self) -> None:
        """Remove every hook (the capture records nothing afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._nodes.clear()

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def _note_reentrant(self) -> None:
        if self._warned_reentrant:
            return
        self._warned_reentrant = True
        # Exact as long as no parameter is split across the nested passes (warned separately).
        logger.info(
            "AdaScale: a backward pass ran inside another (reentrant activation "
            "checkpointing); its gradients count towards the outer pass"
        )

    def _warn_split_gradient(self) -> None:
        if self._warned_split:
            return
        self._warned_split = True
        logger.warning(
            "AdaScale: a parameter received two partial gradients in one backward pass "
            "(it is used both inside and outside a reentrant activation-checkpointed block). "
            "The variance estimate is then approximate; use "
            "torch.utils.checkpoint(..., use_reentrant=False)."
        )

    def _open_pass(self, task_id: int) -> None:
        if self.detect_reset and self.passes > 0 and self._grads_were_reset():
            self.dropped_windows += 1
            logger.info(
                "AdaScale: the gradients were reset without a step() after %d backward pass(es) (a "
                "skipped step, e.g. a GradScaler that found inf/NaN); their statistics were dropped, "
                "tau and the averages are unchanged (stats()['dropped_windows'] = %d)",
                self.passes,
                self.dropped_windows,
            )
            self.reset()
        self._pass_open = True
        self._pass_task_id = task_id
        for chunk in self._chunks:  # a hook that does not fire in this pass contributes 0
            chunk.zero_()
        # Queued on this backward's graph task; it queues the closing step again so that it runs
        # after the callbacks engines queue later in the same backward (DDP's reduction).
        Variable._execution_engine.queue_callback(self._queue_close_pass)

    def _queue_close_pass(self) -> None:
        Variable._execution_engine.queue_callback(self._close_pass)

    def _close_pass(self) -> None:
        self.passes += 1
        self._pass_open = False
        self._fired.clear()
        for chunk, chunk_sqr in zip(self._chunks, self._chunk_sqr):
            chunk_sqr.addcmul_(chunk, chunk)
        self._micro_sqr_stale = True
        if self.snapshot_on_close:
            if self.sharded_grads or any(hasattr(p.grad, "to_local") for p in self._probe_params):
                self.snapshot_grad_sqr()  # shards: the probes' local norms could be empty on a rank
            else:
                self._defer_grad_sqr()
        owner_ref, self._last_owner = self._last_owner, None
        param = None if owner_ref is None else owner_ref()
        if param is not None and param.grad is not None:
            self._sentinel = (weakref.ref(param), weakref.ref(param.grad), param.grad._version)

    def _grads_were_reset(self) -> bool:
        """True if ``.grad`` changed since the last pass closed (zero_grad, no update between)."""
        if self._sentinel is None:
            return False
        param_ref, grad_ref, version = self._sentinel
        param = param_ref()
        grad = None if param is None else param.grad
        return grad is None or grad is not grad_ref() or grad._version != version

    # -- window -------------------------------------------------------------------------------
    @property
    def micro_sqr(self) -> torch.Tensor:
        """Per-group ``sum ||h||^2`` of this rank's hooked gradients in the window (float64)."""
        if self._micro_sqr_stale:
            self._micro_sqr_stale = False
            self._micro_sqr.zero_()
            for chunk_id, chunk_sqr in enumerate(self._chunk_sqr):
                index = self._chunk_index[chunk_id]
                if index is None:  # unused slots are 0 and go to any group
                    groups = [self._group_of[g] for g in self._chunk_groups[chunk_id]]
                    index = torch.tensor(groups + [0] * (len(chunk_sqr) - len(groups)), device=self.device)
                    self._chunk_index[chunk_id] = index
                self._micro_sqr.index_add_(0, index, chunk_sqr.to(self.device))
        return self._micro_sqr

    @property
    def grad_sqr(self) -> torch.Tensor:
        """Per-group ``||G||^2`` of this update, or this rank's part of it (see :attr:`grad_sqr_is_part`)."""
        if self.grad_sqr_fn is not None:
            return self.grad_sqr_fn()
        if self._deferred is not None:
            self._grad_sqr = self._resolve_grad_sqr()
        return self._grad_sqr

    @property
    def grad_sqr_is_part(self) -> bool:
        """Whether :attr:`grad_sqr` is this rank's part of ``||G||^2``, to be summed over the ranks:
        its shard (``sharded_grads``) or its share of replicated gradients."""
        return self.grad_sqr_fn is None and (self.sharded_grads or self.replicas()[1] > 1)

    def snapshot_grad_sqr(self) -> None:
        """Take ``||G||^2`` from the ``.grad`` of the groups now (no host synchronisation)."""
        self._deferred = None
        self._grad_sqr = self._measure_grad_sqr()

    def _measure_grad_sqr(self) -> torch.Tensor:
        groups = self.groups
        if not self.sharded_grads:
            rank, ranks = self.replicas()
            if ranks > 1:
                # A group list replaced or grown (add_group, merge_groups) is dealt anew.
                key = (rank, ranks, tuple((id(params), len(params)) for params in groups))
                if self._share is None or self._share[0] != key:
                    self._share = (key, replica_share(groups, rank, ranks))
                groups = self._share[1]
        return grad_sqr_norms(groups, self.device)

    # ``||G||^2`` of replicated gradients is needed once per update, but which backward pass is
    # the last one is only known at step(). So a closing pass records where each gradient stands
    # (identity and version counter) and the squared norms of two small "probe" gradients, and
    # step() takes the norm. If the gradients were scaled in between (clip_grad_norm_,
    # GradScaler.unscale_: one factor for all), the probes give the factor back.
    def _defer_grad_sqr(self) -> None:
        probe_pairs = [(p, p.grad) for p in self._probe_params if p.grad is not None][:2]
        if probe_pairs:
            # One fused kernel; the norms are compared (squared, on the host) only at step().
            self._deferred = (probe_pairs, torch._foreach_norm([g for _, g in probe_pairs]), None)
        else:  # no probe gradient: fall back to noticing any change, to warn about it
            self._deferred = ([], None, self._fingerprint())

    def _fingerprint(self) -> list:
        return [None if g is None else (id(g), g._version) for g in (p.grad for ps in self.groups for p in ps)]

    def _resolve_grad_sqr(self) -> torch.Tensor:
        probe_pairs, probe_norms, fingerprint = self._deferred
        self._deferred = None
        now = self._measure_grad_sqr()
        if probe_norms is None:
            if self._fingerprint() != fingerprint:
                self._warn_modified("a gradient was replaced or removed")
            return now
        probes = [g for _, g in probe_pairs]
        if any(p.grad is not g for p, g in probe_pairs):
            self._warn_modified("a gradient was replaced or removed")
            return now
        # Version counters miss some in-place kernels (GradScaler's unscale), so the probes decide.
        both = torch.stack([*probe_norms, *torch._foreach_norm(probes)]).to(torch.float64).square().tolist()
        pre, post = both[: len(probes)], both[len(probes) :]
        ratios = [a / b for a, b in zip(pre, post) if b > 0 and a > 0]
        if not ratios:
            if not self._warned_modified:
                self._warned_modified = True
                logger.warning(
                    "AdaScale: the probe gradients (the smallest parameters') are zero, so a clip or "
                    "unscale between the last backward pass and step() cannot be recovered; ||G||^2 "
                    "is taken as it is at step()"
                )
            return now
        if max(ratios) - min(ratios) > 1e-4 * max(ratios):
            self._warn_modified("they were not scaled by one common factor")
            return now
        factor = sum(ratios) / len(ratios)
        return now if abs(factor - 1.0) < 1e-6 else now * factor

    def _warn_modified(self, why: str) -> None:
        if not self._warned_modified:
            self._warned_modified = True
            logger.warning(
                "AdaScale: the gradients changed between the last backward pass and step() and %s; "
                "||G||^2 is taken as it is at step(). Clipping with clip_grad_norm_ and unscaling with "
                "a GradScaler are recognised; other in-place changes make the gain approximate.",
                why,
            )

    def reset(self) -> None:
        """Start a new window (the optimizer calls this when an update consumes one)."""
        self.passes = 0
        for chunk_sqr in self._chunk_sqr:
            chunk_sqr.zero_()
        self._micro_sqr.zero_()
        self._micro_sqr_stale = False
        self._sentinel = None
        self._deferred = None
