"""Run a function right after a module executes, without importing it first: how ``import
adascale_shard`` patches DeepSpeed and the HF Trainer only if and when the user's script imports them."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["when_imported", "forget"]


class PostImportHook(importlib.abc.MetaPathFinder):
    """Finds ``fullname`` with the normal path finder and calls ``then(module)`` after it executed."""

    def __init__(self, fullname: str, then: Callable[[ModuleType], None]) -> None:
        self.fullname = fullname
        self.then = then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module
        then = self.then

        def exec_and_then(module):
            exec_module(module)
            then(module)

        loader.exec_module = exec_and_then
        return spec


def when_imported(fullname: str, then: Callable[[ModuleType], None]) -> None:
    """``then(module)`` now if ``fullname`` is imported, else right after it is (once per name)."""
    module = sys.modules.get(fullname)
    if module is not None:
        then(module)
    elif not any(isinstance(f, PostImportHook) and f.fullname == fullname for f in sys.meta_path):
        sys.meta_path.insert(0, PostImportHook(fullname, then))


def forget(fullname: str) -> None:
    """Remove the pending hook for ``fullname`` (a module imported later is left alone)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, PostImportHook) and f.fullname == fullname)]
