"""Components of the dual-attention synthesis bundle that MONAI does not provide."""

from __future__ import annotations

from .config.bundle_options import bundle_options
from .config.hyperparameters import TrainingOptions, Variant, as_flag
from .losses.synthesis import AttentionNorm, DifficultyAwareLoss, GradientPenalty, attention_weight, confidence_map
from .networks.nets import GlobalCritic, LocalDiscriminator
from .transforms.confidence import confidence_condition_key
from .engines.trainer import (
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
    "as_flag",
    "attention_weight",
    "bundle_options",
    "confidence_condition_key",
    "confidence_map",
    "uses_global_critic",
    "uses_local_discriminator",
    "validate_hyperparameters",
]  # the groups are left out: ``import *`` would load them all, the applications included

__version__ = "0.5.0"

# The groups, from the ground floor up (a module imports only from its group and the groups below it). A group loads
# on first attribute access, so a config expression such as ``$custom_components.utils.tracking.with_tracking(...)``
# works under any config overlay, whatever its ``imports`` list holds (an overlay's list replaces train.json's),
# without importing the applications and their optional dependencies up front.
_GROUPS = ("utils", "losses", "config", "networks", "transforms", "data", "inferers", "metrics", "engines", "handlers",
          "apps")
_SUBMODULES = frozenset(_GROUPS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
