"""How ranks that hold the same replicated gradient (DDP) split the reading of ``||G||^2``."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from adascale_shard.capture import MicroGradCapture
from adascale_shard.engines.replicated import ReplicatedEngine, replica_share


def shapes_to_groups(shapes_per_group):
    return [[torch.nn.Parameter(torch.zeros(shape)) for shape in shapes] for shapes in shapes_per_group]


GPT2_LIKE = [[(1024, 128), (64, 128)] + [(128,), (128,), (128, 384), (384,), (128, 128), (128,), (128,), (128,), (128, 512), (512,), (512, 128), (128,)] * 4, [(128,), (128,)]]


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_the_shares_cover_every_tensor_once_in_its_group_and_balance_the_elements(ranks):
    groups = shapes_to_groups(GPT2_LIKE)
    groups[0][3].requires_grad_(False)  # frozen now, maybe unfrozen later: still dealt to one rank
    shares = [replica_share(groups, rank, ranks) for rank in range(ranks)]
    for g, params in enumerate(groups):
        measured = [id(p) for share in shares for p in share[g]]
        assert sorted(measured) == sorted(id(p) for p in params), g
    loads = [sum(p.numel() for group in share for p in group) for share in shares]
    largest = max(p.numel() for params in groups for p in params)
    # Greedy largest-first: no rank reads more than the mean plus one tensor.
    assert max(loads) <= sum(loads) / ranks + largest
    if ranks == 2:
        assert max(loads) <= 0.55 * sum(loads)  # this model splits almost evenly


def test_every_rank_computes_the_same_deal():
    # Built twice (as two processes would), the shares match tensor for tensor by position.
    first, second = shapes_to_groups(GPT2_LIKE), shapes_to_groups(GPT2_LIKE)
    for rank in range(3):
        positions = lambda groups: [[next(i for i, q in enumerate(groups[g]) if q is p) for p in share]
                                    for g, share in enumerate(replica_share(groups, rank, 3))]
        assert positions(first) == positions(second)


def test_capture_measures_its_share_only_with_replicas_and_says_so():
    groups = shapes_to_groups([[(6, 5), (5,), (4, 3)], [(7,)]])
    torch.manual_seed(0)
    for p in itertools.chain.from_iterable(groups):
        p.grad = torch.randn_like(p)
    full = torch.tensor([sum(float(p.grad.double().square().sum()) for p in params) for params in groups], dtype=torch.float64)
    capture = MicroGradCapture(groups)
    engine = ReplicatedEngine(lambda: (0, 1))
    engine.snapshot(capture)
    torch.testing.assert_close(engine.take_grad_sqr(capture)[0], full)
    assert not engine.grad_sqr_is_part(capture)
    parts = []
    for rank in range(2):
        engine.replicas = lambda rank=rank: (rank, 2)
        engine.snapshot(capture)
        assert engine.grad_sqr_is_part(capture)
        parts.append(engine.take_grad_sqr(capture)[0])
    torch.testing.assert_close(parts[0] + parts[1], full)
    assert all(float(part.sum()) < 0.99 * float(full.sum()) for part in parts)
    # An engine that supplies the global norm itself (ZeRO's wrappers) is never summed over ranks.
    pytest.importorskip("deepspeed")
    from adascale_shard.engines.deepspeed import WrapperNormEngine

    wrapper = types.SimpleNamespace(_global_grad_norm=float(full.sum()) ** 0.5, loss_scale=1.0)
    zero = WrapperNormEngine(types.SimpleNamespace(optimizer=wrapper, fp16_enabled=lambda: False))
    assert not zero.grad_sqr_is_part(capture)
    torch.testing.assert_close(zero.take_grad_sqr(capture)[0], full.sum().reshape(1))


def test_a_replaced_group_of_the_same_size_is_dealt_anew():
    old = shapes_to_groups([[(6, 5), (5,), (4, 3)]])
    new = shapes_to_groups([[(6, 5), (5,), (4, 3)]])
    for p in old[0] + new[0]:
        p.grad = torch.ones_like(p)
    for p in new[0]:
        p.grad.mul_(2.0)  # new squares are 4x the old ones
    capture = MicroGradCapture(old)
    engine = ReplicatedEngine(lambda: (0, 2))
    engine.snapshot(capture)
    before = float(engine.take_grad_sqr(capture)[0].sum())
    capture.groups[0] = list(new[0])  # as an engine swapping the parameters would
    engine.snapshot(capture)
    assert float(engine.take_grad_sqr(capture)[0].sum()) == pytest.approx(4 * before)
