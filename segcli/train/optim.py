"""Optimizers (`--optimizer`) and learning-rate schedules (`--scheduler`).

`build_optimizer` puts weights in a decayed group and biases and normalisation parameters in an
undecayed one. `build_scheduler` returns an `LRSchedule` that owns the learning rate of every
group: the engine calls `step_iteration()` after every optimizer step and `step_epoch(val_miou)`
after each epoch's validation. Per-iteration schedules (poly, cosine, warm-up) therefore move
every iteration, epoch schedules (step, plateau) once per epoch. The state is plain numbers so it
can be stored as JSON.

The learning rate of iteration i (0-based, the lr used by optimizer step i + 1) is

    lr(i) = warmup(i) * schedule(i)
    warmup(i) = (i + 1) / W for i < W, else 1            W = round(warmup_epochs * steps_per_epoch)
    poly:    min_lr + (lr - min_lr) * (1 - t) ** power
    cosine:  min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2
    t = t0 + (1 - t0) * (i - i0) / (T - i0) clamped to [t0, 1]    T = epochs * steps_per_epoch
    step:    max(min_lr, lr * gamma ** (epochs_done // step_size))
    plateau: max(min_lr, lr * gamma ** reductions), one reduction each time val mIoU has not
             improved (relative threshold 1e-4) for more than `patience` epochs, as torch's
             ReduceLROnPlateau(mode="max")
    none:    lr

so poly and cosine decay over the iterations after warm-up and reach min_lr once all T are done
(the same curves as torch's PolynomialLR and CosineAnnealingLR stepped per iteration). The anchor
(i0, t0) is (W, 0) until `plan_epochs` moves the end (a time limit re-plans after every epoch,
a resume may raise `epochs`): it then becomes (the current iteration, its t), so the lr carries
on from where it is and only the rest of the curve is stretched or squeezed, without a jump.
Only a curve that has already reached min_lr and gets more epochs goes back to (W, 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segcli.errors import UsageError

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS: tuple[str, ...] = ("step", "poly", "cosine", "plateau", "none")

_NORM_LAYERS = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two groups: `decay` (weights) and `no_decay` (biases and norm-layer parameters). Frozen
    parameters are included so that unfreezing later needs no new optimizer; they have no
    gradient while frozen, and the optimizers skip them."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # tied parameters belong to one group only
                continue
            seen.add(id(parameter))
            is_bias = name.endswith("bias") or parameter.ndim <= 1
            (no_decay if is_bias or isinstance(module, _NORM_LAYERS) else decay).append(parameter)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """sgd (with `momentum`, optionally Nesterov), adam, adamw, or rmsprop (with `momentum`).
    Weight decay skips biases and normalisation layers."""
    if name not in OPTIMIZERS:
        raise UsageError(f"`optimizer`: unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise UsageError(f"`lr` must be > 0, got {lr}")
    if weight_decay < 0:
        raise UsageError(f"`weight_decay` must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise UsageError(f"`momentum` must be in [0, 1), got {momentum}")
    if nesterov and (name != "sgd" or momentum == 0):
        raise UsageError("`nesterov` applies to `optimizer` sgd with `momentum` > 0 only")
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        return _fused(torch.optim.SGD, groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return _fused(torch.optim.Adam, groups, lr=lr)
    if name == "adamw":
        return _fused(torch.optim.AdamW, groups, lr=lr)
    return torch.optim.RMSprop(groups, lr=lr, momentum=momentum)


def _fused(
    optimizer: type[torch.optim.Optimizer], groups: list[dict[str, object]], **options: object
) -> torch.optim.Optimizer:
    """The fused (one kernel for all parameters) form where this torch and device have it: on
    CPU the default per-parameter AdamW step took about 10% of a ResUNet18 training step, fused
    about 2% (same update; `tests/test_optim.py` compares them)."""
    try:
        return optimizer(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return optimizer(groups, **options)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, then each per-parameter tensor laid out like its
    parameter: the saved moments are contiguous, and fused kernels read moments and
    channels_last parameters element by element in memory order, so a layout mismatch would
    pair the wrong elements (a resumed run would silently diverge)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                    optimizer.state[parameter][key] = torch.empty_like(parameter).copy_(value)


class LRSchedule:
    """Sets every param group's lr from the iteration and epoch counters (formulas in the module
    docstring). Construction already applies the lr of iteration 0."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        *,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float,
        step_size: int,
        gamma: float,
        power: float,
        min_lr: float,
        patience: int,
    ) -> None:
        self.optimizer = optimizer
        self.name = name
        self.steps_per_epoch = steps_per_epoch
        self.total_iterations = epochs * steps_per_epoch
        self.warmup_iterations = round(warmup_epochs * steps_per_epoch)
        self.step_size = step_size
        self.gamma = gamma
        self.power = power
        self.min_lr = min_lr
        self.patience = patience
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.iteration = 0
        self.epoch = 0
        self.anchor_iteration = self.warmup_iterations
        self.anchor_progress = 0.0
        self.reductions = 0  # plateau: how many times the lr was multiplied by gamma
        self.best: float | None = None
        self.bad_epochs = 0
        self._apply()

    def step_iteration(self) -> None:
        """Call after every optimizer step."""
        self.iteration += 1
        self._apply()

    def plan_epochs(self, epochs: int) -> None:
        """Re-plan poly/cosine to end after `epochs` epochs (a time limit decides how many fit):
        from the current iteration on, the rest of the curve is stretched or squeezed to the new
        end, starting from the current lr. A curve that has already ended and gets more epochs
        goes on with the tail of one curve over all of them (a low lr falling to min_lr)."""
        total = epochs * self.steps_per_epoch
        if self.annealed and total > self.total_iterations:
            # Stretching a finished curve would leave every new step at min_lr, which cannot
            # learn: follow the last stretch of one curve over the whole new length instead.
            self.anchor_iteration, self.anchor_progress = self.warmup_iterations, 0.0
        elif self.iteration > self.anchor_iteration:
            self.anchor_progress = self.progress()
            self.anchor_iteration = self.iteration
        self.total_iterations = total
        self._apply()

    def progress(self) -> float:
        """t of the module docstring's formulas at the current iteration: 0 until warm-up ends,
        1 once poly/cosine have reached min_lr."""
        done = self.iteration - self.anchor_iteration
        if done <= 0:
            return self.anchor_progress
        span = max(1, self.total_iterations - self.anchor_iteration)
        return min(1.0, self.anchor_progress + (1 - self.anchor_progress) * done / span)

    @property
    def annealed(self) -> bool:
        """True once a poly/cosine schedule has reached its end (min_lr)."""
        return self.name in ("poly", "cosine") and self.progress() >= 1.0

    def step_epoch(self, val_miou: float | None = None) -> None:
        """Call after each epoch (and its validation, if any). NaN or None mIoU leaves the
        plateau state alone."""
        self.epoch += 1
        if self.name == "plateau" and val_miou is not None and not math.isnan(val_miou):
            if self.best is None or val_miou > self.best * (1 + 1e-4):
                self.best = val_miou
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.patience:
                    self.reductions += 1
                    self.bad_epochs = 0
        self._apply()

    def lr_at(self, base_lr: float) -> float:
        """The lr for the current counters of a group whose peak lr is `base_lr`."""
        i = self.iteration
        warmup = (i + 1) / self.warmup_iterations if i < self.warmup_iterations else 1.0
        if self.name in ("poly", "cosine"):
            t = self.progress()
            shape = (
                (1 - t) ** self.power if self.name == "poly" else (1 + math.cos(math.pi * t)) / 2
            )
            return warmup * (self.min_lr + (base_lr - self.min_lr) * shape)
        if self.name == "step":
            scaled = base_lr * self.gamma ** (self.epoch // self.step_size)
        elif self.name == "plateau":
            scaled = base_lr * self.gamma**self.reductions
        else:
            scaled = base_lr
        return warmup * max(self.min_lr, scaled)

    def _apply(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = self.lr_at(base_lr)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, object]:
        """JSON-serialisable: the counters, plateau state and peak lrs."""
        return {
            "name": self.name,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "total_iterations": self.total_iterations,
            "anchor_iteration": self.anchor_iteration,
            "anchor_progress": self.anchor_progress,
            "base_lrs": list(self.base_lrs),
            "reductions": self.reductions,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise UsageError(
                f"`scheduler` {self.name} cannot resume a run trained with '{state.get('name')}'"
            )
        base_lrs = [float(lr) for lr in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise UsageError("the saved schedule does not match the optimizer's parameter groups")
        self.base_lrs = base_lrs
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        # States saved before the anchor existed had neither key: their curve ran from (W, 0)
        # to the end of the epochs they were built with.
        self.total_iterations = int(state.get("total_iterations", self.total_iterations))
        self.anchor_iteration = int(state.get("anchor_iteration", self.warmup_iterations))
        self.anchor_progress = float(state.get("anchor_progress", 0.0))
        self.reductions = int(state["reductions"])
        best = state["best"]
        self.best = None if best is None else float(best)
        self.bad_epochs = int(state["bad_epochs"])
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    step_size: int = 30,
    gamma: float = 0.1,
    power: float = 0.9,
    min_lr: float = 0.0,
    patience: int = 5,
) -> LRSchedule:
    """The schedule for `--scheduler name`; the optimizer's current lr is the peak lr."""
    if name not in SCHEDULERS:
        raise UsageError(f"`scheduler`: unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    if epochs < 1 or steps_per_epoch < 1:
        raise UsageError(
            f"need epochs >= 1 and steps per epoch >= 1, got {epochs}, {steps_per_epoch}"
        )
    if warmup_epochs < 0:
        raise UsageError(f"`warmup_epochs` must be >= 0, got {warmup_epochs}")
    if step_size < 1:
        raise UsageError(f"`step_size` must be >= 1, got {step_size}")
    if not 0 < gamma <= 1:
        raise UsageError(f"`gamma` must be in (0, 1], got {gamma}")
    if not power > 0:
        raise UsageError(f"`power` must be positive, not {power}")
    if min_lr < 0:
        raise UsageError(f"`min_lr` must not be negative, not {min_lr}")
    if patience < 0:
        raise UsageError(f"plateau patience must not be negative, not {patience}")
    return LRSchedule(
        optimizer,
        name,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=warmup_epochs,
        step_size=step_size,
        gamma=gamma,
        power=power,
        min_lr=min_lr,
        patience=patience,
    )
