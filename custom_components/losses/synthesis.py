"""Loss terms of the dual-attention synthesis model.

* :func:`confidence_map` and :func:`attention_weight`: M = sigmoid(D2(G(X))) and F = (1 - M)^beta (Eq. 6).
* :class:`DifficultyAwareLoss`: L_AttG = F * |Y - G(X)|^p (Eq. 6); with F = 1 it is the plain L1/L2 loss of Eq. 1.
* :class:`GradientPenalty`: the WGAN-GP term lambda * E[(||grad D1(X_hat)||_2 - 1)^2] of Eq. 2.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.layers import GaussianFilter
from monai.utils import LossReduction, StrEnum
from torch.nn.modules.loss import _Loss

__all__ = [
    "AttentionNorm", "AttentionSource", "DifficultyAwareLoss", "GradientPenalty", "attention_weight", "confidence_map",
    "difficulty_confidence", "error_confidence", "gap_confidence",
]


class AttentionNorm(StrEnum):
    """How the attention weight F is normalised before it scales the voxel loss."""

    NONE = "none"
    MEAN = "mean"  # divide F by its mean over each sample, so the loss keeps the scale of plain L1/L2


class AttentionSource(StrEnum):
    """Which difficulty map F = (1 - M)^beta is computed from."""

    CONFIDENCE = "confidence"  # M = sigmoid(D2(G(X))), the paper's method
    GAP = "gap"  # M from the paired gap D2(Y) - D2(G(X)) per voxel: zero wherever G(X) looks as real as Y there
    ERROR = "error"  # M from the error |Y - G(X)|, known at every training step (an error-weighted, focal-style L1)
    PREDICTED = "predicted"  # M from the error-prediction head's estimate of |Y - G(X)| (networks.ErrorPredictor)


def difficulty_confidence(difficulty: torch.Tensor, smoothing: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """A confidence map 1 - d / max(d) from a non-negative difficulty map d, per sample, detached.

    Args:
        difficulty: d >= 0, shape (B, 1, H, W[, D]); larger = harder.
        smoothing: standard deviation (voxels) of a Gaussian blur of d before the normalisation; 0 = none. A
            per-voxel error map is noisy (a voxel of noise counts as much as a voxel of a missed structure); the blur
            makes F follow regions instead.
        eps: floor of the per-sample maximum.
    """
    if difficulty.ndim < 3:
        raise ValueError(f"difficulty must be shaped (B, 1, H, W[, D]), got {tuple(difficulty.shape)}.")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0 (voxels), got {smoothing!r}.")
    d = difficulty.detach().float().clamp(min=0.0)
    if smoothing > 0:
        d = GaussianFilter(d.ndim - 2, sigma=float(smoothing)).to(d.device)(d)
    peak = d.amax(dim=tuple(range(1, d.ndim)), keepdim=True).clamp(min=eps)
    return 1.0 - d / peak


def error_confidence(fake: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """The confidence map 1 - e / max(e) with e = |Y - G(X)| (channel mean), per sample, detached.

    It is what a perfect error detector's M would rank: lowest where G's error is largest. It needs the target, so it
    exists at training time only; with it the attention becomes an error-weighted (focal-style) voxel loss, the
    baseline a learned map has to beat (variant ``error_weighted``, or ``attention_source: "error"``).

    Args:
        fake: G(X), shape (B, C, H, W[, D]).
        target: Y, the same shape.
        smoothing: Gaussian blur of e in voxels (:func:`difficulty_confidence`).
        eps: floor of the per-sample maximum error.
    """
    if fake.shape != target.shape:
        raise ValueError(f"fake and target must have the same shape, got {tuple(fake.shape)} and {tuple(target.shape)}.")
    err = (target.detach().float() - fake.detach().float()).abs().mean(dim=1, keepdim=True)
    return difficulty_confidence(err, smoothing, eps)


def gap_confidence(real_logits: torch.Tensor, fake_logits: torch.Tensor, smoothing: float = 0.0,
                   eps: float = 1e-6) -> torch.Tensor:
    """A confidence map from the paired gap d = max(0, D2(Y) - D2(G(X))) of the local discriminator's logits.

    D2's own M = sigmoid(D2(G(X))) mixes "this region of G(X) is wrong" with "this kind of region always looks fake
    to D2"; scoring the real image of the same pair at the same voxel removes the second part: where G(X) equals Y
    locally the two logits are equal and d is 0. Known at training time only (it needs Y).

    Args:
        real_logits: D2 of the target, (B, 1, H, W[, D]).
        fake_logits: D2 of G(X), the same shape.
        smoothing, eps: see :func:`difficulty_confidence`.
    """
    if real_logits.shape != fake_logits.shape:
        raise ValueError(f"real_logits ({tuple(real_logits.shape)}) and fake_logits ({tuple(fake_logits.shape)}) "
                         "must have the same shape.")
    return difficulty_confidence(real_logits.detach().float() - fake_logits.detach().float(), smoothing, eps)


def confidence_map(logits: torch.Tensor) -> torch.Tensor:
    """Confidence map M = sigmoid(D2(G(X))) in [0, 1] (paper section 2.3).

    M is used as a weight in Eq. 6, so it is detached: the voxel loss must not push gradients into D2 or,
    through M, into G. The adversarial term L_ADV2 (Eq. 5) is what trains G against D2.

    Args:
        logits: local discriminator output, shape (B, 1, H, W[, D]).
    """
    return torch.sigmoid(logits.detach().float())


def attention_weight(confidence: torch.Tensor, beta: float, normalize: AttentionNorm | str = AttentionNorm.NONE,
                     floor: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """Difficulty-aware attention F = (1 - M)^beta (Eq. 6), optionally normalised and floored.

    The paper uses F as given. Two options of ours (not in the paper):

    * ``normalize="mean"`` divides F by its per-sample mean, so the loss keeps the scale of plain L1/L2 whatever
      the overall confidence of D2 (with the paper's F, a D2 that is confident everywhere shrinks the whole loss).
    * ``floor = alpha > 0`` mixes in a constant: ``alpha + (1 - alpha) * F'`` (F' = F, or F / mean F when
      normalised), so easy regions keep at least ``alpha`` of their weight and are never ignored.

    Args:
        confidence: M in [0, 1], shape (B, 1, H, W[, D]).
        beta: attention exponent, >= 0; ``beta = 0`` gives F = 1 everywhere (plain L1/L2).
        normalize: ``"none"`` (the paper) or ``"mean"`` (divide by the per-sample mean of F).
        floor: alpha in [0, 1]; 0 is the paper's F, 1 switches the attention off.
        eps: floor of the mean when normalising.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}.")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor!r}.")
    normalize = AttentionNorm(normalize)
    if confidence.ndim < 3:
        raise ValueError(f"confidence must be shaped (B, 1, H, W[, D]), got {tuple(confidence.shape)}.")
    weight = (1.0 - confidence.detach()).clamp(min=0.0) ** beta
    if normalize == AttentionNorm.MEAN:
        dims = tuple(range(1, weight.ndim))
        weight = weight / weight.mean(dim=dims, keepdim=True).clamp(min=eps)
    if floor > 0:
        weight = floor + (1.0 - floor) * weight
    return weight


