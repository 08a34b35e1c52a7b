"""Bad input that needs two ranks, one harness launch: each error names the setting and the fix,
on both ranks (an error on one rank only would leave the other in a collective).

* ranks running different numbers of backward passes before ``step()``;
* FSDP2: trainable parameters not sharded (the root left out of ``fully_shard``), a 2-D (HSDP)
  mesh of 1 replica x 2 shards (accepted since HSDP is exact: tests/distributed/test_fsdp2_hsdp.py
  has its refusals), AdaScale's process group differing from FSDP2's shard group, ``attach`` called again in
  the middle of an accumulation window;
* FSDP2 gradients set without a backward pass through the attached model;
* the HF Trainer under ``torchrun`` on CPU without ``--use_cpu true`` (Accelerate then counts one
  process while torch.distributed runs two), and with ``--fsdp`` on CPU (Accelerate silently runs
  DDP; AdaScale warns), when transformers is installed.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from adascale_shard import AdaScale
from tests.harness import Case, error_of, run_cases

pytestmark = pytest.mark.distributed


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def uneven_passes(rank: int, world: int) -> dict:
    net = model()
    opt = AdaScale(torch.optim.SGD(net.parameters(), lr=0.1))
    for _ in range(2 if rank == 0 else 1):  # rank 0 accumulates twice, rank 1 once
        net(torch.randn(4, 4)).pow(2).mean().backward()
    message = error_of(opt.step)
    return {"message": message, "tau": opt.tau}


def fsdp2_errors(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    # Root not sharded: fc2's parameters stay plain tensors.
    net = model()
    fully_shard(net.fc1)
    out["mixed"] = error_of(lambda: AdaScale(torch.optim.SGD(net.parameters(), lr=0.1)))
    # HSDP: a 2-D mesh (1 replica x 2 shards), accepted.
    net = model()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    fully_shard(net, mesh=mesh)
    opt = AdaScale(torch.optim.SGD(net.parameters(), lr=0.1))
    out["hsdp"] = error_of(lambda: opt.attach(net))
    # AdaScale averaging over another group than the one FSDP2 shards over.
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    net = model()
    fully_shard(net)
    opt = AdaScale(torch.optim.SGD(net.parameters(), lr=0.1), process_group=groups[rank])
    out["group"] = error_of(lambda: opt.attach(net))
    # attach() again after a backward pass of the current window.
    net = model()
    fully_shard(net)
    opt = AdaScale(torch.optim.SGD(net.parameters(), lr=0.1))
    opt.attach(net)
    net(torch.randn(4, 4)).pow(2).mean().backward()
    out["reattach"] = error_of(lambda: opt.attach(net))
    opt.step()  # the window is still consumed normally
    out["updates_after_reattach"] = opt.stats()["updates"]
    # attach()ed, but the gradients did not come from a backward pass through the attached model.
    net = model()
    fully_shard(net)
    opt = AdaScale(torch.optim.SGD(net.parameters(), lr=0.1))
    opt.attach(net)
    for p in net.parameters():
        p.grad = torch.ones_like(p)  # a DTensor, set by hand
    out["attached_never_fired"] = error_of(opt.step)
    out["tau_after_never_fired"] = opt.tau
    return out


def trainer_without_use_cpu(rank: int, world: int, output_dir: str) -> dict:
    try:
        from transformers import Trainer, TrainingArguments
    except ImportError:
        return {"skipped": "transformers is not installed"}
    from adascale_shard.integrations.hf import enable_adascale

    # What torchrun sets; the process group itself is the harness's.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    args = TrainingArguments(output_dir=output_dir, max_steps=4, report_to=[])  # no use_cpu=True
    trainer = Trainer(model=model(), args=args)
    return {"trainer_world_size": args.world_size, "message": error_of(lambda: enable_adascale(trainer))}


class Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=gen)
        return {"x": x, "labels": x.sum(0, keepdim=True)}


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


def trainer_fsdp_on_cpu(rank: int, world: int, output_dir: str, version: int = 2) -> dict:
    """--fsdp on CPU (FSDP2 or FSDP1): Accelerate silently trains with DDP; AdaScale says so in a
    warning. (With FSDP1, Accelerate's plugin itself refuses the default sync_module_states=True on
    CPU, hence False.)"""
    import logging

    try:
        from transformers import Trainer, TrainingArguments
    except ImportError:
        return {"skipped": "transformers is not installed"}
    from adascale_shard.integrations.hf import enable_adascale

    records: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("adascale_shard").addHandler(handler)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": version, "sync_module_states": False},
        per_device_train_batch_size=4, max_steps=2, logging_steps=1, save_strategy="no", report_to=[],
    )  # fmt: skip
    try:
        trainer = Trainer(model=Regressor(), args=args, train_dataset=Pairs())
        enable_adascale(trainer)
        trainer.train()
    finally:
        logging.getLogger("adascale_shard").removeHandler(handler)
    return {"wrapped": type(trainer.model_wrapped).__name__, "warnings": records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cases = [
        Case("uneven_passes", uneven_passes),
        Case("fsdp2", fsdp2_errors),
        Case("trainer", trainer_without_use_cpu, (str(tmp_path_factory.mktemp("trainer")),)),
        Case("trainer_fsdp", trainer_fsdp_on_cpu, (str(tmp_path_factory.mktemp("trainer_fsdp")),)),
        Case("trainer_fsdp1", trainer_fsdp_on_cpu, (str(tmp_path_factory.mktemp("trainer_fsdp1")), 1)),
    ]
    return run_cases(cases, world_size=2, timeout=240)


def test_ranks_with_different_numbers_of_backward_passes(runs):
    for rank in (0, 1):
        out = runs[rank]["uneven_passes"]
        assert out["message"].startswith("RuntimeError: AdaScale: the ranks ran different numbers of backward passes")
        assert "(total 3 over 2 ranks)" in out["message"]
        assert "Every rank must run the same number of accumulation steps before step()" in out["message"]
        assert out["tau"] == 0.0


def test_fsdp2_root_not_sharded(runs):
    for rank in (0, 1):
        message = runs[rank]["fsdp2"]["mixed"]
        assert message.startswith("ValueError: AdaScale got FSDP2 (DTensor) parameters together with 2 plain tensors")
        assert "apply fully_shard to the root module as well" in message


def test_fsdp2_two_dimensional_mesh_is_accepted(runs):
    for rank in (0, 1):
        assert runs[rank]["fsdp2"]["hsdp"] is None, runs[rank]["fsdp2"]["hsdp"]


def test_fsdp2_process_group_differs_from_the_shard_group(runs):
    for rank in (0, 1):
        message = runs[rank]["fsdp2"]["group"]
        assert "AdaScale's process group has 1 ranks but FSDP2 averages the gradients of" in message and "over 2:" in message
        assert "process_group=<the FSDP2 mesh's group>" in message


def test_fsdp2_attach_in_the_middle_of_a_window(runs):
    for rank in (0, 1):
        out = runs[rank]["fsdp2"]
        assert out["reattach"] == (
            "RuntimeError: AdaScale.attach was called after backward passes that were not consumed "
            "by step(): call attach(model) before the first backward"
            " (see docs/troubleshooting.md#attach-after-backward)"
        )
        assert out["updates_after_reattach"] == 1.0


def test_trainer_under_torchrun_on_cpu_without_use_cpu(runs):
    out = runs[0]["trainer"]
    if "skipped" in out:
        pytest.skip(out["skipped"])
    for rank in (0, 1):
        out = runs[rank]["trainer"]
        assert out["trainer_world_size"] == 1, out
        assert "the Trainer sees 1 process(es) but torch.distributed runs 2" in out["message"]
        assert "pass --use_cpu true (TrainingArguments(use_cpu=True))" in out["message"]


def test_fsdp2_gradients_that_did_not_pass_the_attached_hooks(runs):
    for rank in (0, 1):
        out = runs[rank]["fsdp2"]
        message = out["attached_never_fired"]
        assert message.startswith("RuntimeError: AdaScale: the FSDP2 (DTensor) parameters have gradients but the hooks")
        assert "Attach the model you train" in message
        assert out["tau_after_never_fired"] == 0.0


@pytest.mark.parametrize("case", ["trainer_fsdp", "trainer_fsdp1"])
def test_trainer_fsdp_on_cpu_warns_that_it_runs_ddp(runs, case):
    """FSDP2 and FSDP1 (fsdp_version 1, the Trainer's --fsdp "full_shard auto_wrap") alike."""
    out = runs[0][case]
    if "skipped" in out:
        pytest.skip(out["skipped"])
    for rank in (0, 1):
        out = runs[rank][case]
        assert out["wrapped"] == "DistributedDataParallel"
        warned = [m for m in out["warnings"] if "--fsdp was given but the model is not sharded" in m]
        assert len(warned) == 1 and "the Trainer fell back to DDP" in warned[0], out["warnings"]
