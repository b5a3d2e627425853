from __future__ import annotations

import pytest
import torch

from custom_components import DifficultyAwareLoss, GradientPenalty, attention_weight, confidence_map


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 1, 4, 6, 8)])
@pytest.mark.parametrize("p,ref", [(1, torch.nn.functional.l1_loss), (2, torch.nn.functional.mse_loss)])
def test_beta_zero_equals_plain_loss(shape, p, ref):
    pred, target = torch.randn(shape), torch.randn(shape)
    m = torch.rand(shape)
    weight = attention_weight(m, beta=0.0)
    assert torch.equal(weight, torch.ones_like(m))
    loss = DifficultyAwareLoss(p=p)
    assert torch.equal(loss(pred, target, weight), ref(pred, target))
    assert torch.equal(loss(pred, target), ref(pred, target))


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_fully_confident_voxel_contributes_nothing(beta):
    pred, target = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    m = torch.full((1, 1, 4, 4), 0.3)
    m[0, 0, 1, 2] = 1.0
    per_voxel = DifficultyAwareLoss(p=1, reduction="none")(pred, target, attention_weight(m, beta))
    assert per_voxel[0, 0, 1, 2] == 0
    assert torch.allclose(per_voxel[m < 1], torch.tensor(0.7) ** beta)


def test_reductions_and_attention_normalisation():
    pred, target = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    w = attention_weight(torch.rand(2, 1, 5, 5), beta=2.0)
    none = DifficultyAwareLoss(reduction="none")(pred, target, w)
    assert none.shape == pred.shape
    assert torch.allclose(DifficultyAwareLoss(reduction="sum")(pred, target, w), none.sum())
    assert torch.allclose(DifficultyAwareLoss(reduction="mean")(pred, target, w), none.mean())
    wn = attention_weight(torch.rand(2, 1, 5, 5), beta=2.0, normalize="mean")
    assert torch.allclose(wn.mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)


def test_confidence_map_is_detached_probability():
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    m = confidence_map(logits)
    assert not m.requires_grad
    assert ((m > 0) & (m < 1)).all()
    assert torch.allclose(m, torch.sigmoid(logits.detach()))


def test_attention_does_not_backpropagate_into_confidence():
    logits = torch.randn(1, 1, 4, 4, requires_grad=True)
    pred = torch.randn(1, 1, 4, 4, requires_grad=True)
    loss = DifficultyAwareLoss()(pred, torch.zeros(1, 1, 4, 4), attention_weight(torch.sigmoid(logits), 2.0))
    loss.backward()
    assert logits.grad is None
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_loss_bad_arguments():
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        DifficultyAwareLoss(p=3)
    with pytest.raises(ValueError, match="beta"):
        attention_weight(torch.rand(1, 1, 2, 2), beta=-1.0)
    with pytest.raises(ValueError, match="attention_norm|normalize|not a valid"):
        attention_weight(torch.rand(1, 1, 2, 2), beta=1.0, normalize="max")
    with pytest.raises(ValueError, match="same shape"):
        DifficultyAwareLoss()(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 3, 2))
    with pytest.raises(ValueError, match="weight"):
        DifficultyAwareLoss()(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), torch.rand(1, 1, 3, 2))
    with pytest.raises(ValueError, match="lambda_gp"):
        GradientPenalty(lambda_gp=-1)


class _Linear(torch.nn.Module):
    """critic(x) = sum(w * x): its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (self.w * x).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("shape", [(3, 1, 4, 4), (3, 1, 4, 4, 4)])
def test_gradient_penalty_zero_for_unit_gradient_norm(shape):
    w = torch.randn(shape[1:])
    critic = _Linear(w / w.norm())
    gp = GradientPenalty(lambda_gp=10.0)(critic, torch.rand(shape), torch.rand(shape))
    assert gp.item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0])
def test_gradient_penalty_positive_otherwise_and_trainable(scale):
    shape = (2, 1, 4, 4)
    w = torch.randn(shape[1:])
    critic = _Linear(scale * w / w.norm())
    gp = GradientPenalty(lambda_gp=10.0)(critic, torch.rand(shape), torch.rand(shape))
    assert gp.item() == pytest.approx(10.0 * (scale - 1.0) ** 2, rel=1e-5)
    if scale not in (0.0, 1.0):  # the norm has no gradient at w = 0
        gp.backward()
        assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def test_gradient_penalty_interpolates_per_sample():
    class Recorder(torch.nn.Module):
        def forward(self, x):
            self.seen = x.detach().clone()
            return x.flatten(1).sum(1, keepdim=True)

    critic = Recorder()
    real, fake = torch.ones(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    GradientPenalty()(critic, real, fake, generator=torch.Generator().manual_seed(0))
    alphas = critic.seen.flatten(1)
    assert torch.allclose(alphas, alphas[:, :1].expand_as(alphas))  # one coefficient per sample
    assert len(set(alphas[:, 0].tolist())) == 4  # different between samples


def test_error_confidence_is_lowest_where_the_error_is_largest():
    from custom_components.losses.synthesis import error_confidence

    target = torch.zeros(2, 1, 4, 4)
    fake = torch.zeros(2, 1, 4, 4)
    fake[0, 0, 1, 2] = 0.5
    fake[0, 0, 3, 3] = -0.25
    fake[1, 0, 0, 0] = 2.0
    m = error_confidence(fake, target)
    assert m.shape == target.shape and float(m.min()) == 0.0 and float(m.max()) == 1.0
    assert m[0, 0, 1, 2] == 0.0 and m[0, 0, 3, 3] == pytest.approx(0.5) and m[1, 0, 0, 0] == 0.0
    assert m[0, 0, 0, 0] == 1.0  # no error, full confidence
    with pytest.raises(ValueError, match="same shape"):
        error_confidence(fake, target[:, :, :2])
