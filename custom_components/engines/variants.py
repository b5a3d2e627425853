"""What each model variant of the paper's comparison trains and uses (section 3.1-3.2), as one table.

Configs skip building the networks a variant does not use (``$not custom_components.uses_global_critic(@variant)``),
the trainer refuses them, and the schedules check the phases a variant has; all read :data:`VARIANTS`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple

from ..config.hyperparameters import TrainingOptions, Variant
from ..losses.synthesis import AttentionSource

__all__ = [
    "VARIANTS", "VariantSpec", "all_variants", "uses_attention", "uses_global_critic", "uses_local_discriminator",
    "variant_spec",
]


class VariantSpec(NamedTuple):
    """The parts of the method a variant trains and applies."""

    global_critic: bool  # trains the global critic D1 (Eq. 2) and adds L_ADV1 to G's loss (Eq. 3)
    local_discriminator: bool  # trains the local discriminator D2 (Eq. 4) and adds L_ADV2 (Eq. 5)
    attention: bool  # weights the voxel loss by a difficulty map F (Eq. 6) once the attention phase has begun
    attention_source: AttentionSource | None = None  # the map F comes from, whatever the option says (None: the option)


#: every :class:`Variant`, in the enum's order (``unet``, the reference, first)
VARIANTS = MappingProxyType({
    Variant.UNET: VariantSpec(global_critic=False, local_discriminator=False, attention=False),
    Variant.GLOBAL: VariantSpec(global_critic=True, local_discriminator=False, attention=False),  # sGAN-1
    Variant.LOCAL: VariantSpec(global_critic=False, local_discriminator=True, attention=False),  # sGAN-2
    Variant.DUAL: VariantSpec(global_critic=True, local_discriminator=True, attention=False),  # sGAN-dual
    Variant.DUAL_ATTENTION: VariantSpec(global_critic=True, local_discriminator=True, attention=True),  # the method
    # beyond the paper: G alone, F from the error |Y - G(X)| known at training time (a focal-style L1 baseline)
    Variant.ERROR_WEIGHTED: VariantSpec(global_critic=False, local_discriminator=False, attention=True,
                                        attention_source=AttentionSource.ERROR),
})


def variant_spec(variant: Variant | str) -> VariantSpec:
    """The :class:`VariantSpec` of ``variant`` (a ``ValueError`` naming the choices for an unknown name)."""
    return VARIANTS[TrainingOptions.check("variant", variant)]


def all_variants() -> list[str]:
    """The names of every :class:`Variant`, in the enum's order (``unet``, the reference, first)."""
    return [v.value for v in VARIANTS]


def uses_global_critic(variant: Variant | str) -> bool:
    """Whether ``variant`` trains the global critic D1 (used by configs to skip building it)."""
    return variant_spec(variant).global_critic


def uses_local_discriminator(variant: Variant | str) -> bool:
    """Whether ``variant`` trains the local discriminator D2 (used by configs to skip building it)."""
    return variant_spec(variant).local_discriminator


def uses_attention(variant: Variant | str) -> bool:
    """Whether ``variant`` weights the voxel loss by a difficulty map F (after the schedule's attention start)."""
    return variant_spec(variant).attention
