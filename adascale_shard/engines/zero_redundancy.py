"""torch's ``ZeroRedundancyOptimizer`` (``torch.distributed.optim``) and AdaScale.

* **Outside** (``AdaScale(ZeroRedundancyOptimizer(params, optimizer_class=SGD, ...))``): exact.
  ZeroRedundancyOptimizer shards only the optimizer *state* and the update: its ``param_groups``
  hold every parameter, DDP leaves every rank the same reduced gradient, and its ``step()`` copies
  the learning rate AdaScale sets on those groups into each rank's local optimizer
  (``_sync_param_groups``) before stepping and broadcasting. AdaScale sees what it sees under plain
  DDP (the replicated engine): hooks on every parameter, ``||G||^2`` from the replicated gradients
  (tests/distributed/test_sharded_optimizers.py).
* **Inside** (``ZeroRedundancyOptimizer(params, optimizer_class=AdaScale, ...)``): each rank's
  AdaScale is built on that rank's partition of the parameters only, so the micro-gradient norms
  it hooks and its share of ``||G||^2`` cover a rank-dependent subset, and the one all-reduce sums
  pieces that do not add up to ``A`` and ``||G||^2``: a wrong gain, without a word. Refused at
  construction (:func:`refuse_inside_zero_redundancy`).
"""

from __future__ import annotations

import sys

from .._compat import python_frame
from .._docs import see

__all__ = ["refuse_inside_zero_redundancy"]

_ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"
_FRAMES = 8  # AdaScale.__init__ (and a subclass's) up to ZeroRedundancyOptimizer._init_local_optimizer


def refuse_inside_zero_redundancy() -> None:
    """Raise if the AdaScale being built is ``optimizer_class`` of a ``ZeroRedundancyOptimizer``:
    one of the few callers above ``AdaScale.__init__`` is a ZeroRedundancyOptimizer method. Costs a
    walk of a few frames, once per construction; nothing if ZeroRedundancyOptimizer was never
    imported."""
    module = sys.modules.get(_ZERO_MODULE)
    cls = getattr(module, "ZeroRedundancyOptimizer", None)
    if cls is None:
        return
    frame = python_frame(1)
    for _ in range(_FRAMES):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), cls):
            raise ValueError(
                "AdaScale was built by ZeroRedundancyOptimizer(..., optimizer_class=AdaScale) on one "
                "rank's partition of the parameters: its micro-gradient and ||G||^2 norms would cover "
                "only that partition and the gain would be wrong. Put AdaScale outside instead: "
                "AdaScale(ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, "
                "lr=...))" + see("adascale-inside-zeroredundancyoptimizer")
            )
        frame = frame.f_back
