"""FSDP2 support, the parts that need no process group (the rest: tests/distributed/test_fsdp2.py)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

from adascale_shard import AdaScale
from adascale_shard._compat import is_dtensor, is_fsdp_module
from adascale_shard.capture import MicroGradCapture
from adascale_shard.engines import select_engine
from adascale_shard.engines.fsdp2 import FSDP2Engine
from adascale_shard.engines.replicated import ReplicatedEngine
from adascale_shard.fsdp2 import AdaScaleStateful


def test_import_adascale_shard_loads_neither_fsdp2_nor_torch_fsdp():
    code = (
        "import sys, adascale_shard; "
        "print('adascale_shard.engines.fsdp2' in sys.modules, 'torch.distributed.fsdp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout


def test_plain_tensors_are_not_dtensors():
    p = torch.nn.Parameter(torch.ones(3))
    assert not is_dtensor(p) and not is_dtensor(None)
    assert isinstance(select_engine([{"params": [p]}], lambda: (0, 1)), ReplicatedEngine)


def test_owner_grad_tells_a_reset_between_passes_not_the_hooked_tensor():
    """FSDP2 clears the unsharded parameter's ``.grad`` after every reduce-scatter; the window
    must survive that, and be dropped only when the owner's (sharded) ``.grad`` is reset."""
    unsharded = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    sharded = torch.nn.Parameter(torch.zeros(2))
    capture = MicroGradCapture([[sharded]], hook=False)
    capture.engine = FSDP2Engine()
    capture.hook_parameter(unsharded, 0, owner=sharded)

    def micro_step(scale: float) -> None:
        (scale * unsharded).sum().backward()
        # What FSDP2's post-backward does: move the gradient to the sharded parameter.
        g = unsharded.grad
        sharded.grad = g.clone() if sharded.grad is None else sharded.grad + g
        unsharded.grad = None

    micro_step(1.0)
    micro_step(2.0)
    assert capture.passes == 2 and capture.dropped_windows == 0
    assert capture.micro_sqr.item() == pytest.approx(2 * 1.0 + 2 * 4.0)  # ||h1||^2 + ||h2||^2
    sharded.grad = None  # zero_grad without a step
    micro_step(3.0)
    assert capture.dropped_windows == 1 and capture.passes == 1
    assert capture.micro_sqr.item() == pytest.approx(2 * 9.0)


def test_unrecorded_plain_gradients_name_backward_not_attach():
    model = torch.nn.Linear(3, 1)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    # No DTensor: the message is about backward(), not attach() (hand-set gradients that no hook
    # saw; see tests/unit/test_errors.py), on either engine.
    for engine in (FSDP2Engine(), opt._engine):
        with pytest.raises(RuntimeError, match="no backward pass was recorded") as err:
            engine.check_hooks_fired(opt.param_groups)
        assert "attach" not in str(err.value)
    with pytest.raises(RuntimeError, match="no backward pass was recorded"):
        opt.step()
    assert opt.tau == 0.0


def test_attach_refuses_a_model_without_fully_shard_and_changes_nothing():
    model = torch.nn.Linear(3, 1)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1))
    capture = opt._capture
    with pytest.raises(ValueError, match="has no fully_shard module"):
        opt.attach(model)
    assert opt._capture is capture and capture.num_hooks == 2 and isinstance(opt._engine, ReplicatedEngine)
    assert opt._auto_attach is not None  # still waiting for an FSDP2 model's first forward
    model(torch.ones(2, 3)).sum().backward()
    assert capture.passes == 1


def global_forward_pre_hooks() -> int:
    from torch.nn.modules.module import _global_forward_pre_hooks

    return len(_global_forward_pre_hooks)


def test_auto_attach_waits_for_an_fsdp2_forward_until_the_first_update():
    """Every AdaScale holds one global forward pre-hook (FSDP2's automatic attach) until its first
    update: a forward of plain modules, a zero-gradient step() (DCP's state init) keep it; the
    first update, an engine integration's engine and the optimizer's death remove it."""
    gc.collect()
    before = global_forward_pre_hooks()
    model = torch.nn.Linear(3, 1)
    assert not is_fsdp_module(model)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt._auto_attach is not None and opt._auto_attach.active
    assert global_forward_pre_hooks() == before + 1
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: no update
    model(torch.ones(2, 3)).sum().backward()  # no fully_shard module ran: nothing attached
    assert opt._auto_attach is not None and isinstance(opt._engine, ReplicatedEngine)
    opt.step()
    assert opt._auto_attach is None and global_forward_pre_hooks() == before
    other = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1))
    assert global_forward_pre_hooks() == before + 1
    other._install_engine(ReplicatedEngine(other._rank_and_world_size))  # what DeepSpeed's integration does
    assert other._auto_attach is None and global_forward_pre_hooks() == before
    third = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1))
    hook = third._auto_attach
    del third, other, opt, model, p  # the capture's hooks on the model's parameters hold the optimizers
    gc.collect()
    assert not hook.active and global_forward_pre_hooks() == before


def test_stateful_needs_adascale():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(TypeError, match="needs an AdaScale optimizer"):
        AdaScaleStateful(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_local_shard_of_a_dtensor_is_its_local_tensor_without_to_local(tmp_path):
    """``||G||^2`` on FSDP2 reads each DTensor gradient's local shard; ``to_local()`` (an autograd
    Function, 12 us a call) must not be on that path. A 1-rank gloo group in a subprocess, so this
    process stays without a process group."""
    code = f"""
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh
from adascale_shard._compat import local_shard
from adascale_shard.engines.base import grad_sqr_norms
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
full = torch.arange(12.0).reshape(4, 3)
d = distribute_tensor(full, mesh, [Shard(0)])
calls = []
original = DTensor.to_local
DTensor.to_local = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
shard = local_shard(d)
assert type(shard) is torch.Tensor and shard.data_ptr() == original(d).data_ptr(), shard
p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
p.grad = d
got = grad_sqr_norms([[p]], torch.device("cpu"))
assert abs(float(got[0]) - float((full.double() ** 2).sum())) < 1e-4, got
assert calls == [], calls
dist.destroy_process_group()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
