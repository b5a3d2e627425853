"""Training schedules: the phases of a run as fractions of it, and learning rates and validations that survive a resume."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events
from monai.utils import StrEnum
from torch.optim import Optimizer

from ..config.hyperparameters import Variant
from .variants import uses_attention, uses_global_critic, uses_local_discriminator

__all__ = ["DelayedValidationHandler", "IterationLrSchedule", "LrSchedule", "PhaseSchedule", "iterations_per_epoch"]


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

    def __init__(self, optimizers: Sequence[Optimizer | None], schedule: LrSchedule | str,
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
    The bundle sets ``start_iteration`` from :class:`PhaseSchedule` (``selection_begins_after``: 0 for ``unet``, the
    attention start for the variants with attention, ``error_weighted`` included, which has no discriminator), and
    the schedule refuses a run in which no validation would come after it. Used on its own, a run that ends at or
    before ``start_iteration`` validates from the first interval, so that it still saves a model.

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
        """``start_iteration``, or 0 when the run ends before it (see the class docstring)."""
        total = (engine.state.max_epochs or 0) * (engine.state.epoch_length or 0)
        return 0 if total <= self.start_iteration else self.start_iteration

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval == 0 and engine.state.iteration > self.effective_start(engine):
            self.validator.run(engine.state.epoch)


def iterations_per_epoch(n_subjects: int, batch_size: int, world_size: int = 1) -> int:
    """Iterations of one training epoch: ``ceil(ceil(n_subjects / world_size) / batch_size)``.

    One loader item is one subject (its ``samples_per_volume`` patches come together), so an epoch has as many
    batches as the subjects a rank sees divided by the batch size, rounded up (the loader keeps the last, partial
    batch). With several ranks, MONAI's ``DistributedSampler`` gives each ``ceil(n_subjects / world_size)`` subjects.
    """
    for name, value in (("n_subjects", n_subjects), ("batch_size", batch_size), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return math.ceil(math.ceil(n_subjects / world_size) / batch_size)


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction of the run in [0, 1], got {value!r}.")
    return float(value)


def _count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer number of iterations >= 0 (or null), got {value!r}.")
    return value


class PhaseSchedule:
    """When each phase of a run begins, set as fractions of the run and resolved for the data set at hand.

    A run has up to three phases: plain L1/L2 (G alone), adversarial (the discriminators train and give their terms)
    and, for variants with attention, attention (F weights the voxel loss). Counted in iterations, a phase length
    tuned to one data set is wrong on another (an epoch has ``iterations_per_epoch`` iterations, which follow the
    number of training subjects), so the phases are set as fractions of the run's ``epochs * iterations_per_epoch``
    iterations; explicit iteration counts (``adversarial_iterations``, ``attention_iterations``) still override them.

    The schedule is checked when it is built (the bundle builds it in ``initialize``, before any data is cached): a
    run whose adversarial phase or attention would never begin, or in which no validation falls after the model
    selection starts (so no ``model.pt`` would be written), is refused with the numbers. :meth:`describe` says when
    each phase begins, in iterations and epochs; :meth:`attach` logs it and checks, when the trainer starts, that the
    trainer's epoch really has ``iterations_per_epoch`` iterations.

    Args:
        epochs: epochs of the run.
        iterations_per_epoch: iterations per epoch (:func:`iterations_per_epoch`).
        variant: the trainer's variant; decides which phases exist.
        adversarial_start: fraction of the run trained with the plain voxel loss before the discriminators start.
        attention_start: fraction of the run after which the attention weights the voxel loss (>= adversarial_start).
        adversarial_iterations: if set, the plain phase in iterations (overrides ``adversarial_start``).
        attention_iterations: if set, iterations from the adversarial start to the attention start (overrides
            ``attention_start``).
        val_interval: validation every ``val_interval`` epochs.
        select_after_warmup: validations (model-selection candidates) only once the variant's last phase has begun,
            so ``model.pt`` is a model of the method being trained; ``False``: from the first validation.
        logger_name: logger of :meth:`attach`.
    """

    def __init__(self, epochs: int, iterations_per_epoch: int, variant: str, *, adversarial_start: float,
                 attention_start: float, adversarial_iterations: int | None = None,
                 attention_iterations: int | None = None, val_interval: int = 1, select_after_warmup: bool,
                 logger_name: str = "training") -> None:
        for name, value in (("epochs", epochs), ("iterations_per_epoch", iterations_per_epoch),
                            ("val_interval", val_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        self.variant = Variant(variant)
        self.epochs, self.epoch_length, self.val_interval = epochs, iterations_per_epoch, val_interval
        self.total = epochs * iterations_per_epoch
        self.has_adversarial = uses_global_critic(self.variant) or uses_local_discriminator(self.variant)
        self.has_attention = uses_attention(self.variant)
        self.adversarial_start, self.attention_start = _fraction("adversarial_start", adversarial_start), \
            _fraction("attention_start", attention_start)
        adv_it, att_it = _count("adversarial_warmup", adversarial_iterations), \
            _count("attention_warmup", attention_iterations)
        if att_it is None and self.has_attention and self.attention_start < self.adversarial_start:
            raise ValueError(f"attention_start ({attention_start}) must be >= adversarial_start ({adversarial_start}): "
                             "the attention starts after (or with) the discriminators.")
        self.select_after_warmup = bool(select_after_warmup)
        self.logger_name = logger_name
        #: plain-loss iterations before the adversarial phase (the trainer's ``adversarial_warmup``)
        self.adversarial_warmup = adv_it if adv_it is not None else math.floor(self.adversarial_start * self.total + 1e-9)
        start_att = math.floor(self.attention_start * self.total + 1e-9)  # 0.82 * 600 is 491.99...9 in floats
        #: iterations from the adversarial start to the attention start (the trainer's ``attention_warmup``)
        self.attention_warmup = att_it if att_it is not None else max(0, start_att - self.adversarial_warmup)
        self.check()

    # phase boundaries: the last iteration (1-based, as ignite counts) *before* each phase
    @property
    def attention_begins_after(self) -> int:
        return self.adversarial_warmup + self.attention_warmup

    @property
    def selection_begins_after(self) -> int:
        """Validations at iterations after this one are model-selection candidates."""
        if not self.select_after_warmup:
            return 0
        if self.has_attention:
            return self.attention_begins_after
        return self.adversarial_warmup if self.has_adversarial else 0

    def epoch_of(self, iteration: int) -> int:
        """The epoch (1-based) holding ``iteration`` (1-based)."""
        return max(1, math.ceil(iteration / self.epoch_length))

    def _numbers(self) -> str:
        return (f"the run has {self.epochs} epochs x {self.epoch_length} iterations = {self.total} iterations "
                f"(iterations per epoch follow the training subjects / batch size)")

    def check(self) -> None:
        """Raise a ``ValueError`` with the numbers if a phase would never begin or nothing could be selected."""
        hint = ("lower adversarial_start / attention_start (fractions of the run), give more epochs, or use a "
                "smaller batch_size")
        if self.has_adversarial and self.adversarial_warmup >= self.total:
            raise ValueError(f"variant {self.variant.value!r}: the discriminators would never train: the plain-loss "
                             f"phase lasts {self.adversarial_warmup} iterations and {self._numbers()}; {hint}.")
        if self.has_attention and self.attention_begins_after >= self.total:
            raise ValueError(f"variant {self.variant.value!r}: the attention would never start: it begins after "
                             f"iteration {self.attention_begins_after} and {self._numbers()}; {hint}.")
        last_val = (self.epochs // self.val_interval) * self.val_interval
        if last_val == 0 or last_val * self.epoch_length <= self.selection_begins_after:
            raise ValueError(
                f"variant {self.variant.value!r}: no validation would select a model: model selection starts after "
                f"iteration {self.selection_begins_after} (epoch {self.epoch_of(self.selection_begins_after + 1)}), "
                f"validation runs every {self.val_interval} epochs and {self._numbers()}, the last validation at "
                f"epoch {last_val}; {hint}, or a smaller val_interval."
            )

    def describe(self) -> str:
        """One line per phase: when it begins, in iterations and epochs."""
        lines = [f"schedule: {self._numbers()}"]
        plain_end = self.attention_begins_after if not self.has_adversarial else self.adversarial_warmup
        if plain_end > 0:
            lines.append(f"  plain voxel loss: iterations 1-{plain_end} (epochs 1-{self.epoch_of(plain_end)})")
        if self.has_adversarial:
            it = self.adversarial_warmup + 1
            lines.append(f"  discriminators: from iteration {it} (epoch {self.epoch_of(it)})")
        if self.has_attention:
            it = self.attention_begins_after + 1
            lines.append(f"  attention: from iteration {it} (epoch {self.epoch_of(it)})")
        it = self.selection_begins_after + 1
        first_val = next(e for e in range(self.val_interval, self.epochs + 1, self.val_interval)
                         if e * self.epoch_length > self.selection_begins_after)
        lines.append(f"  model selection: validations from epoch {first_val} (every {self.val_interval} epochs)")
        return "\n".join(lines)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        import logging

        if engine.state.epoch_length != self.epoch_length or engine.state.max_epochs != self.epochs:
            raise ValueError(
                f"the trainer runs {engine.state.max_epochs} epochs x {engine.state.epoch_length} iterations, but the "
                f"schedule was resolved for {self.epochs} x {self.epoch_length}: build PhaseSchedule from the same "
                "epochs, training subjects, batch size and world size as the trainer's loader."
            )
        logging.getLogger(self.logger_name).info(self.describe())


def check_selection_metric(name: str, key_metric: dict, additional_metrics: dict | None = None) -> str:
    """Refuse a model-selection metric the evaluator does not compute, or one for which lower is better.

    ``model.pt`` keeps the validation with the highest ``name``; the candidates are the evaluator's metric names
    (e.g. ``val_psnr``, ``val_psnr_tumour``, ``val_ssim``). Errors (``*_mae*``) and the confidence map's QA numbers
    (``val_qa*``) are not selection criteria for the generator.
    """
    names = [n for n in list(key_metric or {}) + list(additional_metrics or {})
             if "mae" not in n and not n.startswith("val_qa")]
    if name not in names:
        raise ValueError(f"selection_metric must be one of {names} (higher is better), got {name!r}.")
    return name
