"""The protocol every engine implements, with the defaults most share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._compat import is_dtensor, is_fsdp1_flattened, local_shard, sparse_values, tensor_version
from .._docs import see
from ..capture import reduction_dtype

if TYPE_CHECKING:  # pragma: no cover
    from ..capture import MicroGradCapture

__all__ = ["Engine", "NO_BACKWARD_RECORDED", "FSDP1_NOT_ATTACHED", "ATTACH_FIX", "grad_sqr_norms"]

ATTACH_FIX = (
    "build AdaScale before the first forward and compute the gradients with forward and backward "
    "through the sharded model, or call opt.attach(model) once, after fully_shard(...) (or "
    "accelerator.prepare(...)) and before the first forward"
)

NO_BACKWARD_RECORDED = (
    "AdaScale: the parameters have gradients but no backward pass was recorded, so "
    "the gain would stay 1 and tau at 0 (budget_spent() would never come true). "
    "AdaScale's hooks see the gradients that backward() (loss.backward(), "
    "torch.autograd.backward) accumulates into the .grad of the parameters it was "
    "built on; gradients computed with torch.autograd.grad or torch.func and "
    "assigned to .grad, or computed on other parameter objects (a model copied or "
    "rebuilt after the optimizer), are not seen. Compute the gradients with "
    "backward(), on the parameters AdaScale was built on" + see("no-backward-pass-recorded")
)


FSDP1_NOT_ATTACHED = (
    "AdaScale: the parameters have gradients but no backward pass was recorded. They are the original "
    "parameters of FSDP1 (FullyShardedDataParallel, use_orig_params=True), whose own hooks never "
    "fire (forward uses views of the flat parameters): AdaScale hooks the flat parameters at the "
    "first forward of the wrapped model after AdaScale was built, and none ran since (the forward "
    "ran before); the gain would silently stay 1. Fix: build AdaScale before the first forward of "
    "the FullyShardedDataParallel model, or call opt.attach(fsdp_model) once before the first "
    "backward" + see("fsdp1-hooks-never-attached")
)


class Engine:
    """What differs per engine, per update. Subclasses override what they change.

    Attributes:
        hooks_parameters (bool): the capture hooks the optimizer's own parameters (``False``:
            the engine hooks the tensors that really receive the micro-gradients, FSDP2's
            unsharded parameters).
        detects_reset (bool): the capture drops a window whose ``.grad`` was reset before the next
            backward pass without a ``step()``. ``False`` where the engine frees ``.grad`` after
            every pass itself (ZeRO) and ends skipped windows itself.
        loss_scale (float): what the loss of this window's backward passes was multiplied by (an
            fp16 loss scale); the micro-gradient squares are divided by its square.
    """

    hooks_parameters = True
    detects_reset = True
    loss_scale = 1.0

    def grad_sqr_is_part(self, capture: MicroGradCapture) -> bool:
        """Whether :meth:`take_grad_sqr` is this rank's part of ``||G||^2``, summed over the ranks
        in the optimizer's all-reduce (a shard, or a share of replicated gradients)."""
        raise NotImplementedError

    def on_pass_closed(self, capture: MicroGradCapture) -> None:
        """A backward pass ended (after the engine's own reduction callbacks)."""

    def take_grad_sqr(self, capture: MicroGradCapture) -> tuple[torch.Tensor, torch.Tensor]:
        """``||G||^2`` per statistics group (float64, on ``capture.device``) or this rank's part of
        it, and probe norms for :meth:`unclip_factor` (empty if none). No host synchronisation: the
        optimizer reads both in the update's one transfer."""
        raise NotImplementedError

    def unclip_factor(self, probes: Sequence[float]) -> float:
        """What :meth:`take_grad_sqr` is multiplied by to be the pre-clip value (1 by default)."""
        return 1.0

    def grad_token(self, owner: torch.Tensor) -> tuple | None:
        """What identifies the gradient accumulated in ``owner`` now (``None``: none): taken when a
        backward pass closes and compared when the next opens, to notice a ``zero_grad`` between."""
        grad = owner.grad
        return None if grad is None else (id(grad), tensor_version(grad))

    def end_window(self) -> None:
        """The update consumed the window (or it was dropped): forget what it measured."""

    def check_hooks_fired(self, param_groups: Sequence[dict[str, Any]]) -> None:
        """Raise if the parameters have non-zero gradients although no backward pass was ever
        recorded. Zero gradients (the state-building ``step()`` of ZeRO's wrappers and of torch's
        distributed checkpoint) are fine."""
        for group in param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None or grad.numel() == 0:
                    continue
                values = local_shard(grad) if is_dtensor(p) else sparse_values(grad) if grad.is_sparse else grad
                if bool(values.count_nonzero()):
                    if is_fsdp1_flattened(p):  # FSDP1, use_orig_params=True: not this engine's params
                        raise RuntimeError(FSDP1_NOT_ATTACHED)
                    raise RuntimeError(self._unrecorded_message(is_dtensor(p)))

    def _unrecorded_message(self, dtensor: bool) -> str:
        if dtensor:
            return (
                "AdaScale: the FSDP2 (DTensor) parameters have gradients but no backward pass was "
                "recorded, because the hooks were never attached: AdaScale attaches itself when a "
                "fully_shard module holding its parameters runs forward, and none did since it was "
                "built (the forward ran before, or the gradients were written without backward()); "
                f"the gain would silently stay 1. Fix: {ATTACH_FIX}" + see("fsdp2-hooks-never-attached")
            )
        return NO_BACKWARD_RECORDED


def grad_sqr_norms(groups: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Squared norm of the ``.grad`` of each group, as a float64 tensor on ``device``; a DTensor
    (FSDP2) contributes its local shard. One fused kernel per dtype, no host synchronisation."""
    from .._compat import foreach_norm, local_shard

    zero = torch.zeros((), dtype=torch.float64, device=device)
    out = []
    for params in groups:
        grads = [p.grad for p in params]
        grads = [g if type(g) is torch.Tensor else local_shard(g) for g in grads if g is not None]
        dtypes = {g.dtype for g in grads}
        norms = []
        for dtype in dtypes:
            same = grads if len(dtypes) == 1 else [g for g in grads if g.dtype == dtype]
            norms += foreach_norm()(same, 2, dtype=reduction_dtype(dtype))
        if norms:
            if len(dtypes) > 1:
                norms = [n.to(torch.float64) for n in norms]
            norms = torch.stack(norms).to(device=device, dtype=torch.float64)
            out.append(torch.dot(norms, norms))
        else:
            out.append(zero)
    return torch.stack(out)
