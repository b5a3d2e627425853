"""Components of the dual-attention synthesis bundle that MONAI does not provide."""

from __future__ import annotations

from .losses import AttentionNorm, DifficultyAwareLoss, GradientPenalty, attention_weight, confidence_map
from .networks import GlobalCritic, LocalDiscriminator
from .trainer import (
    DualAttentionKeys,
    DualAttentionTrainer,
    Variant,
    image_panels,
    scalar_outputs,
    uses_global_critic,
    uses_local_discriminator,
    validate_hyperparameters,
)

__version__ = "0.1.0"
