"""The events the trainer fires inside an iteration, the state its critic events share, and its output keys.

As MONAI's ``IterationEvents`` and ``AdversarialIterationEvents`` do for its engines, :class:`DualAttentionEvents`
names the points of one iteration of :class:`custom_components.engines.trainer.DualAttentionTrainer` (paper Fig. 2) that a
handler can hook: one event after each update of each network, and two inside each update of the global critic D1,
where a handler may add images to score and terms to the loss (the gradient penalty of Eq. 2 is such a handler,
:class:`custom_components.engines.penalty.GradientPenaltyHandler`).

This module stands below the trainer and the handlers: both import it, it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from ignite.engine import EventEnum
from monai.utils import StrEnum
from monai.utils.enums import CommonKeys

__all__ = ["CriticUpdate", "DualAttentionEvents", "DualAttentionKeys", "EVENT_TO_ATTR"]


class DualAttentionEvents(EventEnum):
    """Sub-step events of :class:`~custom_components.engines.trainer.DualAttentionTrainer`, fired in this order.

    When an event fires, the sub-step's values are on the engine's state: ``engine.state.critic_update`` (a
    :class:`CriticUpdate`) for the three critic events, and ``engine.state.step_output`` (the floats and tensors the
    sub-step reports, keyed by :class:`DualAttentionKeys`) after each update. The critic events count in
    ``engine.state.critic_steps`` (saved with the trainer's state), so ``CRITIC_COMPLETED(every=k)`` fires on every
    k-th critic update of the run, resumed runs included; the events of G and of the error head count in
    ``engine.state.iteration`` (one update each per iteration).
    """

    CRITIC_STARTED = "critic_started"  # an update of D1 begins: handlers may add images to critic_update.inputs
    CRITIC_LOSS_COMPLETED = "critic_loss_completed"  # L_D1 computed, before its backward: handlers may add terms
    CRITIC_COMPLETED = "critic_completed"  # D1 updated (n_critic times per iteration)
    LOCAL_DISCRIMINATOR_COMPLETED = "local_discriminator_completed"  # D2 updated (n_local times per iteration)
    ERROR_HEAD_COMPLETED = "error_head_completed"  # the error-prediction head updated
    GENERATOR_COMPLETED = "generator_completed"  # G updated (once per iteration)


#: the state attribute each event counts in (ignite's ``event_to_attr``, which ``every``/``once`` filters read)
EVENT_TO_ATTR = {
    DualAttentionEvents.CRITIC_STARTED: "critic_steps",
    DualAttentionEvents.CRITIC_LOSS_COMPLETED: "critic_steps",
    DualAttentionEvents.CRITIC_COMPLETED: "critic_steps",
    DualAttentionEvents.ERROR_HEAD_COMPLETED: "iteration",
    DualAttentionEvents.GENERATOR_COMPLETED: "iteration",
}


class DualAttentionKeys(StrEnum):
    """Keys of the trainer's per-iteration output dict (and of the evaluators', :mod:`custom_components.engines.evaluator`).
    Loss terms are plain floats; images are tensors.

    The images have the names the batch gives them (``source``, ``target``): the word ``label`` means one thing in the
    bundle, the tumour labels of the batch and the datalist, never the target image (as MONAI's ``CommonKeys.LABEL``
    would have it in an engine's output)."""

    LOSS = "loss"  # L_G, Eq. 7
    RECON = "loss_recon"  # L_AttG (Eq. 6), or plain L1/L2 (Eq. 1) without attention
    ADV_GLOBAL = "loss_adv_global"  # L_ADV1, Eq. 3
    ADV_LOCAL = "loss_adv_local"  # L_ADV2, Eq. 5
    GLOBAL_CRITIC = "loss_global_critic"  # L_D1, Eq. 2 (incl. the penalty)
    GP = "gradient_penalty"  # the penalty term of Eq. 2 (incl. lambda)
    WASSERSTEIN = "wasserstein"  # E[D1(Y)] - E[D1(G(X))]
    LOCAL_DISCRIMINATOR = "loss_local_discriminator"  # L_D2, Eq. 4
    ERROR_HEAD = "loss_error_head"  # L1 of the error-prediction head against the detached |Y - G(X)|
    CONFIDENCE_MEAN = "confidence_mean"  # mean of M over G(X)
    ATTENTION_MEAN = "attention_mean"  # mean of F actually applied (1 without attention)
    SOURCE = "source"  # source X
    TARGET = "target"  # target Y
    PRED = CommonKeys.PRED  # G(X)
    CONFIDENCE = "confidence"  # M


@dataclass
class CriticUpdate:
    """One update of the global critic D1 as its events see it (``engine.state.critic_update``).

    The trainer scores every image of ``inputs`` with the critic (real and fake first, then those handlers added at
    ``CRITIC_STARTED``), puts the scores in ``scores`` (same order, float32), sets ``loss`` to the Wasserstein part of
    Eq. 2, E[D1(G(X))] - E[D1(Y)], and fires ``CRITIC_LOSS_COMPLETED``, where handlers may add terms to ``loss`` and
    record them in ``terms`` (scalar tensors, reported as floats under their keys). ``loss`` is then checked and
    back-propagated, and D1 stepped.

    Args:
        real: the real images Y, shape (B, C, spatial).
        fake: the detached synthetic images G(X), same shape and dtype.
        scaler: the critic's ``torch.amp.GradScaler`` (enabled only with fp16), for handlers that differentiate.
    """

    real: torch.Tensor
    fake: torch.Tensor
    scaler: Any = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.real.shape != self.fake.shape:
            raise ValueError(f"real ({tuple(self.real.shape)}) and fake ({tuple(self.fake.shape)}) images must have "
                             "the same shape.")
        if not self.inputs:
            self.inputs = [self.real, self.fake]
