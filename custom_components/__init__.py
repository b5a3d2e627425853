"""Components of the dual-attention synthesis bundle that MONAI does not provide."""

from __future__ import annotations

from .hyperparameters import TrainingOptions, Variant
from .losses import AttentionNorm, DifficultyAwareLoss, GradientPenalty, attention_weight, confidence_map
from .networks import GlobalCritic, LocalDiscriminator
from .trainer import (
    DualAttentionKeys,
    DualAttentionTrainer,
    all_variants,
    uses_global_critic,
    uses_local_discriminator,
    validate_hyperparameters,
)

__all__ = [
    "AttentionNorm",
    "DifficultyAwareLoss",
    "DualAttentionKeys",
    "DualAttentionTrainer",
    "GlobalCritic",
    "GradientPenalty",
    "LocalDiscriminator",
    "TrainingOptions",
    "Variant",
    "all_variants",
    "attention_weight",
    "confidence_map",
    "uses_global_critic",
    "uses_local_discriminator",
    "validate_hyperparameters",
]  # the sub-modules of _SUBMODULES are left out: ``import *`` would load them all, optional dependencies included

__version__ = "0.3.0"

# Sub-modules load on first attribute access, so a config expression such as
# ``$custom_components.tracking.with_tracking(...)`` works under any config overlay, whatever its ``imports`` list holds
# (an overlay's list replaces train.json's), without importing optional dependencies up front.
_SUBMODULES = frozenset({
    "caching", "checkpointing", "data", "distributed", "errors", "evaluation", "events", "gan_steps", "guards",
    "handlers", "hyperparameters", "inference", "inferers", "label_task", "layouts", "losses", "metrics", "networks",
    "options", "paths", "phantom", "phantom_dataset", "patches", "prepare", "preprocess", "readers", "runs",
    "schedules", "tracking", "trainer", "transforms", "variants", "weights",
})


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
