from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from custom_components.transforms.dictionary import InvertibleIntensityWindowd


def test_fixed_hu_window_round_trip():
    hu = MetaTensor(torch.linspace(-1024, 3000, 4024).reshape(1, 4, 1006, 1))
    t = InvertibleIntensityWindowd("ct", a_min=-1024, a_max=3000)
    d = t({"ct": hu.clone()})
    assert d["ct"].min() == 0 and d["ct"].max() == 1
    back = t.inverse(d)["ct"]
    assert torch.allclose(back, hu, atol=1e-3)
    assert len(back.applied_operations) == 0


def test_percentile_window_uses_mask_and_clips():
    img = MetaTensor(torch.cat([torch.zeros(1, 10, 10, 2), torch.arange(200.0).reshape(1, 10, 10, 2)], dim=3))
    mask = torch.zeros_like(img)
    mask[..., 2:] = 1
    d = InvertibleIntensityWindowd("mr", lower=0, upper=100, mask_key="mask")({"mr": img, "mask": mask})
    info = d["mr"].applied_operations[-1]["extra_info"]
    assert info["a_min"] == 0 and info["a_max"] == 199
    d = InvertibleIntensityWindowd("mr", lower=10, upper=90)({"mr": img})
    assert d["mr"].min() == 0 and d["mr"].max() == 1


def test_invertd_maps_prediction_back():
    t = InvertibleIntensityWindowd("target", a_min=-1000, a_max=1000)
    data = t({"target": MetaTensor(torch.full((1, 2, 2, 2), 500.0))})
    data["pred"] = data["target"].clone()
    out = Invertd(keys="pred", transform=t, orig_keys="target")(data)
    assert torch.allclose(out["pred"], torch.full((1, 2, 2, 2), 500.0))


