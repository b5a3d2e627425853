from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from custom_components.transforms import InvertibleIntensityWindowd


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

    from custom_components.transforms import SamplingWeightd

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
