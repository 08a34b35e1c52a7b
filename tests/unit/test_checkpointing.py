"""Activation checkpointing: passes are counted once, and a parameter split across a reentrant
checkpoint boundary is detected and warned about."""

import logging

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from adascale_shard import AdaScale


class Net(torch.nn.Module):
    def __init__(self, shared_outside: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(6, 16)
        self.block = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 1)
        self.shared_outside = shared_outside

    def forward(self, x, mode):
        h = torch.tanh(self.inner(x))

        def block(t):
            return torch.tanh(self.block(t))

        h = block(h) if mode == "none" else checkpoint(block, h, use_reentrant=mode == "reentrant")
        if self.shared_outside:  # the checkpointed block's weight used again outside it
            h = torch.tanh(self.block(h))
        return self.head(h)


def run(mode, shared_outside):
    model = Net(shared_outside)
    opt = AdaScale(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _ in range(4):
            x = torch.randn(8, 6, generator=gen).requires_grad_(True)
            y = torch.randn(8, 1, generator=gen)
            (torch.nn.functional.mse_loss(model(x, mode), y) / 4).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointing_counts_passes_once_and_is_exact(mode, caplog):
    reference = run("none", shared_outside=False)
    with caplog.at_level(logging.WARNING):
        opt = run(mode, shared_outside=False)
    assert opt.stats()["N"] == 4
    assert opt.gain() == pytest.approx(reference.gain(), rel=1e-6)
    assert opt.tau == pytest.approx(reference.tau, rel=1e-6)
    assert not [r for r in caplog.records if "two partial gradients" in r.message]


def test_parameter_split_across_a_reentrant_checkpoint_is_warned(caplog):
    reference = run("none", shared_outside=True)
    with caplog.at_level(logging.WARNING):
        opt = run("reentrant", shared_outside=True)
    assert sum("two partial gradients" in r.message for r in caplog.records) == 1
    assert opt.stats()["N"] == 4
    # The warning is deserved: the estimate really differs from the exact one.
    assert opt.gain() != pytest.approx(reference.gain(), rel=1e-6)
    with caplog.at_level(logging.WARNING):
        exact = run("non_reentrant", shared_outside=True)
    assert exact.gain() == pytest.approx(reference.gain(), rel=1e-6)


class AllInside(torch.nn.Module):
    """The LoRA layout: every trainable parameter inside one of two checkpointed blocks, the
    layers around them frozen, so no hook fires in the outer backward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(6, 16).requires_grad_(False)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        self.head = torch.nn.Linear(16, 1).requires_grad_(False)

    def forward(self, x, mode):
        h = torch.tanh(self.inner(x))
        for block in self.blocks:

            def run_block(t, block=block):
                return torch.tanh(block(t))

            h = run_block(h) if mode == "none" else checkpoint(run_block, h, use_reentrant=mode == "reentrant")
        return self.head(h)


def run_all_inside(mode):
    model = AllInside()
    opt = AdaScale([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _ in range(4):
            x = torch.randn(8, 6, generator=gen).requires_grad_(True)
            (torch.nn.functional.mse_loss(model(x, mode), torch.randn(8, 1, generator=gen)) / 4).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_non_reentrant_checkpointing_with_every_trainable_parameter_inside_is_exact():
    reference = run_all_inside("none")
    opt = run_all_inside("non_reentrant")
    assert opt.stats()["N"] == 4
    assert opt.gain() == pytest.approx(reference.gain(), rel=1e-6)


def test_reentrant_checkpointing_with_every_trainable_parameter_inside_counts_passes_once():
    reference = run_all_inside("none")
    opt = run_all_inside("reentrant")
    assert opt.stats()["N"] == 4
    assert opt.gain() == pytest.approx(reference.gain(), rel=1e-6)
