"""The variant table: what each model variant of the paper's comparison trains and uses."""

from __future__ import annotations

import pytest

from custom_components.config.hyperparameters import Variant
from custom_components.losses.synthesis import AttentionSource
from custom_components.engines.variants import VARIANTS, uses_attention, variant_spec


def test_the_table_has_one_row_per_variant_in_the_enums_order():
    assert list(VARIANTS) == list(Variant)
    with pytest.raises(TypeError):
        VARIANTS[Variant.UNET] = VARIANTS[Variant.DUAL]  # read-only: a config cannot change what a variant is


WITH_ATTENTION = (Variant.DUAL_ATTENTION, Variant.ERROR_WEIGHTED)


@pytest.mark.parametrize("variant,attention", [(v, v in WITH_ATTENTION) for v in Variant])
def test_attention_is_the_full_method_and_the_error_weighted_baseline(variant, attention):
    assert uses_attention(variant) == uses_attention(variant.value) == attention


def test_only_the_error_weighted_baseline_fixes_its_attention_source():
    assert {v for v, spec in VARIANTS.items() if spec.attention_source} == {Variant.ERROR_WEIGHTED}
    assert variant_spec("error_weighted").attention_source is AttentionSource.ERROR
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_spec("triple")
