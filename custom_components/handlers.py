"""Ignite handlers of the synthesis bundle."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events

from .losses import GradientPenalty

__all__ = ["GradientPenaltyHandler", "LossProgressBar", "every_n_iterations"]


class GradientPenaltyHandler:
    """Event hook that evaluates the WGAN-GP penalty (Eq. 2) of a critic and logs it.

    For engines that do not compute the penalty themselves (e.g. MONAI's ``AdversarialTrainer``) or to monitor
    Lipschitz-ness of a critic during training. It does not update any weights: the value is stored in
    ``engine.state.metrics[name]`` and logged every ``interval`` iterations.

    Args:
        critic: the critic whose input gradient is penalised.
        lambda_gp: penalty weight.
        output_transform: engine output -> (real, fake) image batches.
        name: key in ``engine.state.metrics`` and in the log.
        interval: evaluate every ``interval`` iterations.
        logger_name: logger to write to (``None``: this module's logger).
    """

    def __init__(self, critic: torch.nn.Module, lambda_gp: float = 10.0,
                 output_transform: Callable = lambda x: x, name: str = "gradient_penalty", interval: int = 1,
                 logger_name: str | None = None) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval!r}.")
        self.critic = critic
        self.penalty = GradientPenalty(lambda_gp)
        self.output_transform = output_transform
        self.name = name
        self.interval = interval
        self.logger = logging.getLogger(logger_name or __name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        real, fake = self.output_transform(engine.state.output)
        value = self.penalty(self.critic, real, fake).item()
        self.critic.zero_grad(set_to_none=True)
        engine.state.metrics[self.name] = value
        self.logger.info("iteration %d: %s = %.6g", engine.state.iteration, self.name, value)


def every_n_iterations(n: int) -> Callable[[Engine, int], bool]:
    """Event filter for MONAI ``StatsHandler(iteration_log=...)``: log every ``n``-th iteration."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}.")
    return lambda engine, event: event % n == 0


class LossProgressBar:
    """ignite ``ProgressBar`` attachable from a MONAI handler list, showing ``output_transform``'s values.

    MONAI calls ``handler.attach(engine)``; ignite's ``ProgressBar.attach`` takes the output transform as an
    argument of ``attach``, so this wrapper stores it.
    """

    def __init__(self, output_transform: Callable | None = None, persist: bool = False, **kwargs) -> None:
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=persist, **kwargs)
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self.output_transform)
