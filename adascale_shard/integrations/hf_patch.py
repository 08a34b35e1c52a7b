"""The HF Trainer under ``import adascale_shard``: no half-AdaScale.

``import adascale_shard`` (and so ``python -m adascale_shard.run``) wraps ``Trainer.train`` when
``transformers.trainer`` is imported (now, or later: this module never imports Transformers).
Before the Trainer's own ``train`` runs, :func:`adascale_shard.integrations.hf.prepare_train`
turns on the whole AdaScale flow when AdaScale is, or will be, the Trainer's optimizer (a DeepSpeed
JSON ``"type": "AdaScale"``, ``optimizer_cls_and_kwargs``, an AdaScale instance, or an
``AdaScaleCallback`` among the callbacks), and otherwise adds a check that refuses an AdaScale
optimizer that appears later without the flow; ``"optimizer": "AdaScale"`` given as a string in the
Trainer's DeepSpeed JSON gets a message naming the block. ``ADASCALE_NO_TRAINER_PATCH=1`` in the
environment switches it off; :func:`unpatch` undoes it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ._post_import import forget, when_imported
from .deepspeed import check_optimizer_block

__all__ = ["install", "unpatch", "NO_PATCH_ENV"]

logger = logging.getLogger(__name__)

NO_PATCH_ENV = "ADASCALE_NO_TRAINER_PATCH"
_MODULE = "transformers.trainer"
_DEEPSPEED_MODULE = "transformers.integrations.deepspeed"
_ORIGINAL = "_adascale_shard_original_train"


def install() -> None:
    """Wrap ``Trainer.train`` now if Transformers' trainer module is imported, else when it is."""
    if os.environ.get(NO_PATCH_ENV, "") == "1":
        logger.info("adascale_shard: %s=1, the HF Trainer is not patched", NO_PATCH_ENV)
        return
    when_imported(_MODULE, patch_trainer)
    when_imported(_DEEPSPEED_MODULE, patch_deepspeed_config)


def patch_trainer(module: ModuleType) -> None:
    """Wrap ``module.Trainer.train`` (idempotent)."""

    def prepare(trainer: Any) -> None:
        from .hf import prepare_train  # imports Transformers, which is loaded by now

        prepare_train(trainer)

    _run_first(module.Trainer, "train", prepare)


def patch_deepspeed_config(module: ModuleType) -> None:
    """``"optimizer": "AdaScale"`` as a string stops the Trainer's DeepSpeed config parsing
    (``TrainingArguments(deepspeed=...)``) with a bare ``AttributeError``: name the block instead."""
    _run_first(module.HfTrainerDeepSpeedConfig, "trainer_config_process", lambda config: check_optimizer_block(config.config))


def _run_first(cls: type, name: str, first: Callable[[Any], None]) -> None:
    """Make ``cls.<name>(self, ...)`` call ``first(self)`` before itself (once per class)."""
    if _ORIGINAL in vars(cls):
        return
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        first(self)
        return original(self, *args, **kwargs)

    setattr(cls, _ORIGINAL, original)
    setattr(cls, name, wrapped)


def unpatch() -> None:
    """Give ``Trainer`` its own ``train`` (and the Trainer's DeepSpeed config its parsing) back; a
    Transformers imported later is not patched."""
    import sys

    for module_name, class_name, method in (
        (_MODULE, "Trainer", "train"),
        (_DEEPSPEED_MODULE, "HfTrainerDeepSpeedConfig", "trainer_config_process"),
    ):
        forget(module_name)
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and _ORIGINAL in vars(cls):
            setattr(cls, method, vars(cls)[_ORIGINAL])
            delattr(cls, _ORIGINAL)
