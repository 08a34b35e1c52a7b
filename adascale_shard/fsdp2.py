"""FSDP2 checkpointing for users: :class:`AdaScaleStateful` (the engine is :mod:`adascale_shard.engines.fsdp2`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._docs import see
from .optimizer import STATE_DICT_KEY, AdaScale

__all__ = ["AdaScaleStateful"]


class AdaScaleStateful:
    """A ``torch.distributed.checkpoint`` ``Stateful`` for an FSDP2 model and its AdaScale.

    ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` keep only the base optimizer's
    ``state`` and ``param_groups`` (they drop AdaScale's ``"adascale"`` key), so this wrapper
    saves three entries: the sharded model, the sharded base-optimizer state, and AdaScale's
    estimator (plain floats, identical on every rank)::

        from adascale_shard.fsdp2 import AdaScaleStateful
        dcp.save({"train": AdaScaleStateful(model, opt)}, checkpoint_id=path)
        ...
        dcp.load({"train": AdaScaleStateful(model, opt)}, checkpoint_id=path)  # fresh process

    ``set_optimizer_state_dict`` calls ``step()`` with zero gradients on a fresh optimizer to
    create its state; that ``step()`` records no backward pass, so ``tau`` does not move.
    """

    def __init__(self, model: nn.Module, optimizer: AdaScale, *, options: Any = None) -> None:
        if not isinstance(optimizer, AdaScale):
            raise TypeError(
                f"AdaScaleStateful needs an AdaScale optimizer, got {type(optimizer).__name__}"
                + see("adascalestateful-needs-an-adascale-optimizer")
            )
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        return {
            "model": model_state,
            "optim": optim_state,
            STATE_DICT_KEY: self.optimizer.estimator_state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )
        self.optimizer.load_estimator_state_dict(state_dict[STATE_DICT_KEY])
