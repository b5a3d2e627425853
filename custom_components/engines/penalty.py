"""The WGAN-GP gradient penalty (Eq. 2) as a handler of the trainer's critic events; the trainer attaches it."""

from __future__ import annotations

from ignite.engine import Engine

from .events import CriticUpdate, DualAttentionEvents, DualAttentionKeys
from ..losses.synthesis import GradientPenalty

__all__ = ["GradientPenaltyHandler"]


class GradientPenaltyHandler:
    """The gradient penalty of WGAN-GP (Eq. 2; Gulrajani et al. 2017), added by events to the critic's loss.

    Attached to an engine firing :class:`~custom_components.engines.events.DualAttentionEvents` (the trainer attaches one
    itself whenever it trains a global critic), it adds ``lambda_gp * interval * mean (||grad D1(X_hat)||_2 - 1)^2``
    to the loss of every ``interval``-th critic update, counted in ``engine.state.critic_steps``: at
    ``CRITIC_STARTED`` it adds the interpolates X_hat = a Y + (1 - a) G(X) (a ~ U(0, 1) per sample) to the images
    the update scores, so that the critic sees real, fake and interpolated images in one forward pass; at
    ``CRITIC_LOSS_COMPLETED`` it adds the penalty of their scores to the loss, in the same backward pass and the same
    update as the Wasserstein term. With ``interval`` 1 this is Eq. 2 exactly; with k > 1 it is the lazy
    regularisation of StyleGAN2 (Karras et al. 2020, section 3.1), here folded into every k-th critic update with
    weight k instead of run as an update of its own. The penalty (incl. lambda, without the factor k) is reported
    under ``DualAttentionKeys.GP``.

    Args:
        lambda_gp: penalty weight lambda (10 in the WGAN-GP paper), >= 0.
        interval: add the penalty every ``interval`` critic updates, weighted by ``interval``; >= 1.
    """

    def __init__(self, lambda_gp: float = 10.0, interval: int = 1) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}.")
        self.penalty = GradientPenalty(lambda_gp)
        self.interval = interval
        self._slot: int | None = None  # where the interpolates stand among the inputs of the current update

    @property
    def lambda_gp(self) -> float:
        return self.penalty.lambda_gp

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(DualAttentionEvents.CRITIC_STARTED(every=self.interval), self.add_interpolates)
        engine.add_event_handler(DualAttentionEvents.CRITIC_LOSS_COMPLETED(every=self.interval), self.add_penalty)

    def add_interpolates(self, engine: Engine) -> None:
        update: CriticUpdate = engine.state.critic_update
        self._slot = len(update.inputs)
        update.inputs.append(self.penalty.interpolate(update.real, update.fake))

    def add_penalty(self, engine: Engine) -> None:
        update: CriticUpdate = engine.state.critic_update
        if self._slot is None or self._slot >= len(update.scores):
            raise RuntimeError("CRITIC_LOSS_COMPLETED fired for an update this handler added no interpolates to: "
                               "the engine must fire CRITIC_STARTED before the critic's forward pass.")
        slot, self._slot = self._slot, None
        gp = self.penalty.penalty(update.scores[slot], update.inputs[slot], update.scaler)
        update.loss = update.loss + self.interval * gp
        update.terms[DualAttentionKeys.GP] = gp
