from __future__ import annotations

import pytest
import torch

from custom_components import GlobalCritic, LocalDiscriminator

SHAPES = [(2, (16, 24)), (2, (32, 32)), (3, (16, 16, 8)), (3, (8, 24, 16))]


@pytest.mark.parametrize("spatial_dims,size", SHAPES)
@pytest.mark.parametrize("norm", [None, "instance", "layer"])
def test_global_critic_scores_one_value_per_sample(spatial_dims, size, norm):
    critic = GlobalCritic(spatial_dims=spatial_dims, norm=norm)
    out = critic(torch.rand(3, 1, *size))
    assert out.shape == (3, 1)
    assert torch.isfinite(out).all()


def test_global_critic_default_has_no_batch_norm():
    modules = [m for m in GlobalCritic().modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert modules == []
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in GlobalCritic(norm="batch").modules())


def test_global_critic_architecture_follows_paper():
    critic = GlobalCritic()
    convs = [m for m in critic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [m.out_features for m in critic.modules() if isinstance(m, torch.nn.Linear)] == [512, 128, 1]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in critic.modules()) == 3


@pytest.mark.parametrize("spatial_dims,size", SHAPES)
def test_local_discriminator_output_has_input_size(spatial_dims, size):
    disc = LocalDiscriminator(spatial_dims=spatial_dims)
    out = disc(torch.rand(2, 1, *size))
    assert out.shape == (2, 1, *size)


def test_local_discriminator_has_three_downsamplings():
    disc = LocalDiscriminator(spatial_dims=2)
    strided = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 3


@pytest.mark.parametrize("net", [GlobalCritic, LocalDiscriminator])
def test_bad_arguments_name_the_argument(net):
    with pytest.raises(ValueError, match="spatial_dims"):
        net(spatial_dims=1)
    with pytest.raises(ValueError, match="channels"):
        net(channels=(8, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        net(spatial_dims=2)(torch.rand(1, 1, 20, 16))
    with pytest.raises(ValueError, match="input channel"):
        net(spatial_dims=2)(torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match="2D batch"):
        net(spatial_dims=2)(torch.rand(1, 1, 16, 16, 16))


def test_global_critic_bad_norm_and_head():
    with pytest.raises(ValueError, match="norm"):
        GlobalCritic(norm="weird")
    with pytest.raises(ValueError, match="fc_features"):
        GlobalCritic(fc_features=(512, 2))


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 48)), (3, (16, 32, 16))])
def test_half_resolution_local_discriminator_keeps_the_input_size_and_localises(spatial_dims, size):
    """stem_stride 2: hidden layers at half resolution, logits interpolated back; a local change stays local."""
    torch.manual_seed(0)
    # no normalisation: instance norm's statistics would spread any change over the whole map
    disc = LocalDiscriminator(spatial_dims=spatial_dims, channels=(4, 8, 8, 8), stem_stride=2, norm=None).eval()
    assert disc.total_stride == 16
    x = torch.rand(1, 1, *size)
    with torch.no_grad():
        out = disc(x)
        assert out.shape == (1, 1, *size)
        first = disc.stem.conv
        assert first.stride == (2,) * spatial_dims
        # no hidden layer runs at the input resolution: the largest hidden map is half the input size
        sizes = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(tuple(o.shape[2:])))
                 for m in disc.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d,
                                                           torch.nn.ConvTranspose3d))]
        disc(x)
        for h in hooks:
            h.remove()
        assert max(sizes) == tuple(s // 2 for s in size)
        # a change in one corner leaves the far corner's logits unchanged (M stays a local map)
        y = x.clone()
        y[(0, 0) + tuple(slice(0, 4) for _ in size)] += 1.0
        changed = (disc(y) - out).abs()
        assert changed[(0, 0) + tuple(slice(0, 4) for _ in size)].max() > 0
        assert changed[(0, 0) + tuple(slice(s - 2, s) for s in size)].max() == 0


def test_half_resolution_local_discriminator_checks_stride_and_multiple():
    with pytest.raises(ValueError, match="stem_stride"):
        LocalDiscriminator(stem_stride=4)
    with pytest.raises(ValueError, match="multiples of 16"):
        LocalDiscriminator(stem_stride=2)(torch.rand(1, 1, 24, 32))


@pytest.mark.parametrize("local_conditional, channels", [(False, 1), ("false", 1), (True, 2), ("true", 2)])
def test_local_input_channels_double_when_d2_also_sees_the_source(local_conditional, channels):
    from custom_components.networks.nets import local_input_channels

    assert local_input_channels(local_conditional) == channels
    disc = LocalDiscriminator(spatial_dims=2, in_channels=local_input_channels(local_conditional), channels=(4,) * 4)
    assert disc(torch.rand(1, channels, 16, 16)).shape == (1, 1, 16, 16)


def test_load_pretrained_loads_the_weights_and_moves_the_network(tmp_path):
    from custom_components.networks.nets import load_pretrained

    torch.manual_seed(0)
    saved, fresh = torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(1, 2, 3)
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    assert load_pretrained(fresh, None, "cpu") is fresh and not torch.equal(fresh.weight, saved.weight)  # no file
    loaded = load_pretrained(fresh, str(tmp_path / "model.pt"), "cpu")
    assert loaded is fresh and torch.equal(loaded.weight, saved.weight)
    with pytest.raises(FileNotFoundError, match="--pretrained_generator"):
        load_pretrained(fresh, str(tmp_path / "missing.pt"))
