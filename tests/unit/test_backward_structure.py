"""Structural proof that the capture adds no host synchronisation and no gradient-sized buffer
inside backward: every aten op run during ``backward()`` is recorded with a dispatch mode and
the ops AdaScale adds are compared with a run without it."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adascale_shard import AdaScale

HOST_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default"}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        # Views share their input's storage: only non-view outputs allocate.
        allocated = 0 if func.is_view else sum(o.numel() for o in outs if isinstance(o, torch.Tensor))
        self.ops[(str(func), allocated)] += 1
        return out


def mlp(dtype):
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    ).to(dtype)


def backward_ops(wrap, dtype=torch.float32, build=mlp, **adascale_kwargs):
    """The ops of the second of two backward passes (it accumulates into existing .grad)."""
    torch.manual_seed(0)
    model = build(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if wrap:
        opt = AdaScale(opt, **adascale_kwargs)
    x = torch.randn(16, model[0].in_features, dtype=dtype)
    for _ in range(2):
        loss = model(x).float().pow(2).mean()
        recorder = OpRecorder()
        with recorder:
            loss.backward()
    return recorder.ops, model, opt


def test_capture_adds_no_sync_and_no_gradient_sized_buffer():
    for dtype in (torch.float32, torch.bfloat16):
        base, model, _ = backward_ops(wrap=False, dtype=dtype)
        with_adascale, _, _ = backward_ops(wrap=True, dtype=dtype)
        added = with_adascale - base
        assert added, "the dispatch mode saw none of the hooks' work: the test would prove nothing"
        # A few scalars per parameter (the norms' preallocated slots, their float64 squares, a
        # chunk of at least 16 slots); the gradients hold 4096.
        limit = 2 * len(list(model.parameters())) + 16
        assert max(p.numel() for p in model.parameters()) > 100 * limit
        assert not [op for op in with_adascale if op[0] in HOST_SYNC_OPS]
        big = [(op, n) for (op, n) in added if n > limit]
        assert not big, f"AdaScale allocated gradient-sized tensors in backward: {big}"
        assert any(op.startswith("aten.linalg_vector_norm") for op, _ in added)  # the hooks ran


def many_small_linears(dtype):
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(40)]).to(dtype)  # 80 parameters


def test_pass_bookkeeping_is_a_few_kernels_whatever_the_parameter_count():
    # Beyond one norm per parameter, opening and closing a pass costs a constant number of
    # kernels: every norm slot lies in one chunk sized for the optimizer's parameters.
    base, _, _ = backward_ops(wrap=False, build=many_small_linears)
    with_adascale, _, opt = backward_ops(wrap=True, build=many_small_linears, scale=2)
    added = with_adascale - base
    norms = sum(n for (op, _), n in added.items() if op.startswith("aten.linalg_vector_norm"))
    assert norms == 80
    assert len(opt._capture._chunks) == 1
    bookkeeping = sum(added.values()) - norms
    assert 0 < bookkeeping <= 4, f"the per-pass bookkeeping grew with the model: {added}"
