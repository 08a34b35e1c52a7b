"""The AdaScale optimizer: any ``torch.optim`` optimizer, with its learning rate scaled by the gain."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from . import estimators
from ._compat import init_optimizer_hooks
from ._docs import see
from .capture import MicroGradCapture
from .config import AdaScaleConfig
from .distributed import rank_and_world_size, start_all_reduce_sum, world_size
from .engines import Engine, select_engine
from .engines.zero_redundancy import refuse_inside_zero_redundancy
from .estimators import STATE_FORMAT_VERSION, Estimator

__all__ = ["AdaScale", "resolve_optimizer_class", "STATE_DICT_KEY", "STATE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

STATE_DICT_KEY = "adascale"


def _torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    found = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            found[name.lower()] = obj
    return found


def resolve_optimizer_class(optimizer: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """The base optimizer class for a ``torch.optim`` name (case-insensitive) or a class."""
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if issubclass(optimizer, AdaScale):
            raise ValueError(
                "optimizer='AdaScale' cannot wrap itself: name a base optimizer such as 'SGD'"
                + see("adascale-cannot-wrap-itself")
            )
        return optimizer
    if isinstance(optimizer, str):
        known = _torch_optimizers()
        if optimizer.lower() in known:
            return known[optimizer.lower()]
        if optimizer.lower() == "adascale":
            raise ValueError(
                "optimizer='AdaScale' cannot wrap itself: name a base optimizer such as 'SGD'"
                + see("adascale-cannot-wrap-itself")
            )
        names = ", ".join(sorted(cls.__name__ for cls in known.values()))
        raise ValueError(
            f"optimizer={optimizer!r} is not a torch.optim optimizer. Use one of: {names} "
            "(case-insensitive), or pass an optimizer class" + see("not-a-torch-optimizer")
        )
    raise TypeError(
        f"optimizer must be a torch.optim name such as 'SGD' or an Optimizer class, got {optimizer!r}"
        + see("optimizer-must-be-a-name-or-class")
    )


def build_base_optimizer(optimizer: Any, base_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer: ``optimizer`` itself, or built from parameters and a ``torch.optim`` name."""
    if isinstance(optimizer, AdaScale):
        raise TypeError(
            "AdaScale cannot wrap another AdaScale: wrap the base optimizer once"
            + see("adascale-cannot-wrap-another-adascale")
        )
    if isinstance(optimizer, torch.optim.Optimizer):
        if base_kwargs:
            raise TypeError(
                f"AdaScale got base-optimizer arguments {sorted(base_kwargs)} together with an "
                "optimizer instance: set them on the instance, or pass the parameters first "
                "and name the base optimizer with optimizer='SGD'" + see("base-optimizer-arguments-with-an-instance")
            )
        return optimizer
    if isinstance(optimizer, torch.Tensor):
        raise TypeError(
            "AdaScale's first argument must be an optimizer or an iterable of parameters, got a "
            "single tensor: pass [tensor] or model.parameters()" + see("single-tensor-instead-of-parameters")
        )
    base = base_kwargs.pop("optimizer", "SGD")
    cls = resolve_optimizer_class(base)
    try:
        return cls(optimizer, **base_kwargs)
    except (TypeError, ValueError, IndexError, KeyError) as err:
        # A bad value (betas=[] from a JSON block) can fail anywhere inside the constructor.
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(
            f"AdaScale could not build the base optimizer {cls.__name__} with "
            f"{sorted(base_kwargs)}: {type(err).__name__}: {err}. Check the base optimizer's "
            f"arguments (AdaScale's own are {list(AdaScaleConfig.field_names())})"
            + see("could-not-build-the-base-optimizer")
        ) from err


