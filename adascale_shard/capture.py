"""Capture of local micro-gradient statistics with tensor hooks: the hooks, pass counting and the
micro-gradient sums, the same on every engine.

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
count. Where ``||G||^2`` comes from is the engine's business (:mod:`adascale_shard.engines`): the
capture tells its engine when a pass closes and when a window ends.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import _compat
from ._docs import see

if TYPE_CHECKING:  # pragma: no cover
    from .engines import Engine

__all__ = ["MicroGradCapture"]

logger = logging.getLogger(__name__)


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reduce half-precision gradients in float32; never narrow float64.
    return torch.promote_types(dtype, torch.float32)


def _slot_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else reduction_dtype(dtype)


def _norm_dtype_arg(grad_dtype: torch.dtype) -> torch.dtype | None:
    """The ``dtype=`` of a hook's norm kernel for gradients of ``grad_dtype`` (``None``: its own)."""
    slot_dtype = _slot_dtype(grad_dtype)
    return None if slot_dtype == grad_dtype else slot_dtype


_MAX_SLOTS_PER_CHUNK = 256  # norm slots allocated together when their number is not known ahead


def _accumulates_into_grad() -> bool:
    """Whether the backward pass running this hook will add into ``.grad``: ``backward()`` does,
    ``torch.autograd.grad()`` (gradient penalties, norm probes) does not and is no micro-batch."""
    node = _compat.current_autograd_node()
    if node is None:
        return True
    try:
        return _compat.will_engine_execute_node(node)
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
            get a hook (their ``.grad`` is what the engine reads ``||G||^2`` from).
        hook: ``False`` registers no hook; the engine then hooks the tensors that really
            receive the local micro-gradients with :meth:`hook_parameter` (FSDP2's unsharded
            parameters).

    Attributes:
        engine: told when a pass closes and when a window ends; its ``detects_reset`` says whether
            a window whose ``.grad`` was reset before the next pass is dropped. Set by the optimizer
            (``None``: the capture alone, resets detected).
    """

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], *, hook: bool = True) -> None:
        self.groups: list[list[torch.Tensor]] = []
        self.engine: Engine | None = None
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
        self.passes = 0
        self.dropped_windows = 0
        self._pass_open = False
        self._pass_task_id = -1
        self._inner_task_id = -1  # a reentrant backward inside the open pass
        self._skip_task_id = -1  # a torch.autograd.grad() call: not a micro-batch
        self._fired: set[int] = set()
        self._last_owner: weakref.ref | None = None  # whose .grad the last hook fed
        self._sentinel: tuple[weakref.ref, tuple] | None = None  # (owner, engine.grad_token(owner))
        self._warned_reentrant = False
        self._warned_split = False
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
        if self.device is not None:
            self._micro_sqr = self._grow(self._micro_sqr)
        self._group_of.append(index)

    def merge_groups(self) -> None:
        """Fold every group into one, keeping the hooks: for an engine that reports one gradient
        norm for the whole model (DeepSpeed's ZeRO wrappers)."""
        if self.passes:
            raise RuntimeError(
                "AdaScale's statistics groups can only be merged before the first backward pass"
                + see("statistics-groups-merged-after-backward")
            )
        self.groups = [[p for params in self.groups for p in params]]
        self._group_of = [0] * len(self._group_of)
        self._micro_sqr = self._grow(None)
        self._micro_sqr_stale = True
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
        if key == old.key:  # bf16 <-> fp32: the same float32 slot, only the norm's dtype changes
            return slot, old, _norm_dtype_arg(grad.dtype)
        if not self._slots_ahead.get(key):  # the first of a cast: the old chunk's hooks follow
            self._slots_ahead[key] = sum(c.live for c in self._chunks if c.key == old.key)
        old.live -= 1
        slot, chunk = self._new_slot(group_index, *key)
        if grad.device != self.device:
            self._move_statistics(grad.device)
        return slot, chunk, _norm_dtype_arg(grad.dtype)

    def _move_statistics(self, device: torch.device) -> None:
        self.device = device
        self._micro_sqr = self._micro_sqr.to(device)
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
        norm_dtype = _norm_dtype_arg(grad_dtype)
        slot, chunk = self._new_slot(group_index, param.device, _slot_dtype(grad_dtype))
        capture = self
        vector_norm = torch.linalg.vector_norm
        hypot = torch.hypot
        graph_task_id = _compat.current_graph_task_id()

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
            "torch.utils.checkpoint(..., use_reentrant=False)." + see("two-partial-gradients-in-one-backward-pass")
        )

    def _open_pass(self, task_id: int) -> None:
        if (self.engine is None or self.engine.detects_reset) and self.passes > 0 and self._grads_were_reset():
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
        outer = _compat.outer_backward_node()
        if outer is None:
            # Queued on this backward's graph task; it queues the closing step again so that it runs
            # after the callbacks engines queue later in the same backward (DDP's reduction).
            _compat.queue_callback(self._queue_close_pass)
            return
        # The first hooked gradient came from a backward nested in another (reentrant activation
        # checkpointing with every trainable parameter inside the blocks): the pass is the outer
        # backward, so it closes when that one ends, and later nested backwards join it. The outer
        # node's post-hook runs in the outer graph task, where the closing step is queued.
        def queue_on_outer(*_: object) -> None:
            handle.remove()
            _compat.queue_callback(self._queue_close_pass)

        handle = outer.register_hook(queue_on_outer)

    def _queue_close_pass(self) -> None:
        _compat.queue_callback(self._close_pass)

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
        if self.engine is not None:
            self.engine.on_pass_closed(self)
        owner_ref, self._last_owner = self._last_owner, None
        param = None if owner_ref is None else owner_ref()
        token = None if param is None else self._grad_token(param)
        if token is not None:
            self._sentinel = (weakref.ref(param), token)

    def _grads_were_reset(self) -> bool:
        """True if ``.grad`` changed since the last pass closed (zero_grad, no update between)."""
        if self._sentinel is None:
            return False
        param_ref, token = self._sentinel
        param = param_ref()
        return param is None or self._grad_token(param) != token

    def _grad_token(self, param: torch.Tensor) -> tuple | None:
        if self.engine is not None:
            return self.engine.grad_token(param)
        grad = param.grad
        return None if grad is None else (id(grad), _compat.tensor_version(grad))

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
        if self.engine is not None:
            self.engine.end_window()
