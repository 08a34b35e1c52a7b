"""One process, or DDP: every rank holds the whole reduced gradient ``G``.

``||G||^2`` is needed once per update, but which backward pass is the last is only known at
``step()``. So a closing pass records two small "probe" gradients' norms, and ``step()`` measures
``G``; if the gradients were scaled in between by one factor (``clip_grad_norm_``,
``GradScaler.unscale_``), the probes give the factor back. With several ranks (DDP), each rank
measures only :func:`replica_share` of the tensors and the parts are summed in the optimizer's
one all-reduce, so each reads about ``1/ranks`` of ``G``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from itertools import zip_longest
from typing import TYPE_CHECKING

import torch

from .._compat import foreach_norm, tensor_version
from .._docs import see
from .base import Engine, grad_sqr_norms

if TYPE_CHECKING:  # pragma: no cover
    from ..capture import MicroGradCapture

__all__ = ["ReplicatedEngine", "replica_share", "NO_GRADIENT_AT_STEP"]

logger = logging.getLogger(__name__)

NO_GRADIENT_AT_STEP = (
    "AdaScale: backward passes were recorded but no parameter has a .grad at step(), so ||G||^2 "
    "cannot be measured (the gain would silently be wrong). Either the gradients were set to None "
    "between backward() and step() (call zero_grad after step), or an engine moved them away "
    "without telling AdaScale: DeepSpeed ZeRO needs adascale_shard's DeepSpeed patch (unset "
    "ADASCALE_NO_DEEPSPEED_PATCH and import adascale_shard before deepspeed.initialize)" + see("no-gradient-at-step")
)


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


def _groups_key(groups: Sequence[Sequence[torch.Tensor]]) -> tuple:
    # A group list replaced or grown (add_group, merge_groups) gives a new key.
    return tuple((id(params), len(params)) for params in groups)


class ReplicatedEngine(Engine):
    """``||G||^2`` of replicated gradients (one process, DDP).

    Args:
        replicas: returns ``(rank, ranks)`` of the processes whose ``.grad`` are replicas of each
            other (the optimizer's process group).
        measure_at_step: measure ``G`` at ``step()`` (default). ``False``: the engine that reduces
            the gradients calls :meth:`snapshot` once they are reduced (DeepSpeed ZeRO-0 in fp32,
            right after its all-reduce and before its clipping).
        detects_reset: see :class:`~adascale_shard.engines.Engine`.
    """

    def __init__(
        self, replicas: Callable[[], tuple[int, int]], *, measure_at_step: bool = True, detects_reset: bool = True
    ) -> None:
        self.replicas = replicas
        self.measure_at_step = measure_at_step
        self.detects_reset = detects_reset
        self._share: tuple[tuple, list[list[torch.Tensor]]] | None = None  # (its key, the share)
        self._probes: tuple[tuple, list[torch.Tensor]] | None = None  # (its key, the probe parameters)
        self._deferred: tuple | None = None
        self._grad_sqr: torch.Tensor | None = None
        self._warned_modified = False
        self._probe_shapes: list[list[int]] = []  # of the probes read at the last step(), for the warning

    def grad_sqr_is_part(self, capture: MicroGradCapture) -> bool:
        return self.replicas()[1] > 1

    def on_pass_closed(self, capture: MicroGradCapture) -> None:
        if not self.measure_at_step:
            return
        probe_params = self._probe_params(capture.groups)
        if any(hasattr(p.grad, "to_local") for p in probe_params):
            self.snapshot(capture)  # shards: the probes' local norms could be empty on a rank
            return
        probe_pairs = [(p, p.grad) for p in probe_params if p.grad is not None][:2]
        if probe_pairs:
            # One fused kernel; the norms are compared (on the host) only at step().
            self._deferred = (probe_pairs, foreach_norm()([g for _, g in probe_pairs]), None)
        else:  # no probe gradient: fall back to noticing any change, to warn about it
            self._deferred = ([], None, _fingerprint(capture.groups))

    def snapshot(self, capture: MicroGradCapture) -> None:
        """Take ``||G||^2`` (this rank's share) from the ``.grad`` of the groups now."""
        self._deferred = None
        self._grad_sqr = self._measure(capture)

    def end_window(self) -> None:
        self._deferred = None

    def take_grad_sqr(self, capture: MicroGradCapture) -> tuple[torch.Tensor, torch.Tensor]:
        none = torch.zeros(0, dtype=torch.float64, device=capture.device)
        if self._deferred is None:
            if self._grad_sqr is None or self._grad_sqr.numel() != len(capture.groups):
                self._grad_sqr = torch.zeros(len(capture.groups), dtype=torch.float64, device=capture.device)
            return self._grad_sqr, none
        probe_pairs, probe_norms, fingerprint = self._deferred
        if not any(p.grad is not None for params in capture.groups for p in params):
            raise RuntimeError(NO_GRADIENT_AT_STEP)
        grad_sqr = self._measure(capture)
        if probe_norms is None:
            if _fingerprint(capture.groups) != fingerprint:
                self._warn_modified("a gradient was replaced or removed")
            return grad_sqr, none
        self._probe_shapes = [list(p.shape) for p, _ in probe_pairs]
        if any(p.grad is not g for p, g in probe_pairs):
            self._warn_modified("a gradient was replaced or removed")
            return grad_sqr, none
        # Version counters miss some in-place kernels (GradScaler's unscale), so the probes decide.
        now = foreach_norm()([g for _, g in probe_pairs])
        probes = torch.stack([*probe_norms, *now]).to(device=capture.device, dtype=torch.float64)
        return grad_sqr, probes

    def unclip_factor(self, probes: Sequence[float]) -> float:
        """From the probe norms (before, then at ``step()``): the common factor a clip or unscale
        applied since the last pass, undone; 1 when nothing changed or no common factor exists."""
        if not probes:
            return 1.0
        half = len(probes) // 2
        ratios = [(a / b) ** 2 for a, b in zip(probes[:half], probes[half:]) if b > 0 and a > 0]
        if not ratios:
            if not self._warned_modified:
                self._warned_modified = True
                logger.warning(
                    "AdaScale: the probe gradients (the smallest trainable parameters, shapes %s) were "
                    "exactly zero at this update, so a clip or unscale between the last backward pass and "
                    "step() could not be measured: this update's ||G||^2 is the one at step(), too small by "
                    "the square of any factor the gradients were scaled by in between, which raises its "
                    "gain. Harmless if nothing rescales the gradients before step() (logged once)"
                    + see("probe-gradients-are-zero"),
                    self._probe_shapes,
                )
            return 1.0
        if max(ratios) - min(ratios) > 1e-4 * max(ratios):
            self._warn_modified("they were not scaled by one common factor")
            return 1.0
        factor = sum(ratios) / len(ratios)
        return 1.0 if abs(factor - 1.0) < 1e-6 else factor

    def _measure(self, capture: MicroGradCapture) -> torch.Tensor:
        groups = capture.groups
        rank, ranks = self.replicas()
        if ranks > 1:
            key = (rank, ranks, _groups_key(groups))
            if self._share is None or self._share[0] != key:
                self._share = (key, replica_share(groups, rank, ranks))
            groups = self._share[1]
        return grad_sqr_norms(groups, capture.device)

    def _probe_params(self, groups: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Probe candidates: small trainable parameters (their gradients are cheap to read twice),
        the smallest of the two smallest shapes in turn, so that the first two with a gradient are
        of two shapes. One shape alone can be silenced: a zero-initialised factor makes its
        partner's gradient exactly zero (LoRA's ``B = 0`` zeroes the gradient of every ``A``, all of
        one shape, until the first update), while the zero factor itself gets a gradient."""
        key = _groups_key(groups)
        if self._probes is None or self._probes[0] != key:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in sorted((p for params in groups for p in params if p.requires_grad), key=lambda p: p.numel()):
                by_shape.setdefault(p.shape, []).append(p)
            smallest = list(by_shape.values())[:2]
            alternating = [p for pair in zip_longest(*smallest) for p in pair if p is not None]
            self._probes = (key, alternating[:4])
        return self._probes[1]

    def _warn_modified(self, why: str) -> None:
        if not self._warned_modified:
            self._warned_modified = True
            logger.warning(
                "AdaScale: the gradients changed between the last backward pass and step() and %s; "
                "||G||^2 is taken as it is at step(). Clipping with clip_grad_norm_ and unscaling with "
                "a GradScaler are recognised; other in-place changes make the gain approximate."
                + see("gradients-changed-between-backward-and-step"),
                why,
            )


def _fingerprint(groups: Sequence[Sequence[torch.Tensor]]) -> list:
    return [None if g is None else (id(g), tensor_version(g)) for g in (p.grad for ps in groups for p in ps)]