class AdaScale(torch.optim.Optimizer):
    r"""AdaScale: scales the learning rate of any optimizer by the gain estimated each update.

    .. math::
        r_t = \frac{\sigma^2 + \mu^2}{\sigma^2 / S + \mu^2} \in [1, S], \qquad
        \eta_t = r_t \cdot \mathrm{lr}(\lfloor \tau_t \rfloor), \qquad \tau_{t+1} = \tau_t + r_t

    where :math:`\sigma^2` (``var``) is the gradient variance at the base batch and
    :math:`\mu^2` (``sqr``) the squared norm of the true gradient, both estimated from the squared
    norms of the ``N`` local micro-gradients (taken on each rank before DDP's all-reduce) and of
    their average, then smoothed by a bias-corrected exponential average.

    Two ways to build it:

    * ``AdaScale(torch.optim.SGD(params, lr=0.1, momentum=0.9), scale=4)`` wraps an optimizer;
    * ``AdaScale(params, optimizer="SGD", lr=0.1, momentum=0.9)`` builds the base optimizer from
      a ``torch.optim`` name, the way DeepSpeed's JSON and the HF Trainer's
      ``optimizer_cls_and_kwargs`` call optimizer classes.

    ``param_groups`` and ``state`` are the base optimizer's (assignment included), so LR
    schedulers, ``GradScaler`` and engines see one optimizer. ``group["lr"]`` stays the user's:
    the gain multiplies it only while the base ``step()`` runs.

    The update protocol (one statistics computation per update, windows delimited by backward
    passes, skipped and non-finite updates, the pre-clip ``||G||^2``, ``N = 1``) is described in
    ``docs/algorithm.md#the-update-protocol``.

    Args:
        optimizer (positional): a ``torch.optim.Optimizer`` to wrap, or the parameters (an
            iterable of tensors or of parameter-group dicts) for the base optimizer named by the
            ``optimizer`` keyword.
        optimizer (keyword, str or type): with parameters first, the base optimizer: a
            ``torch.optim`` name (case-insensitive, default ``"SGD"``) or class.
        scale (float, optional): ``S = global_batch / base_batch``. ``None`` (default): ``S = N``,
            the micro-gradients per update (``world_size x accumulation steps``).
        smoothing (float, optional): EMA weight of the old statistics per update, in ``[0, 1)``.
            Default ``0.999 ** S``.
        lr_scaling (str): ``"gain"`` (default, the paper: ``lr * gain``; also the measured best
            for AdamW, README "AdamW") or ``"sqrt"`` (``lr * gain ** 0.5``). ``tau`` advances by
            the gain and decoupled weight decay by ``lr * weight_decay * gain`` under both.
        min_relative_var (float): floor of the variance relative to the squared norm (1e-6).
        process_group: the data-parallel group (default: the whole world when
            ``torch.distributed`` is initialised).
        **base_kwargs: with parameters first, the base optimizer's arguments (``lr``, ...).

    Example::

        >>> model = torch.nn.Linear(10, 1)
        >>> opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        >>> sched = follow_tau(torch.optim.lr_scheduler.StepLR(opt, 100), opt)
        >>> while not opt.budget_spent(1000):
        ...     for micro_batch in split(next(batches), 4):   # 4 micro-gradients: S = 4
        ...         (loss_fn(model, micro_batch) / 4).backward()
        ...     opt.step(); opt.zero_grad(); sched.step()

    .. note::
        The averages are of the raw unbiased estimates and are clamped only afterwards (the
        public fairscale implementation clamps each update first, which biases the gain down when
        noise is high), and the variance floor is relative, so scaling the loss by any constant
        leaves the gain unchanged.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Iterable[Any],
        /,
        *,
        scale: float | None = None,
        smoothing: float | None = None,
        lr_scaling: str = "gain",
        min_relative_var: float = estimators.DEFAULT_MIN_RELATIVE_VAR,
        process_group: dist.ProcessGroup | None = None,
        **base_kwargs: Any,
    ) -> None:
        refuse_inside_zero_redundancy()
        self.config = AdaScaleConfig(
            scale=scale, smoothing=smoothing, lr_scaling=lr_scaling, min_relative_var=min_relative_var
        )
        self.optimizer = build_base_optimizer(optimizer, base_kwargs)
        # The hook tables that torch.optim.Optimizer.__init__ would create; the parameters and
        # their state live in the wrapped optimizer, so its __init__ is not called.
        self.defaults = self.optimizer.defaults
        init_optimizer_hooks(self)

        self.process_group = process_group
        self._grad_scaler: Any = None
        self._seen_backward = False
        self._regrouped = False  # an engine merged the statistics into one group (DeepSpeed's wrappers)
        self._warned_nonfinite = False
        self._applied: tuple[list[float], float] | None = None  # (base lrs, lr factor) of the latest step
        # Why this base optimizer (set by the integration that chose it), for the one INFO line
        # that names what AdaScale wraps, logged by rank 0 at the first update (_announce).
        self.base_note: str | None = None
        self._announced = False
        self._engine: Engine = select_engine(self.optimizer.param_groups, self._rank_and_world_size)
        self._capture = self._new_capture()
        if self._capture.num_hooks == 0 and self._engine.hooks_parameters:
            raise ValueError(
                "AdaScale found no parameter that requires a gradient in the optimizer's "
                "param_groups: unfreeze the parameters before building the optimizer"
                + see("no-parameter-requires-a-gradient")
            )
        self._estimator = Estimator(len(self.optimizer.param_groups), min_relative_var)
        self._estimator.scale = float(scale) if scale is not None else 1.0
        # FSDP2: attach at the first forward of the sharded model unless attach() comes first.
        from .engines.fsdp2 import AutoAttach

        self._auto_attach: AutoAttach | None = AutoAttach(self)

    def _new_capture(self) -> MicroGradCapture:
        capture = MicroGradCapture(
            [g["params"] for g in self.optimizer.param_groups], hook=self._engine.hooks_parameters
        )
        capture.engine = self._engine
        return capture

    # -- the base optimizer's groups and state, shared ----------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._regrouped:  # checked first: a refused group must not reach the base optimizer
            raise RuntimeError(
                "add_param_group() is not supported once an engine has regrouped AdaScale's "
                "statistics (DeepSpeed ZeRO): add the group before deepspeed.initialize"
                + see("adding-a-parameter-group-after-deepspeed-initialize")
            )
        self.optimizer.add_param_group(param_group)
        self._capture.add_group(self.optimizer.param_groups[-1]["params"], hook=self._engine.hooks_parameters)
        self._estimator.add_group()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def attach(self, model: torch.nn.Module) -> Any:
        """FSDP2 and FSDP1: hook the statistics into ``model``, a module tree ``fully_shard`` (or
        ``FullyShardedDataParallel``) was applied to. On FSDP1 it hooks the flat parameters, which
        receive each rank's micro-gradients (:mod:`adascale_shard.engines.fsdp1`); the rest of this
        text is about FSDP2.

        Optional: AdaScale does this by itself when the first ``fully_shard`` module holding its
        parameters runs forward (FSDP2's root), also after ``accelerator.prepare`` swapped its
        parameters for the sharded ones. FSDP2 computes gradients on unsharded copies of the
        parameters, which exist only while a ``fully_shard`` module runs, hence the hooks. Call it
        to attach a given model explicitly, once, after ``fully_shard`` (or
        ``accelerator.prepare``) and before the first forward; the automatic attach then does
        nothing. It registers a forward pre-hook on each ``fully_shard`` module; each time such a
        module runs, the hook puts a gradient hook on any of its unsharded parameters not yet
        hooked, so the hooks attach during the first forward and survive a later swap of the
        optimizer's parameters. A ``step()`` that finds FSDP2 gradients but no recorded backward
        pass (no forward of the sharded model since AdaScale was built) raises ``RuntimeError``.
        Returns the hooks' handle (``.remove()``); see :mod:`adascale_shard.engines.fsdp2`.
        """
        from ._compat import fsdp1_modules

        if fsdp1_modules(model):
            from .engines import fsdp1

            return fsdp1.attach(self, model)
        from .engines.fsdp2 import attach

        return attach(self, model)

    def _stop_auto_attach(self) -> None:
        """No attach at the first forward of an FSDP2 model any more: attached, another engine
        installed, or an update consumed backward passes."""
        if self._auto_attach is not None:
            self._auto_attach.remove()
            self._auto_attach = None

    def attach_grad_scaler(self, scaler: Any) -> None:
        """Read the loss scale of a ``torch.amp.GradScaler`` that scales this optimizer's losses.

        Without it the statistics are kept in loss-scaled units: the gain is right at a constant
        scale, but after the scaler backs off or grows, older updates weigh more in the averages
        and the gain drifts (``tests/distributed/test_nonfinite.py`` measures how far). With it,
        ``var`` and ``sqr`` are in the units of the unscaled gradient. DeepSpeed's fp16 loss scale
        is divided out without this call.
        """
        if not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(
                f"attach_grad_scaler needs a torch.amp.GradScaler, got {type(scaler).__name__}"
                + see("attach-grad-scaler-needs-a-gradscaler")
            )
        self._grad_scaler = scaler

    def __repr__(self) -> str:
        return f"AdaScale({self.config}, {self.optimizer!r})"

    # -- public estimator state ---------------------------------------------------------------
    @property
    def tau(self) -> float:
        """Scale-invariant steps taken: the sum of the gains of all updates."""
        return self._estimator.tau

    def gain(self) -> float:
        """The gain applied at the latest update (1.0 before the first)."""
        return self._estimator.gain

    def set_scale(self, scale: float | None) -> None:
        """Change ``S`` (``None``: ``S = N``) from the next update on: when a launcher knows the
        global and base batch only after the optimizer was built, or when the global batch changes
        (elastic training). The averages are kept: they describe the model and the base batch, not
        the scale, so the base batch must stay the one the schedule was tuned with."""
        self.config = dataclasses.replace(self.config, scale=scale)

    def budget_spent(self, steps: float) -> bool:
        """True once ``tau`` reached ``steps``, the step budget tuned at the base batch."""
        return self._estimator.tau >= steps

    def lr_factor(self) -> float:
        """What ``group["lr"]`` is multiplied by in the base step: the gain, or its square root."""
        gain = self._estimator.gain
        return gain if self.config.lr_scaling == "gain" else math.sqrt(gain)

    def stats(self) -> dict[str, float]:
        """Floats for logging: the whole model's ``gain, tau, var, sqr, noise_scale, N, S``,
        ``lr`` and ``effective_lr`` (of group 0: the scheduled learning rate the latest update used,
        and that times its gain), counters, and ``group{i}/...`` values per parameter group.

        ``var`` and ``sqr`` are the smoothed, clamped estimates the gain was computed from, in the
        units of the gradient; ``noise_scale = var / sqr`` is the gradient noise scale in base
        batches; ``efficiency = gain / S`` is the fraction of the linear speed-up the scale delivers
        (``python -m adascale_shard.advisor`` predicts it at other scales from these logs).
        """
        out = self._estimator.stats()
        # The latest update's lr and factor; before the first, what the first would apply.
        lrs, factor = self._applied or ([group["lr"] for group in self.param_groups], self.lr_factor())
        out["lr"] = float(lrs[0])
        out["effective_lr"] = float(lrs[0]) * factor
        out["dropped_windows"] = float(self._capture.dropped_windows)
        for index in range(min(self._estimator.num_groups, len(lrs))):
            out[f"group{index}/effective_lr"] = float(lrs[index]) * factor
        return out

    # -- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update the statistics if new backward passes ran, then run the base step at ``lr * gain``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        new_update = self._capture.passes > 0
        if new_update:
            self._seen_backward = True
            self._stop_auto_attach()
            self._update_statistics()
            if not self._announced:
                self._announce()
        elif not self._seen_backward:
            self._engine.check_hooks_fired(self.param_groups)  # gradients, but no recorded pass
        factor = self.lr_factor()
        # Decoupled weight decay (AdamW) shrinks by lr * weight_decay per step; an update worth
        # `gain` base steps must shrink as much as they would, whatever the lr rule.
        decay_factor = self._estimator.gain / factor
        saved = [(group["lr"], group.get("weight_decay")) for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["lr"] = group["lr"] * factor
                if decay_factor != 1.0 and group.get("decoupled_weight_decay") and group.get("weight_decay"):
                    group["weight_decay"] = group["weight_decay"] * decay_factor
            self.optimizer.step()
        finally:
            for group, (lr, weight_decay) in zip(self.param_groups, saved):
                group["lr"] = lr
                if weight_decay is not None:
                    group["weight_decay"] = weight_decay
        self._applied = ([lr for lr, _ in saved], factor)
        if new_update:
            self._estimator.advance()
        return loss

    def _rank_and_world_size(self) -> tuple[int, int]:
        return rank_and_world_size(self.process_group)

    def _announce(self) -> None:
        """The one INFO line saying what AdaScale wraps, at the first update (when ``S`` and ``N``
        are known), from rank 0 only; ``base_note`` says where the choice came from."""
        self._announced = True
        if self._rank_and_world_size()[0] != 0:
            return
        base = self.optimizer
        name = type(base).__name__
        module = type(base).__module__
        if not module.startswith("torch.optim"):
            name = f"{module.split('.')[0]}'s {name}"
        lr = base.defaults.get("lr", self.param_groups[0].get("lr"))
        rule = "lr x gain" if self.config.lr_scaling == "gain" else "lr x sqrt(gain)"
        logger.info(
            "AdaScale wraps %s (lr %s, S = %g, N = %d gradients per update, %s)%s",
            name,
            f"{float(lr):g}" if isinstance(lr, (int, float)) else lr,
            self._estimator.scale,
            self._estimator.num_micro,
            rule,
            f": {self.base_note}" if self.base_note else "",
        )

    def _update_statistics(self) -> None:
        capture, engine, estimator = self._capture, self._engine, self._estimator
        num_groups = capture.micro_sqr.numel()
        passes = capture.passes
        counts = torch.tensor([passes, passes * passes], dtype=torch.float64, device=capture.device)
        ranks = world_size(self.process_group)
        # The probe norms that recover a clip since the last pass are local: read beside the sums.
        if engine.grad_sqr_is_part(capture):
            # This rank measures its part of ||G||^2 (its shard, or its share of the tensors of a
            # replicated gradient: each rank reads 1/ranks of G): summed with the rest.
            grad_sqr, probes = engine.take_grad_sqr(capture)
            wait = start_all_reduce_sum(torch.cat([capture.micro_sqr, counts, grad_sqr]), self.process_group)
            values = torch.cat([wait(), probes]).tolist()  # the one host synchronisation
        else:  # the engine's global norm (ZeRO), or one process: the same on every rank
            wait = start_all_reduce_sum(torch.cat([capture.micro_sqr, counts]), self.process_group)
            grad_sqr, probes = engine.take_grad_sqr(capture)
            values = torch.cat([wait(), grad_sqr, probes]).tolist()  # the one host synchronisation
        values, probe_norms = values[: len(values) - probes.numel()], values[len(values) - probes.numel() :]
        capture.reset()
        micro_sum = values[:num_groups]
        passes_sum, passes_sq_sum = values[num_groups : num_groups + 2]
        unclip = engine.unclip_factor(probe_norms)
        grad_sqr = [v * unclip for v in values[num_groups + 2 :]]
        if abs(passes_sq_sum * ranks - passes_sum**2) > 0.5:
            raise RuntimeError(
                f"AdaScale: the ranks ran different numbers of backward passes in one update "
                f"(total {passes_sum:.0f} over {ranks} ranks). Every rank must run the same "
                "number of accumulation steps before step()" + see("ranks-ran-different-numbers-of-backward-passes")
            )
        num_micro = int(round(passes_sum))
        passes_per_rank = passes_sum / ranks
        scale = float(self.config.scale) if self.config.scale is not None else float(num_micro)
        if estimator.num_micro and num_micro != estimator.num_micro:
            logger.info(
                "AdaScale: %d micro-gradients per update, %d before; the averages carry over. They are "
                "in the units of the applied gradient: right when each micro-batch's loss is divided "
                "by the accumulation steps (a mean); a summed loss changes their units with the "
                "accumulation steps (docs/algorithm.md#loss-normalisation)",
                num_micro,
                estimator.num_micro,
            )
        if num_micro < 2:
            if scale > 1:
                raise ValueError(
                    f"AdaScale got scale={self.config.scale} but only one micro-gradient per update "
                    "(one rank, one backward pass): one gradient carries no variance information. "
                    "Split each batch into at least two micro-batches (gradient accumulation) or "
                    "train on more ranks, or pass scale=None" + see("one-micro-gradient-per-update")
                )
            estimator.no_variance_update(num_micro, scale)
            return
        # Each hooked gradient h is scaled by the passes per rank so that the N micro-gradients
        # average to the applied gradient G, whatever the loss was divided by.
        loss_scale_sq = engine.loss_scale**2
        micro_mean = [passes_per_rank / ranks * s / loss_scale_sq for s in micro_sum]
        if self._grad_scaler is not None:
            # A GradScaler multiplied the loss of this window's passes by its current scale (it
            # changes only in update(), after step()): both A and ||G||^2 are divided out.
            grad_scale_sq = float(self._grad_scaler.get_scale()) ** 2
            if math.isfinite(grad_scale_sq) and grad_scale_sq > 0:
                micro_mean = [v / grad_scale_sq for v in micro_mean]
                grad_sqr = [v / grad_scale_sq for v in grad_sqr]
        if not estimator.update(micro_mean, grad_sqr, num_micro, scale, self.config.smoothing):
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                logger.warning(
                    "AdaScale: non-finite gradient statistics (inf/NaN in a micro-gradient); this "
                    "update's statistics were not folded into the averages (counted in "
                    "stats()['nonfinite_updates'], logged once)" + see("non-finite-gradient-statistics")
                )

    def _install_engine(self, engine: Engine, *, new_capture: bool = False, merge_groups: bool = False) -> None:
        """For engine integrations, before training starts: use ``engine`` for ``||G||^2``, with a
        new capture (the old parameters' hooks go dead) or with the statistics merged into one
        whole-model group (DeepSpeed reports one norm; the averages then restart)."""
        if self._estimator.updates or self._capture.passes:
            raise RuntimeError(
                "AdaScale's engine can only be replaced before the first backward pass: "
                "initialise the engine before training" + see("engine-replaced-after-backward")
            )
        self._stop_auto_attach()
        self._engine = engine
        if new_capture:
            self._capture.detach()
            self._capture = self._new_capture()
        self._capture.engine = engine
        if merge_groups:
            self._capture.merge_groups()  # the hooks stay (no second gather under ZeRO-3 zero.Init)
            self._regrouped = True
            self._estimator.reset_groups(1)

    def _drop_window(self) -> None:
        """For engine integrations: the engine skipped this update (fp16 overflow); forget its
        backward passes so they never reach the averages."""
        if self._capture.passes:
            self._capture.dropped_windows += 1
            self._capture.reset()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's ``state`` and ``param_groups``, plus AdaScale's estimator under
        ``"adascale"`` (see :meth:`estimator_state_dict`).

        Statistics of backward passes not yet consumed by a ``step()`` are not saved, just as
        no checkpoint saves the pending ``.grad``; a resumed run starts a fresh window.
        """
        state = dict(self.optimizer.state_dict())
        state[STATE_DICT_KEY] = self.estimator_state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`. A plain base-optimizer state dict (no ``"adascale"`` key)
        loads too and leaves the estimator as it is (fresh on a new optimizer)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(STATE_DICT_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        self._capture.reset()
        if saved is None:
            logger.info("AdaScale: loaded a base-optimizer state dict; the estimator state is unchanged")
            return
        self.load_estimator_state_dict(saved)

    def estimator_state_dict(self) -> dict[str, Any]:
        """AdaScale's own state, for checkpoints that carry it beside the base optimizer's
        (DeepSpeed's ``client_state``, a DCP ``Stateful``): the estimator's
        (:meth:`~adascale_shard.estimators.Estimator.state_dict`) and the ``config`` it ran with."""
        return {
            **self._estimator.state_dict(),
            "config": {
                "scale": self.config.scale,
                "smoothing": self.config.smoothing,
                "lr_scaling": self.config.lr_scaling,
                "min_relative_var": self.config.min_relative_var,
            },
        }

    def load_estimator_state_dict(self, saved: dict[str, Any]) -> None:
        """Load :meth:`estimator_state_dict`. The current ``scale`` and ``smoothing`` win over the
        saved ones: the averages describe the model and the base batch, not the scale, so an
        elastic resume at another scale carries them over unchanged."""
        self._estimator.load_state_dict(saved)
        self._capture.reset()