@pytest.mark.parametrize("kwargs,name", [
    ({"a_min": 0}, "a_min"), ({"a_min": 5, "a_max": 1}, "a_max"), ({"lower": 60, "upper": 40}, "percentiles"),
    ({"b_min": 1, "b_max": 0}, "b_max"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        InvertibleIntensityWindowd("x", **kwargs)


def test_sampling_weight_oversamples_tumour_inside_foreground():
    from monai.transforms import RandWeightedCropd

    from custom_components.transforms.dictionary import SamplingWeightd

    src = torch.zeros(1, 20, 20, 1)
    mask = torch.zeros_like(src)
    mask[:, 2:18, 2:18] = 1
    label = torch.zeros_like(src)
    label[:, 3:5, 3:5] = 2
    d = SamplingWeightd(tumour_weight=4.0)({"source": src, "mask": mask, "label": label})
    w = d["sampling_weight"]
    assert w[0, 0, 0, 0] == 0 and w[0, 10, 10, 0] == 1 and w[0, 3, 3, 0] == 5
    assert torch.equal(SamplingWeightd()({"source": src, "mask": mask, "label": label})["sampling_weight"], mask)
    crop = RandWeightedCropd(keys="label", w_key="sampling_weight", spatial_size=(1, 1, 1), num_samples=400)
    crop.set_random_state(0)
    hits = sum(float(s["label"].sum() > 0) for s in crop(d))
    assert 400 * 20 / (256 + 16) * 0.6 < hits  # 4 tumour voxels x 5 / total weight 272, with slack
    with pytest.raises(ValueError, match="tumour_weight"):
        SamplingWeightd(tumour_weight=-1)


# --------------------------------------------------------------------------- #
# weighted patch sampling from a cached table
# --------------------------------------------------------------------------- #
def _weighted_item(shape=(20, 18, 9), seed=0):
    from monai.data import MetaTensor

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, *shape)
    mask[:, 3:16, 2:15, 1:8] = 1
    label = (torch.rand(1, *shape, generator=g) > 0.9).float() * mask
    src = MetaTensor(torch.rand(1, *shape, generator=g))
    return {"source": src, "target": src * 2, "mask": mask, "label": label, "subject": "s0"}


def _pipeline(sample_size, tumour_weight=3.0):
    from custom_components.transforms.dictionary import SamplingTabled, SamplingWeightd

    return [SamplingWeightd(tumour_weight=tumour_weight), SamplingTabled(spatial_size=sample_size)]


@pytest.mark.parametrize("sample_size", [(8, 8, 1), (6, 5, 4), (32, 8, 1)])
def test_table_crop_draws_the_same_centres_as_monai(sample_size):
    from monai.transforms import RandWeightedCropd

    from custom_components.transforms.dictionary import RandTableWeightedCropd

    d = _weighted_item()
    for t in _pipeline(sample_size):
        d = t(d)
    ours = RandTableWeightedCropd(["source", "target"], "sampling_weight", sample_size, num_samples=5)
    theirs = RandWeightedCropd(["source", "target"], "sampling_weight", sample_size, num_samples=5)
    ours.set_random_state(7), theirs.set_random_state(7)
    for _ in range(20):
        a, b = ours(d), theirs(d)
        assert [x["source"].shape for x in a] == [x["source"].shape for x in b]
        for x, y in zip(a, b):
            torch.testing.assert_close(x["source"].as_tensor(), y["source"].as_tensor())
            assert "sampling_weight" not in x and "sampling_table" not in x and x["subject"] == "s0"


def test_table_crop_follows_the_weights_and_a_replaced_map():
    from custom_components.transforms.dictionary import RandTableWeightedCropd

    d = _weighted_item()
    for t in _pipeline((1, 1, 1), tumour_weight=0.0):
        d = t(d)
    d["source"] = torch.arange(d["mask"].numel(), dtype=torch.float32).reshape(d["mask"].shape)
    crop = RandTableWeightedCropd(["source"], "sampling_weight", (1, 1, 1), num_samples=200)
    crop.set_random_state(0)
    picked = torch.cat([x["source"].reshape(-1) for x in crop(d)]).long()
    assert bool((d["mask"].reshape(-1)[picked] > 0).all())  # never outside the foreground
    # a weight map replaced after the table was built (hard-region mining) is used, not the stale table
    only = torch.zeros_like(d["mask"])
    only[0, 5, 5, 5] = 1.0
    d["sampling_weight"] = only
    picked = {int(x["source"].reshape(-1)[0]) for x in crop(d)}
    assert picked == {int(d["source"][0, 5, 5, 5])}


def test_cached_items_are_not_modified_by_the_random_crops():
    """The bundle caches with ``copy_cache=False``: the random part of the pipeline must not write into the cache."""
    from monai.data import CacheDataset
    from monai.transforms import Compose, RandFlipd, SpatialPadd, SqueezeDimd

    from custom_components.transforms.dictionary import RandTableWeightedCropd

    keys = ["source", "target", "mask", "label"]
    size = (8, 8, 1)
    transforms = Compose(_pipeline(size) + [
        RandTableWeightedCropd(keys, "sampling_weight", size, num_samples=4),
        SpatialPadd(keys, size), SqueezeDimd(keys, dim=3), RandFlipd(keys, prob=1.0, spatial_axis=0)])
    ds = CacheDataset([_weighted_item(seed=i) for i in range(2)], transforms, cache_rate=1.0, copy_cache=False,
                      progress=False)
    before = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in item.items() if k != "sampling_table"}
              for item in ds._cache]
    ops = [len(item["source"].applied_operations) for item in ds._cache]
    for _ in range(3):
        for i in range(len(ds)):
            patches = ds[i]
            assert patches[0]["source"].shape == (1, 8, 8)
    for item, ref, n_ops in zip(ds._cache, before, ops):
        for k, v in ref.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(torch.as_tensor(item[k]), torch.as_tensor(v))
        assert len(item["source"].applied_operations) == n_ops


def test_untracked_compose_gives_the_same_patches_as_plain_tensors_and_restores_tracking():
    """The per-patch random chain inside UntrackedCompose yields the values of the same chain run with metadata
    tracking, as plain tensors; MONAI's tracking flag is back on afterwards, also after an error."""
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import Compose, RandFlipd, RandSpatialCropSamplesd

    from custom_components.transforms.dictionary import UntrackedCompose

    def chain():
        return [RandSpatialCropSamplesd(keys=["a", "b"], roi_size=(8, 8), num_samples=3, random_size=False),
                RandFlipd(keys=["a", "b"], prob=0.5, spatial_axis=0)]

    data = {"a": MetaTensor(torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 16, 16)),
            "b": MetaTensor(torch.rand(1, 16, 16))}
    tracked = Compose(chain()).set_random_state(seed=3)(dict(data))
    untracked = UntrackedCompose(chain()).set_random_state(seed=3)(dict(data))
    assert get_track_meta()
    assert len(untracked) == len(tracked) == 3
    for t, u in zip(tracked, untracked):
        assert isinstance(t["a"], MetaTensor) and type(u["a"]) is torch.Tensor and type(u["b"]) is torch.Tensor
        torch.testing.assert_close(u["a"], t["a"].as_tensor())
        torch.testing.assert_close(u["b"], t["b"].as_tensor())

    def fail(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        UntrackedCompose([fail])(dict(data))
    assert get_track_meta()
