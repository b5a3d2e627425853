"""Learning-rate schedules that survive a resume: the rate is a function of the engine's iteration only."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ignite.engine import Engine, Events
from monai.utils import StrEnum
from torch.optim import Optimizer

__all__ = ["DelayedValidationHandler", "IterationLrSchedule", "LrSchedule"]


class LrSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"  # base_lr * (min_factor + (1 - min_factor) * (1 + cos(pi * t)) / 2), t from 0 to 1


class IterationLrSchedule:
    """Set the learning rate of ``optimizers`` before every iteration from ``engine.state.iteration``.

    The schedule runs from ``start`` (an iteration count, e.g. the end of an adversarial warm-up) to the engine's last
    iteration. Because nothing but the iteration (restored by a checkpoint) enters the rate, a resumed run continues
    the same curve, which a stateful ``torch.optim.lr_scheduler`` would only do if it were checkpointed too.

    Args:
        optimizers: optimizers whose every parameter group is scheduled (``None`` entries are skipped).
        schedule: ``"constant"`` (no change) or ``"cosine"``.
        start: iterations before the schedule starts (the rate stays at its base value until then).
        min_factor: final rate as a fraction of the base rate.
    """

    def __init__(self, optimizers: Sequence[Optimizer | None], schedule: LrSchedule | str = LrSchedule.COSINE,
                 start: int = 0, min_factor: float = 0.0) -> None:
        self.schedule = LrSchedule(schedule)
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor!r}.")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start!r}.")
        self.optimizers = [o for o in optimizers if o is not None]
        self.base = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.start, self.min_factor = int(start), float(min_factor)

    def factor(self, iteration: int, total: int) -> float:
        """Rate multiplier before iteration ``iteration + 1`` of ``total``."""
        if self.schedule == LrSchedule.CONSTANT or iteration < self.start or total <= self.start:
            return 1.0
        t = min(1.0, (iteration - self.start) / max(1, total - self.start))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        total = engine.state.max_epochs * engine.state.epoch_length
        f = self.factor(engine.state.iteration - 1, total)  # ignite counts the coming iteration already (1-based)
        for opt, base in zip(self.optimizers, self.base):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * f


class DelayedValidationHandler:
    """Run ``validator`` every ``interval`` epochs, but only once the trainer is past ``start_iteration``.

    With an adversarial warm-up, the generator of the warm-up is a plain UNet: validating (and saving the best
    model) only afterwards makes sure ``model.pt`` comes from the adversarial phase of the method being trained.
    The delay is dropped (validation from the first interval) when there is no adversarial phase to wait for: a
    run that ends at or before ``start_iteration`` (e.g. ``--epochs 100`` with the default warm-up), and a trainer
    without discriminators (``variant: unet``). Otherwise such a run would never validate and never save a model.

    Args:
        validator: the evaluator (e.g. MONAI ``SupervisedEvaluator``).
        interval: validate every ``interval`` epochs (counted from epoch 0, as MONAI's ``ValidationHandler``).
        start_iteration: no validation while ``engine.state.iteration <= start_iteration``.
    """

    def __init__(self, validator: Engine, interval: int = 1, start_iteration: int = 0) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval!r}.")
        if start_iteration < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration!r}.")
        self.validator, self.interval, self.start_iteration = validator, int(interval), int(start_iteration)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def effective_start(self, engine: Engine) -> int:
        """``start_iteration``, or 0 when the run has no adversarial phase after it (see the class docstring)."""
        total = (engine.state.max_epochs or 0) * (engine.state.epoch_length or 0)
        no_discriminator = all(getattr(engine, n, object()) is None for n in ("global_critic", "local_discriminator"))
        return 0 if total <= self.start_iteration or no_discriminator else self.start_iteration

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval == 0 and engine.state.iteration > self.effective_start(engine):
            self.validator.run(engine.state.epoch)
