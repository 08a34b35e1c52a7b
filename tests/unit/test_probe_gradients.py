"""The probe gradients that undo a clip between backward and ``step()`` (one process, DDP).

A clip (``clip_grad_norm_``, which the HF Trainer runs before every update) scales every gradient
by one factor; AdaScale recovers it from the norms of a few small "probe" gradients taken when
the last backward pass closed and again at ``step()``. A probe whose gradient is exactly zero
tells nothing.

LoRA makes that the rule at the first update: ``B`` starts at zero, so the gradient of every ``A``
(all of one shape) is exactly zero until the first step, while ``B``'s own gradient is not. The
probes are therefore taken from two shapes: the clip factor is recovered at a LoRA model's first
update and nothing is logged. The warning stays for its genuine case, every probe exactly zero
(here: the smallest parameters of both smallest shapes multiplied by zero), where a clip cannot
be measured.
"""

from __future__ import annotations

import logging

import pytest
import torch

from adascale_shard import AdaScale

PROBE_WARNING = "probe gradients"


class LoraPair(torch.nn.Module):
    """Two frozen 8 -> 24 projections with LoRA adapters of rank 2, initialised as PEFT does: ``A``
    (2 x 8) random, ``B`` (24 x 2) zero. The ``A`` matrices are the smallest trainable tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.ModuleList(torch.nn.Linear(8, 24) for _ in range(2))
        self.base.requires_grad_(False)
        self.A = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(2, 8) / 8**0.5) for _ in range(2))
        self.B = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(24, 2)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(base(x) + x @ a.T @ b.T for base, a, b in zip(self.base, self.A, self.B))


class DeadSmallParameters(torch.nn.Module):
    """The genuine case: the smallest trainable tensors, of the two smallest shapes, always get an
    exactly zero gradient (they are multiplied by zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 24)
        self.gate = torch.nn.Parameter(torch.ones(2))
        self.shift = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + 0.0 * (self.gate.sum() + self.shift.sum())


def first_update(model_cls, clip: float | None, caplog) -> tuple[dict, list[str]]:
    torch.manual_seed(0)
    model = model_cls()
    opt = AdaScale(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # 4 accumulation steps: N = 4
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 24, generator=gen)
        (torch.nn.functional.mse_loss(model(x), y) / 4).backward()
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        assert norm > 10 * clip  # the clip really scaled the gradients
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adascale_shard"):
        opt.step()
    return opt.stats(), [r.getMessage() for r in caplog.records if PROBE_WARNING in r.getMessage()]


def test_a_clip_at_a_lora_models_first_update_is_undone_without_a_warning(caplog):
    clipped, warned = first_update(LoraPair, 1e-3, caplog)
    plain, _ = first_update(LoraPair, None, caplog)
    assert warned == []
    # ||G||^2 recovered through the probe of B's shape: equal up to float32 rounding of the clipped
    # probe (taken after the clip, it would be smaller by (norm / 1e-3)^2 > 100).
    for key in ("gain", "var", "sqr"):
        assert clipped[key] == pytest.approx(plain[key], rel=1e-5)


def test_every_probe_exactly_zero_is_warned_with_the_probes_shapes(caplog):
    _, warned = first_update(DeadSmallParameters, 1e-3, caplog)
    assert len(warned) == 1
    assert "[2]" in warned[0] and "[3]" in warned[0]  # the probes: gate and shift
    assert "probe-gradients-are-zero" in warned[0]
