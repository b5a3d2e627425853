"""Tests of whole-slice 2D inference (``custom_components.inferers.inferer``)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.networks.nets import UNet

from custom_components.inferers.inferer import SliceMode, WholeSliceInferer, slice_inferer, stride_product


def _unet(channels=(4, 8, 16, 32), strides=(2, 2, 2)) -> UNet:
    torch.manual_seed(0)
    net = UNet(2, 1, 1, channels=channels, strides=strides, num_res_units=1, norm="batch")
    return net.eval()


def _volume(h: int, w: int, d: int, affine: torch.Tensor | None = None) -> MetaTensor:
    torch.manual_seed(1)
    img = torch.rand(1, 1, h, w, d)
    return MetaTensor(img, affine=affine if affine is not None else torch.eye(4))


def test_equals_sliding_window_when_slice_is_the_patch() -> None:
    net = _unet()
    vol = _volume(32, 32, 7)
    with torch.no_grad():
        whole = WholeSliceInferer(sw_batch_size=3, divisor=8)(vol, net)
        window = SliceInferer(spatial_dim=2, roi_size=(32, 32), sw_batch_size=4, overlap=0.25, mode="gaussian")(vol, net)
    assert whole.shape == vol.shape
    torch.testing.assert_close(whole.as_tensor(), window.as_tensor(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 45, 5), (40, 53, 3), (33, 33, 1)])
def test_odd_sizes_equal_padded_forward_cropped_back(shape: tuple[int, int, int]) -> None:
    net = _unet()
    vol = _volume(*shape)
    with torch.no_grad():
        out = WholeSliceInferer(sw_batch_size=2, divisor=8)(vol, net)
        h, w, d = shape
        slices = vol.as_tensor()[0].permute(3, 0, 1, 2)  # (D, 1, H, W)
        padded = torch.nn.functional.pad(slices, (0, -w % 8, 0, -h % 8))
        expected = net(padded)[..., :h, :w].permute(1, 2, 3, 0)[None]
    assert out.shape == (1, 1, h, w, d)
    torch.testing.assert_close(out.as_tensor(), expected, rtol=1e-5, atol=1e-5)


def test_each_slice_is_independent_of_the_batch() -> None:
    """Batching slices does not mix them (eval-mode network): batch size 1 and 4 give the same volume."""
    net = _unet()
    vol = _volume(24, 40, 6)
    with torch.no_grad():
        a = WholeSliceInferer(sw_batch_size=1)(vol, net)
        b = WholeSliceInferer(sw_batch_size=4)(vol, net)
    torch.testing.assert_close(a.as_tensor(), b.as_tensor(), rtol=1e-5, atol=1e-5)


def test_keeps_geometry() -> None:
    affine = torch.tensor([[1.0, 0, 0, -120.0], [0, 1.0, 0, -118.0], [0, 0, 1.0, -77.0], [0, 0, 0, 1]],
                          dtype=torch.float64)
    vol = _volume(41, 35, 4, affine)
    with torch.no_grad():
        out = WholeSliceInferer(sw_batch_size=2)(vol, _unet())
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine.to(torch.float64), affine)
    assert out.shape[2:] == vol.shape[2:]


def test_deeper_network_needs_its_stride_product() -> None:
    net = _unet(channels=(4, 8, 16, 32, 64), strides=(2, 2, 2, 2))
    assert stride_product([2, 2, 2, 2]) == 16 and stride_product([[2, 1], 2]) == 4
    vol = _volume(40, 40, 2)  # a multiple of 8 but not of 16
    with torch.no_grad():
        out = WholeSliceInferer(sw_batch_size=2, divisor=16)(vol, net)
        with pytest.raises(RuntimeError):  # padding only to 8 leaves odd sizes at the bottom of the UNet
            WholeSliceInferer(sw_batch_size=2, divisor=8)(vol, net)
    assert out.shape == vol.shape


def test_factory_and_bad_arguments() -> None:
    assert isinstance(slice_inferer("whole", sw_batch_size=4), WholeSliceInferer)
    assert slice_inferer("whole", divisor=8, network_strides=[2, 2, 2, 2]).divisor == 16
    assert slice_inferer("whole", divisor=8, network_strides=[2, 2]).divisor == 8
    window = slice_inferer(SliceMode.WINDOW, roi_size=(32, 32), sw_batch_size=4)
    assert type(window) is SliceInferer and tuple(window.roi_size) == (32, 32)
    with pytest.raises(ValueError, match="mode"):
        slice_inferer("tiles")
    with pytest.raises(ValueError, match="divisor"):
        WholeSliceInferer(divisor=0)
    with pytest.raises(ValueError, match="roi_size"):
        WholeSliceInferer(roi_size=(96, 96))
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        WholeSliceInferer()(torch.zeros(1, 1, 32, 32), _unet())


@pytest.mark.parametrize("workflow, key", [("train", "validate#inferer"), ("infer", "inferer")])
def test_bundle_configs_select_the_inferer(workflow: str, key: str) -> None:
    from pathlib import Path

    from monai.bundle import ConfigParser

    from custom_components.config.paths import config_files

    root = Path(__file__).resolve().parents[2] / "bundle"
    parser = ConfigParser()
    parser.read_config(config_files(root, workflow))
    parser["bundle_root"] = str(root)
    inferer = parser.get_parsed_content(key)
    # the 2D default pads to the larger total stride: the half-resolution D2's 16 (the generator's is 8)
    assert isinstance(inferer, WholeSliceInferer) and inferer.divisor == 16
    parser["slice_mode"] = "window"
    assert type(parser.get_parsed_content(key, lazy=False)) is SliceInferer
    parser["slice_mode"] = "whole"
    parser["local_stem_stride"] = 1
    assert parser.get_parsed_content(key, lazy=False).divisor == 8
    parser["network_def"]["strides"] = [2, 2, 2, 2, 2]
    parser["generator_channels"] = [4, 8, 16, 32, 64, 128]
    assert parser.get_parsed_content(key, lazy=False).divisor == 32
    parser["spatial_dims"] = 3
    assert type(parser.get_parsed_content(key, lazy=False)).__name__ == "SlidingWindowInferer"  # the 3D default


@pytest.mark.parametrize("spatial_dim", [0, 1, 2])
def test_any_slicing_axis_batch_and_output_channels_match_a_per_slice_loop(spatial_dim: int) -> None:
    """Two volumes, a network with 3 output channels, slices along each axis: every output slice is the network on
    that input slice (a wrong reshape or axis move would mix volumes, slices or channels)."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1).eval()
    vol = torch.rand(2, 2, 8, 16, 24)
    with torch.no_grad():
        out = WholeSliceInferer(sw_batch_size=5, divisor=8, spatial_dim=spatial_dim)(vol, net)
        assert out.shape == (2, 3, 8, 16, 24) and type(out) is torch.Tensor
        for b in range(2):
            for i in range(vol.shape[2 + spatial_dim]):
                x = vol[b:b + 1].select(2 + spatial_dim, i)
                h, w = x.shape[-2:]
                expected = net(torch.nn.functional.pad(x, (0, -w % 8, 0, -h % 8)))[..., :h, :w]
                torch.testing.assert_close(out[b:b + 1].select(2 + spatial_dim, i), expected, rtol=1e-5, atol=1e-5)
