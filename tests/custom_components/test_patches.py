"""FusedPatchd gives the patches of the chain it replaces (crop, squeeze, flip), from the same random states."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Compose, EnsureTyped, RandFlipd, SqueezeDimd

from custom_components.transforms.patches import FusedPatchd
from custom_components.transforms.dictionary import RandTableWeightedCropd, SamplingTabled, SamplingWeightd, UntrackedCompose


def _item(shape=(24, 20, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, *shape)
    mask[:, 3:20, 2:17, 1:8] = 1
    label = (torch.rand(1, *shape, generator=g) > 0.9).float() * mask
    src = torch.rand(1, *shape, generator=g)
    return {"source": src, "target": src * 2 + 1, "mask": mask, "label": label, "subject": "s0"}


def _prepared(size, keep_weight=False, seed=0):
    d = _item(seed=seed)
    for t in (SamplingWeightd(tumour_weight=3.0), SamplingTabled(spatial_size=size, keep_weight=keep_weight),
              EnsureTyped(["source", "target"], track_meta=False)):
        d = t(d)
    return d


def _old(keys, size, squeeze, n=4):
    chain = [RandTableWeightedCropd(keys, "sampling_weight", size, num_samples=n)]
    if squeeze:
        chain.append(SqueezeDimd(keys, dim=3))
    chain.append(RandFlipd(keys, prob=0.5, spatial_axis=0))
    return UntrackedCompose(chain)


@pytest.mark.parametrize("size, squeeze, keep_weight", [((8, 8, 1), True, False), ((6, 5, 4), False, False),
                                                        ((8, 8, 1), True, True)])
def test_the_patches_equal_those_of_the_crop_squeeze_flip_chain(size, squeeze, keep_weight):
    keys = ["source", "target"]
    old, new = _old(keys, size, squeeze), FusedPatchd(keys, "sampling_weight", size, num_samples=4,
                                                      squeeze_dim=3 if squeeze else None)
    old.set_random_state(seed=11), new.set_random_state(seed=11)
    for i in range(12):
        d = _prepared(size, keep_weight, seed=i % 3)
        a, b = old(dict(d)), new(dict(d))
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            assert set(x) == set(y) and y["subject"] == "s0" and "sampling_table" not in y
            for k in keys:
                assert type(y[k]) is torch.Tensor
                torch.testing.assert_close(torch.as_tensor(x[k]), y[k], rtol=0, atol=0)  # 48 patches, flips included


def test_inside_the_bundle_pipeline_it_gives_the_old_pipeline_s_patches():
    """Same seed through a whole Compose (as CacheDataset and the loader seed it)."""
    keys, size = ["source", "target"], (8, 8, 1)
    prep = [SamplingWeightd(tumour_weight=3.0), SamplingTabled(spatial_size=size),
            EnsureTyped(keys, track_meta=False)]
    old = Compose(prep + [_old(keys, size, squeeze=True)])
    new = Compose(prep + [FusedPatchd(keys, "sampling_weight", size, num_samples=4, squeeze_dim=3)])
    old.set_random_state(seed=3), new.set_random_state(seed=3)
    for i in range(5):
        for x, y in zip(old(_item(seed=i)), new(_item(seed=i))):
            torch.testing.assert_close(x["target"], y["target"], rtol=0, atol=0)


def test_the_cached_volume_is_not_written():
    keys, size = ["source", "target"], (8, 8, 1)
    d = _prepared(size)
    before = d["source"].clone()
    fused = FusedPatchd(keys, "sampling_weight", size, num_samples=8, squeeze_dim=3, flip_prob=1.0)
    for p in fused(d):
        p["source"].add_(1.0)  # a later in-place step must not reach the cache through a view
    torch.testing.assert_close(d["source"], before)


def test_bad_input_is_refused_with_the_reason():
    fused = FusedPatchd(["source"], "sampling_weight", (8, 8, 2), num_samples=1, squeeze_dim=3)
    with pytest.raises(ValueError, match="squeeze dimension 3"):
        fused(_prepared((8, 8, 2)))
    with pytest.raises(KeyError, match="source"):
        FusedPatchd(["source"], "sampling_weight", (8, 8, 1))({"other": torch.zeros(1, 4, 4, 1)})
    with pytest.raises(ValueError, match="no weight map"):
        FusedPatchd(["source"], "sampling_weight", (8, 8, 1), allow_missing_keys=True)({"other": torch.zeros(1, 4, 4, 1)})
    with pytest.raises(ValueError, match="squeeze_dim"):
        FusedPatchd(["source"], "sampling_weight", (8, 8, 1), squeeze_dim=0)