class DifficultyAwareLoss(_Loss):
    """Difficulty-aware voxel loss L_AttG = F * |Y - G(X)|^p (paper Eq. 6).

    With ``weight=None`` (or F = 1, i.e. beta = 0) this is exactly the L1 (p = 1) or MSE (p = 2) loss of Eq. 1.

    Args:
        p: 1 or 2.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (MONAI ``LossReduction``).
    """

    def __init__(self, p: int = 1, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}.")
        self.p = p

    def forward(self, input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: synthetic image G(X), shape (B, C, H, W[, D]).
            target: real target image Y, same shape.
            weight: attention weight F, shape (B, 1, H, W[, D]) or the input's shape; ``None`` means 1.
        """
        if input.shape != target.shape:
            raise ValueError(f"input ({tuple(input.shape)}) and target ({tuple(target.shape)}) must have the same shape.")
        diff = (target - input).abs()
        if self.p == 2:
            diff = diff * diff
        if weight is not None:
            if weight.ndim != input.ndim or weight.shape[0] != input.shape[0] or weight.shape[2:] != input.shape[2:] \
                    or weight.shape[1] not in (1, input.shape[1]):
                raise ValueError(
                    f"weight ({tuple(weight.shape)}) must be shaped (B, 1 or C, spatial...) like input ({tuple(input.shape)})."
                )
            diff = weight * diff
        if self.reduction == LossReduction.MEAN.value:
            return diff.mean()
        if self.reduction == LossReduction.SUM.value:
            return diff.sum()
        return diff


class GradientPenalty(torch.nn.Module):
    """WGAN-GP gradient penalty (Eq. 2; Gulrajani et al. 2017).

    For each sample, X_hat = a * Y + (1 - a) * G(X) with a ~ U(0, 1) drawn per sample; the penalty is
    ``lambda_gp * mean_b (||d critic(X_hat) / d X_hat||_2 - 1)^2``, the norm taken over all non-batch dimensions.
    The graph is kept (``create_graph=True``) so the penalty can be back-propagated into the critic.

    Args:
        lambda_gp: penalty weight lambda (10 in the WGAN-GP paper).
    """

    def __init__(self, lambda_gp: float = 10.0) -> None:
        super().__init__()
        if lambda_gp < 0:
            raise ValueError(f"lambda_gp must be >= 0, got {lambda_gp!r}.")
        self.lambda_gp = float(lambda_gp)

    @staticmethod
    def interpolate(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """X_hat = a * real + (1 - a) * fake, a ~ U(0, 1) per sample, detached from both and requiring grad."""
        if real.shape != fake.shape:
            raise ValueError(f"real ({tuple(real.shape)}) and fake ({tuple(fake.shape)}) must have the same shape.")
        alpha_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
        alpha = torch.rand(alpha_shape, device=real.device, dtype=real.dtype, generator=generator)
        return (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)

    def penalty(self, scores: torch.Tensor, interp: torch.Tensor, scaler: Any = None) -> torch.Tensor:
        """lambda * mean (||d scores / d interp||_2 - 1)^2, given the critic's scores of ``interp``.

        Splitting the penalty from the critic's forward lets a trainer score real, fake and interpolated images in
        one batch (one forward, which DistributedDataParallel needs). With a ``GradScaler`` (fp16), the scores are
        scaled before differentiation and the gradient unscaled before its norm, as the PyTorch AMP notes advise.
        """
        out = scores.sum()
        if scaler is not None and scaler.is_enabled():
            (grad,) = torch.autograd.grad(scaler.scale(out), interp, create_graph=True)
            grad = grad / scaler.get_scale()
        else:
            (grad,) = torch.autograd.grad(out, interp, create_graph=True)
        norm = grad.float().flatten(1).norm(2, dim=1)
        return self.lambda_gp * ((norm - 1.0) ** 2).mean()

    def forward(self, critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor,
                generator: torch.Generator | None = None, scaler: Any = None) -> torch.Tensor:
        """
        Args:
            critic: the global critic D1.
            real: real images Y, shape (B, C, H, W[, D]).
            fake: synthetic images G(X), same shape (detached here).
            generator: optional random generator for the interpolation coefficients.
            scaler: optional ``torch.amp.GradScaler`` (fp16 training).
        Returns:
            the scalar penalty (already multiplied by ``lambda_gp``).
        """
        interp = self.interpolate(real, fake, generator)
        with torch.enable_grad():
            return self.penalty(critic(interp), interp, scaler)
