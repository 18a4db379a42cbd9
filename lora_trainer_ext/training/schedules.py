"""Learning-rate schedules: the guide's four and the XL trainer's linear, polynomial and rex, as multipliers
of the base learning rate per optimizer step, with the same shapes as diffusers' schedulers (which sd-scripts
uses) and, for rex, as the XL trainer's RexAnnealingWarmRestarts, so a LoRA trained here follows the curve users
know from the notebooks. (pytorch-optimizer's REXScheduler sets one rate for every parameter group, which
would erase the UNet / text-encoder split, and has no restarts: the rational curve is written here instead.)

The multiplier is a small picklable object rather than a closure, so `LambdaLR.state_dict()` holds
everything needed to resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LoraMakerError

if TYPE_CHECKING:  # the settings form reads SCHEDULERS without loading torch
    import torch

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial", "rex")
# Schedulers that ramp up first; plain "constant" ignores warmup, as in diffusers and the notebooks.
WARMUP_SCHEDULERS = ("constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial", "rex")
# The XL trainer's rex: each of the `cycles` restarts peaks at REX_GAMMA times the last, and decays along
# (1 - p) / ((1 - d) + d (1 - p)) with d = REX_D (its min_lr, 1e-9, is taken as 0).
REX_GAMMA = 0.9
REX_D = 0.9


def warmup_steps(total_steps: int, ratio: float) -> int:
    """Warmup length as the notebooks compute it: the whole part of total x ratio."""
    return int(total_steps * ratio)


@dataclass(frozen=True)
class LrMultiplier:
    """step -> factor of the base learning rate (LambdaLR calls it with the number of steps taken)."""

    name: str
    total_steps: int
    warmup_steps: int = 0
    cycles: int = 1
    power: float = 1.0  # polynomial's

    def __call__(self, step: int) -> float:
        if self.name == "rex":
            return self._rex(step)
        warmup = self.warmup_steps if self.name in WARMUP_SCHEDULERS else 0
        if step < warmup:  # linear ramp from 0; step 0 trains at lr 0, as in diffusers
            return step / warmup
        if self.name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        if self.name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
        if self.name in ("linear", "polynomial"):  # to 0 at the end (diffusers' polynomial ends at lr 1e-7)
            return max(0.0, 1.0 - progress) ** (self.power if self.name == "polynomial" else 1.0)
        # cosine_with_restarts: `cycles` full cosine cycles, each jumping back to 1 (hard restarts).
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1.0))))

    def _rex(self, step: int) -> float:
        """Restarts every ceil(total / cycles) steps, each with its own warmup (as the XL trainer's)."""
        length = -(-self.total_steps // self.cycles)
        cycle, at = divmod(step, length)
        peak = REX_GAMMA**cycle
        warmup = min(self.warmup_steps, length - 1)
        if at < warmup:
            return peak * at / warmup
        progress = (at - warmup) / (length - warmup)
        return peak * (1.0 - progress) / ((1.0 - REX_D) + REX_D * (1.0 - progress))


def lr_lambda(name: str, total_steps: int, warmup_steps: int = 0, cycles: int = 1, power: float = 1.0) -> LrMultiplier:
    """The multiplier function of schedule `name` (one of SCHEDULERS)."""
    if name not in SCHEDULERS:
        raise LoraMakerError(f"unknown lr_scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    if total_steps < 1:
        raise LoraMakerError(f"a schedule needs at least 1 step, got {total_steps}")
    if warmup_steps < 0 or cycles < 1 or power <= 0:
        raise LoraMakerError(f"warmup steps must be >= 0, cycles >= 1 and power above 0 (got {warmup_steps}, {cycles}, "
                             f"{power})")
    return LrMultiplier(name, total_steps, warmup_steps, cycles, power)


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0, cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over every parameter group (each group keeps its own base lr: UNet and text
    encoder). Call `.step()` after each optimizer step; resume with `.load_state_dict()`."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, total_steps, warmup_steps, cycles, power))
