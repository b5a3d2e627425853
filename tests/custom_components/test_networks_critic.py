"""Tests of the cheaper strided layout of the global critic (``GlobalCritic(downsample="stride")``)."""

from __future__ import annotations

import pytest
import torch

from custom_components import GlobalCritic


def _receptive_extent(critic: GlobalCritic, size: int = 96) -> list[int]:
    """Extent (pixels, per axis) of the input that one central feature of the last convolution depends on."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, size, size, requires_grad=True)
    feats = critic.features(x)
    h, w = feats.shape[-2:]
    feats[0, :, h // 2, w // 2].sum().backward()
    nz = x.grad[0, 0].abs() > 0
    return [int(nz.any(dim=1).sum()), int(nz.any(dim=0).sum())]


def test_strided_critic_has_the_paper_layouts_receptive_field_and_sizes() -> None:
    pool, stride = GlobalCritic(downsample="pool"), GlobalCritic(downsample="stride")
    assert _receptive_extent(pool) == _receptive_extent(stride) == [38, 38]
    x = torch.rand(2, 1, 64, 48)
    assert pool.features(x).shape == stride.features(x).shape == (2, 256, 8, 6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_strided_critic_scores_and_is_cheaper(spatial_dims: int) -> None:
    shape = (3, 1) + (32,) * spatial_dims
    critic = GlobalCritic(spatial_dims=spatial_dims, channels=(8, 16, 32, 64), downsample="stride")
    assert critic(torch.rand(shape)).shape == (3, 1)
    convs = [m for m in critic.features.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1]
    assert not any(isinstance(m, (torch.nn.MaxPool2d, torch.nn.MaxPool3d)) for m in critic.modules())


def test_bad_downsample() -> None:
    with pytest.raises(ValueError, match="downsample"):
        GlobalCritic(downsample="avg")
