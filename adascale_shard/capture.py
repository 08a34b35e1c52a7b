"""Capture of local micro-gradient statistics with gradient-accumulator hooks.

A tensor hook on a parameter (``Tensor.register_hook``) sees the gradient that one backward pass
contributes to it, before it is accumulated into ``.grad`` and before DDP or DeepSpeed reduce it
across ranks (their hooks run after the accumulation). The hook lives on the parameter itself, so
it survives what replaces the parameter's gradient-accumulator node: ``p.data = p.data.to(dtype)``
(``deepspeed.initialize`` under bf16/fp16) and ``module.to(device)`` (Accelerate's ``prepare``).
:class:`MicroGradCapture` writes the norm of that gradient into a preallocated slot on the
gradient's device and dtype (a slot that no longer matches after a cast or a move is replaced at
the hook's next call), and a closing pass adds the slots' squares to per-slot float64 sums (summed
per parameter group once per update): no ``.item()``, no host synchronisation and no
gradient-sized buffer inside backward.

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


def _accumulates_into_grad() -> bool:
    """Whether the backward pass running this hook will add into ``.grad``: ``backward()`` does,
    ``torch.autograd.grad()`` (gradient penalties, norm probes) does not and is no micro-batch."""
    node = torch._C._current_autograd_node()
    if node is None:
        return True
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # torch refuses the question for a leaf's node inside autograd.grad()
        return False


class _Chunk:
    """Norm slots allocated together (one tensor, one kernel per pass for all of them)."""

    __slots__ = ("norms", "sqr", "groups", "index", "live")

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.norms = torch.zeros(size, dtype=dtype, device=device)  # per slot: this pass's norm
        self.sqr = torch.zeros(size, dtype=torch.float64, device=device)  # per slot: window sum
        self.groups: list[int] = []  # the hook group of each used slot
        self.index: torch.Tensor | None = None  # the slots' statistics groups, cached
        self.live = 0  # hooks still writing into this chunk (a cast or move rebinds them)

    @property
    def key(self) -> tuple[torch.device, torch.dtype]:
        return self.norms.device, self.norms.dtype

    @property
    def full(self) -> bool:
        return len(self.groups) == len(self.norms)


class MicroGradCapture:
    """Per-group sums of squared local micro-gradient norms over an update window.

    A window is the set of backward passes since the last :meth:`reset` (called by the optimizer
    when an update consumes it). If the gradients were reset between two passes without an update
    (``zero_grad`` after a skipped step), the stale window is dropped when the next pass opens,
    so the statistics always describe the gradients that ``.grad`` holds.

    The statistics live on the gradients' device: :attr:`device` follows the gradients when the
    model is moved after the capture was built.

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
        self.device: torch.device | None = None
        self._micro_sqr: torch.Tensor | None = None
        # Every hook writes its micro-gradient's norm into its own preallocated slot of a chunk
        # (no tensor made and kept per hook: see benchmarks/results/ for what that costs); a
        # closing pass adds the squares of a chunk's slots to the chunk's float64 sums (one kernel
        # per chunk), which are summed per group once per update.
        self._chunks: list[_Chunk] = []
        self._open_chunk: dict[tuple[torch.device, torch.dtype], _Chunk] = {}
        self._slots_ahead: dict[tuple[torch.device, torch.dtype], int] = {}  # hooks still to come
        self._micro_sqr_stale = False
        self._group_of: list[int] = []  # a hook's group -> its statistics group (merge_groups)
        self._grad_sqr: torch.Tensor | None = None
        self.passes = 0
        self.dropped_windows = 0
        self._pass_open = False
        self._pass_task_id = -1
        self._inner_task_id = -1  # a reentrant backward inside the open pass
        self._skip_task_id = -1  # a torch.autograd.grad() call: not a micro-batch
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
        for chunk in self._chunks:
            chunk.index = None

    def _new_slot(self, group_index: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, _Chunk]:
        """A 0-dim view of a chunk for one hook's norm, and its chunk (chunks never move)."""
        key = (device, dtype)
        ahead = self._slots_ahead.get(key, 0)
        if ahead:
            self._slots_ahead[key] = ahead - 1
        chunk = self._open_chunk.get(key)
        if chunk is None or chunk.full:
            # As many slots as hooks are announced; else 16, 32, ... 256: a few chunks for any model.
            grown = min(_MAX_SLOTS_PER_CHUNK, 16 * 2 ** sum(c.key == key for c in self._chunks))
            chunk = _Chunk(max(ahead, grown), dtype, device)
            self._chunks.append(chunk)
            self._open_chunk[key] = chunk
        slot = chunk.norms[len(chunk.groups)]
        chunk.groups.append(group_index)
        chunk.index = None
        chunk.live += 1
        return slot, chunk

    def _rebind(
        self, group_index: int, slot: torch.Tensor, old: _Chunk, grad: torch.Tensor
    ) -> tuple[torch.Tensor, _Chunk, torch.dtype | None]:
        """A new slot for a hook whose gradient changed dtype or device (the model was cast or
        moved after the capture was built); the statistics follow the gradients' device."""
        key = (grad.device, _slot_dtype(grad.dtype))
        norm_dtype = None if key[1] == grad.dtype else key[1]
        if key == old.key:  # bf16 <-> fp32: the same float32 slot, only the norm's dtype changes
            return slot, old, norm_dtype
        if not self._slots_ahead.get(key):  # the first of a cast: the old chunk's hooks follow
            self._slots_ahead[key] = sum(c.live for c in self._chunks if c.key == old.key)
        old.live -= 1
        slot, chunk = self._new_slot(group_index, *key)
        if grad.device != self.device:
            self._move_statistics(grad.device)
        return slot, chunk, norm_dtype

    def _move_statistics(self, device: torch.device) -> None:
        self.device = device
        self._micro_sqr = self._micro_sqr.to(device)
        self._grad_sqr = self._grad_sqr.to(device)
        self._share = None
        for chunk in self._chunks:
            chunk.index = None

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
        # A tensor hook, not a pre-hook on the gradient-accumulator node: the node is replaced
        # when the parameter is cast or moved (p.data = ...), the tensor's hooks stay.
        handle = param.register_hook(self._make_hook(group_index, param, owner))
        self._handles.append(handle)
        return handle

    def _make_hook(self, group_index: int, param: torch.Tensor, owner: torch.Tensor | None):
        # The hook runs once per parameter per micro-batch, so it is one Python frame with its
        # constants bound here: on models with many small tensors its cost is the overhead.
        key = id(param)
        owner_ref = weakref.ref(param if owner is None else owner)
        grad_dtype = param.dtype  # what the slot was made for
        slot_dtype = _slot_dtype(grad_dtype)
        norm_dtype = None if slot_dtype == grad_dtype else slot_dtype  # None: the norm's own dtype
        slot, chunk = self._new_slot(group_index, param.device, slot_dtype)
        capture = self
        vector_norm = torch.linalg.vector_norm
        hypot = torch.hypot
        graph_task_id = torch._C._current_graph_task_id

        def hook(grad):
            nonlocal slot, chunk, norm_dtype, grad_dtype
            if grad is None:
                return
            task_id = graph_task_id()
            if task_id != capture._pass_task_id and not capture._enter_task(task_id):
                return
            fired = capture._fired
            capture._last_owner = owner_ref
            try:
                if key in fired:
                    # Second partial gradient of one parameter in one pass: ||a||^2 + ||b||^2 != ||a+b||^2.
                    capture._warn_split_gradient()
                    hypot(slot, vector_norm(grad, dtype=norm_dtype), out=slot)  # slot^2 += ||b||^2
                    return
                # One fused norm kernel, written in place (out= refuses another dtype or device).
                if norm_dtype is None:
                    vector_norm(grad, out=slot)
                else:
                    vector_norm(grad, dtype=norm_dtype, out=slot)
            except RuntimeError:
                if grad.dtype == grad_dtype and grad.device == slot.device:
                    raise
                slot, chunk, norm_dtype = capture._rebind(group_index, slot, chunk, grad)
                grad_dtype = grad.dtype
                vector_norm(grad, dtype=norm_dtype, out=slot)
            fired.add(key)

        hook.__torch_unserializable__ = True  # pickling the model drops it without a warning
        return hook

    def detach(self) -> None:
        """Remove every hook (the capture records nothing afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def _enter_task(self, task_id: int) -> bool:
        """For a hook whose backward pass is not the open one: open a pass (or join it as a
        reentrant inner pass) if that backward accumulates into ``.grad``; else ignore it."""
        if task_id == self._inner_task_id:
            return True
        if task_id == self._skip_task_id or not _accumulates_into_grad():
            self._skip_task_id = task_id
            return False
        if not self._pass_open:
            self._open_pass(task_id)
        else:
            self._inner_task_id = task_id
            self._note_reentrant()
        return True

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
        # Queued on this backward's graph task; it queues the closing step again so that it runs
        # after the callbacks engines queue later in the same backward (DDP's reduction).
        Variable._execution_engine.queue_callback(self._queue_close_pass)

    def _queue_close_pass(self) -> None:
        Variable._execution_engine.queue_callback(self._close_pass)

    def _close_pass(self) -> None:
        self.passes += 1
        self._pass_open = False
        self._pass_task_id = -1
        self._inner_task_id = -1
        self._fired.clear()
        # On the caller's stream, which autograd syncs with every leaf stream before callbacks;
        # zeroed here, not when the next pass opens, so that no hook of the next pass (on any
        # stream) can race the zeroing: a hook that does not fire in a pass contributes 0.
        for chunk in self._chunks:
            chunk.sqr.addcmul_(chunk.norms, chunk.norms)
            chunk.norms.zero_()
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
            for chunk in self._chunks:
                if chunk.index is None:  # unused slots are 0 and go to any group
                    groups = [self._group_of[g] for g in chunk.groups]
                    groups += [0] * (len(chunk.sqr) - len(groups))
                    chunk.index = torch.tensor(groups, device=self.device)
                self._micro_sqr.index_add_(0, chunk.index, chunk.sqr.to(self.device))
        return self._micro_sqr

    @property
    def grad_sqr(self) -> torch.Tensor:
        """Per-group ``||G||^2`` of this update, or this rank's part of it (see :attr:`grad_sqr_is_part`).

        Where the gradients may have been clipped or unscaled after the last backward pass, this
        is the value at ``step()``; :meth:`take_grad_sqr` also returns what recovers the pre-clip one.
        """
        value, probes = self.take_grad_sqr()
        if probes.numel():  # a host sync: step() reads the probes with the statistics instead
            self._grad_sqr = value = value * self.unclip_factor(probes.tolist())
        return value

    def take_grad_sqr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``||G||^2`` per group (or this rank's part), and the probe norms (before, then now) that
        :meth:`unclip_factor` turns into the factor that undoes a clip or unscale since the last
        pass. Both stay on the device: the caller reads them in the update's one host sync."""
        none = torch.zeros(0, dtype=torch.float64, device=self.device)
        if self.grad_sqr_fn is not None:
            return self.grad_sqr_fn(), none
        if self._deferred is None:
            return self._grad_sqr, none
        probe_pairs, probe_norms, fingerprint = self._deferred
        self._deferred = None
        self._grad_sqr = self._measure_grad_sqr()
        if probe_norms is None:
            if self._fingerprint() != fingerprint:
                self._warn_modified("a gradient was replaced or removed")
            return self._grad_sqr, none
        if any(p.grad is not g for p, g in probe_pairs):
            self._warn_modified("a gradient was replaced or removed")
            return self._grad_sqr, none
        # Version counters miss some in-place kernels (GradScaler's unscale), so the probes decide.
        now = torch._foreach_norm([g for _, g in probe_pairs])
        probes = torch.stack([*probe_norms, *now]).to(device=self.device, dtype=torch.float64)
        return self._grad_sqr, probes

    def unclip_factor(self, probes: Sequence[float]) -> float:
        """What ``||G||^2`` read at ``step()`` is multiplied by to be the pre-clip value, from the
        probe norms of :meth:`take_grad_sqr` (read on the host): 1 when nothing changed."""
        if not probes:
            return 1.0
        half = len(probes) // 2
        ratios = [(a / b) ** 2 for a, b in zip(probes[:half], probes[half:]) if b > 0 and a > 0]
        if not ratios:
            if not self._warned_modified:
                self._warned_modified = True
                logger.warning(
                    "AdaScale: the probe gradients (the smallest parameters') are zero, so a clip or "
                    "unscale between the last backward pass and step() cannot be recovered; ||G||^2 "
                    "is taken as it is at step()"
                )
            return 1.0
        if max(ratios) - min(ratios) > 1e-4 * max(ratios):
            self._warn_modified("they were not scaled by one common factor")
            return 1.0
        factor = sum(ratios) / len(ratios)
        return 1.0 if abs(factor - 1.0) < 1e-6 else factor

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
    # (identity and version counter) and the norms of two small "probe" gradients, and step()
    # takes the norm. If the gradients were scaled in between (clip_grad_norm_,
    # GradScaler.unscale_: one factor for all), the probes give the factor back.
    def _defer_grad_sqr(self) -> None:
        probe_pairs = [(p, p.grad) for p in self._probe_params if p.grad is not None][:2]
        if probe_pairs:
            # One fused kernel; the norms are compared (on the host) only at step().
            self._deferred = (probe_pairs, torch._foreach_norm([g for _, g in probe_pairs]), None)
        else:  # no probe gradient: fall back to noticing any change, to warn about it
            self._deferred = ([], None, self._fingerprint())

    def _fingerprint(self) -> list:
        return [None if g is None else (id(g), g._version) for g in (p.grad for ps in self.groups for p in ps)]

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
        # Chunks whose hooks were all rebound (a cast or a move) are empty from here on.
        if any(chunk.live == 0 for chunk in self._chunks):
            self._chunks = [chunk for chunk in self._chunks if chunk.live]
            self._open_chunk = {k: c for k, c in self._open_chunk.items() if c.live}
        for chunk in self._chunks:
            chunk.sqr.zero_()
        self._micro_sqr.zero_()
        self._micro_sqr_stale = False
        self._sentinel = None
        self._deferred = None
