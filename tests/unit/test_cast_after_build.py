"""AdaScale built before the model is cast or moved, as on a GPU machine.

``deepspeed.initialize`` casts with ``p.data = p.data.to(dtype)`` under bf16/fp16, and
``model.to("cuda")`` (Accelerate's ``prepare``, a user after building the optimizer) assigns
``p.data`` too: both replace each parameter's gradient-accumulator node while keeping the
``Parameter`` objects. A dtype cast is the CPU proxy of a device move: the same assignment, a new
node, gradients of another kind than the statistics slots were made for.
"""

import pytest
import torch

from adascale_shard import AdaScale


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def micro_batches(update, k=4, size=8):
    gen = torch.Generator().manual_seed(1234 + update)
    return [(torch.randn(size, 6, generator=gen), torch.randn(size, 1, generator=gen)) for _ in range(k)]


def train(model, opt, updates, dtype, k=4):
    trace = []
    for u in range(updates):
        for x, y in micro_batches(u, k):
            loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y) / k
            loss.backward()
        passes = opt._capture.passes
        opt.step()
        opt.zero_grad()
        trace.append((passes, opt.gain(), opt.tau, opt.stats()["var"], opt.stats()["sqr"]))
    return trace


def cast_module(model, dtype):
    model.to(dtype)


def cast_data(model, dtype):
    for p in model.parameters():
        p.data = p.data.to(dtype)  # what deepspeed.initialize does under bf16/fp16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("cast", [cast_module, cast_data])
def test_built_before_the_cast_equals_built_after(dtype, cast):
    before = make_model()
    opt_before = AdaScale(torch.optim.SGD(before.parameters(), lr=0.05))
    cast(before, dtype)
    after = make_model()
    cast(after, dtype)
    opt_after = AdaScale(torch.optim.SGD(after.parameters(), lr=0.05))

    got, want = train(before, opt_before, 5, dtype), train(after, opt_after, 5, dtype)
    assert [t[0] for t in got] == [4] * 5  # every backward pass recorded
    # The same norm kernels on the same gradients; the slots may be summed in another order.
    assert [v for t in got for v in t] == pytest.approx([v for t in want for v in t], rel=1e-12)
    assert got[-1][1] > 1.0
    for p, q in zip(before.parameters(), after.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def test_the_statistics_slots_follow_the_gradients_without_growing():
    model = make_model()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05))
    assert len(opt._capture._chunks) == 1
    model.to(torch.bfloat16)
    train(model, opt, 2, torch.bfloat16)
    # The fp32 chunk's hooks all moved to one new chunk; the empty one is gone after the update.
    chunks = opt._capture._chunks
    assert len(chunks) == 1 and chunks[0].live == 4 and chunks[0].norms.dtype == torch.float32
    model.to(torch.float64)  # a new slot dtype: a new chunk sized for all four hooks at once
    train(model, opt, 2, torch.float64)
    chunks = opt._capture._chunks
    assert len(chunks) == 1 and chunks[0].live == 4 and chunks[0].norms.dtype == torch.float64


def test_cast_back_and_forth_between_updates():
    model, reference = make_model(), make_model()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05))
    ref = AdaScale(torch.optim.SGD(reference.parameters(), lr=0.05))
    model.to(torch.float64)
    train(model, opt, 1, torch.float64)
    model.to(torch.float32)  # and back: the hooks rebind again
    got = train(model, opt, 2, torch.float32)
    reference.to(torch.float64)
    train(reference, ref, 1, torch.float64)
    reference.to(torch.float32)
    want = train(reference, ref, 2, torch.float32)
    assert [t[0] for t in got] == [4, 4]
    assert [v for t in got for v in t] == pytest.approx([v for t in want for v in t], rel=1e-12)
