"""The two discriminators of the dual-attention synthesis model (paper section 2.2 and 2.4).

* :class:`GlobalCritic` (D1) scores a whole image with one number; it is trained as a WGAN-GP critic (Eq. 2).
* :class:`LocalDiscriminator` (D2) is a dense FCN returning one logit per voxel; ``sigmoid`` of its output is the
  confidence map M used by the difficulty-aware attention (Eq. 4-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Pool

from ..config.options import as_flag
from .weights import load_weights

__all__ = ["GlobalCritic", "LocalDiscriminator", "load_pretrained", "local_input_channels"]


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")


def _check_input(x: torch.Tensor, spatial_dims: int, in_channels: int, multiple: int, name: str) -> None:
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} expects a {spatial_dims}D batch shaped (B, C, {'H, W' if spatial_dims == 2 else 'H, W, D'}), "
            f"got shape {tuple(x.shape)}."
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)}).")
    bad = [s for s in x.shape[2:] if s % multiple]
    if bad:
        raise ValueError(f"{name} needs spatial sizes that are multiples of {multiple}, got {tuple(x.shape[2:])}.")


class GlobalCritic(torch.nn.Module):
    """Global critic D1 (paper section 2.4), trained with the WGAN-GP objective (Eq. 2).

    Three stages of 3x3 convolution + norm + activation + max-pooling with ``channels[:3]`` filters, a fourth
    convolution with ``channels[3]`` filters, global average pooling, then fully connected layers
    ``fc_features`` (the last one is the scalar score, no activation).

    The paper lists batch norm; WGAN-GP (Gulrajani et al. 2017, section 4) penalises the gradient of each sample
    independently, which batch norm breaks by mixing samples. The default is therefore ``norm=None``; ``"instance"``
    or ``"layer"`` (group norm with one group) are safe alternatives, ``"batch"`` is available for replication only.

    Global average pooling before the head makes the critic accept any input whose spatial sizes are multiples of 8.

    ``downsample="stride"`` replaces each 3x3 convolution + 2x2 max-pooling by one 4x4 convolution of stride 2: the
    same output sizes and the same receptive field (38 pixels before the last convolution's neighbours are
    averaged), at about a quarter of the multiply-adds of those stages because no full-resolution output is
    computed and then thrown away. ``"pool"`` (the default) is the paper's layout.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image being judged.
        channels: filters of the three pooled stages and of the last convolution.
        fc_features: output nodes of the fully connected layers; the last must be 1.
        norm: ``None``, ``"instance"``, ``"layer"`` or ``"batch"``.
        act: activation, any MONAI ``Act`` name or (name, args) tuple.
        downsample: ``"pool"`` (3x3 convolution then max-pooling, the paper) or ``"stride"`` (4x4 convolution of
            stride 2, cheaper, same receptive field).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        fc_features: Sequence[int] = (512, 128, 1),
        norm: str | None = None,
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.2}),
        downsample: str = "pool",
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 filter counts (3 pooled stages + last conv), got {channels!r}.")
        if len(fc_features) < 1 or fc_features[-1] != 1:
            raise ValueError(f"fc_features must end with 1 output node (the critic score), got {fc_features!r}.")
        norms = {None: None, "none": None, "instance": ("instance", {"affine": True}),
                 "layer": ("group", {"num_groups": 1}), "batch": "batch"}
        if norm not in norms:
            raise ValueError(f"norm must be one of {list(norms)}, got {norm!r}.")
        if downsample not in ("pool", "stride"):
            raise ValueError(f"downsample must be 'pool' or 'stride', got {downsample!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        pool = Pool["max", spatial_dims]
        layers: list[torch.nn.Module] = []
        c_in = in_channels
        for c_out in channels[:3]:
            if downsample == "pool":
                layers.append(Convolution(spatial_dims, c_in, c_out, kernel_size=3, act=act, norm=norms[norm]))
                layers.append(pool(kernel_size=2))
            else:  # kernel 4, stride 2, padding 1: output H/2, receptive field as conv 3x3 + pool 2x2
                layers.append(Convolution(spatial_dims, c_in, c_out, strides=2, kernel_size=4, padding=1, act=act,
                                          norm=norms[norm]))
            c_in = c_out
        layers.append(Convolution(spatial_dims, c_in, channels[3], kernel_size=3, act=act, norm=norms[norm]))
        self.features = torch.nn.Sequential(*layers)
        self.pool = Pool["adaptiveavg", spatial_dims](1)
        head: list[torch.nn.Module] = []
        f_in = channels[3]
        for i, f_out in enumerate(fc_features):
            head.append(torch.nn.Linear(f_in, f_out))
            if i < len(fc_features) - 1:
                head.append(Act[act[0] if isinstance(act, tuple) else act](**(act[1] if isinstance(act, tuple) else {})))
            f_in = f_out
        self.head = torch.nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W[, D]) with sizes multiple of 8. Returns the critic scores, shape (B, 1)."""
        _check_input(x, self.spatial_dims, self.in_channels, 8, type(self).__name__)
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class LocalDiscriminator(torch.nn.Module):
    """Local dense discriminator D2 (paper section 2.2): an FCN with three down-samplings.

    The encoder halves the resolution three times (strided convolutions); the decoder upsamples back with
    transposed convolutions and skip connections, so the output has the input's spatial size: one logit per
    voxel saying how real the local region around that voxel looks. ``sigmoid`` of the output is the confidence
    map M (see :func:`custom_components.losses.synthesis.confidence_map`).

    ``stem_stride=1`` (the paper's layout) runs the first convolution and the last decoder stage at full resolution.
    ``stem_stride=2`` makes the first convolution strided, so every hidden layer works at half resolution or less;
    the decoder still undoes the three down-samplings and the logits are interpolated (bi/trilinear) back to the
    input size. Per 2D pixel this costs about a quarter of the full-resolution layout's multiply-adds and memory
    traffic (the full-resolution layers with normalisation dominate on CPU); M is then resolved at 2 voxels, and
    inputs must be multiples of 16. :attr:`total_stride` gives the multiple an input must have.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image being judged.
        channels: filters at full resolution and after each of the three down-samplings.
        norm: normalisation of the hidden layers (MONAI ``Norm`` name), ``None`` to disable.
        act: activation of the hidden layers.
        stem_stride: stride of the first convolution: 1 (full resolution, the paper) or 2 (half resolution, the
            logits are interpolated back to the input size).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        norm: str | tuple | None = ("instance", {"affine": True}),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.2}),
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 filter counts (full resolution + 3 down-samplings), got {channels!r}.")
        if stem_stride not in (1, 2) or isinstance(stem_stride, bool):
            raise ValueError(f"stem_stride must be 1 (full resolution) or 2 (half resolution), got {stem_stride!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.stem_stride = stem_stride
        self.total_stride = self.stride_of(stem_stride)
        conv = lambda i, o, **kw: Convolution(spatial_dims, i, o, kernel_size=3, act=act, norm=norm, **kw)  # noqa: E731
        self.stem = conv(in_channels, channels[0], strides=stem_stride)
        self.down = torch.nn.ModuleList(conv(channels[i], channels[i + 1], strides=2) for i in range(3))
        self.up = torch.nn.ModuleList(
            conv(channels[i + 1], channels[i], strides=2, is_transposed=True) for i in reversed(range(3))
        )
        self.fuse = torch.nn.ModuleList(conv(2 * channels[i], channels[i]) for i in reversed(range(3)))
        self.out = Convolution(spatial_dims, channels[0], 1, kernel_size=1, conv_only=True)

    @staticmethod
    def stride_of(stem_stride: int = 1) -> int:
        """The multiple an input's sizes must have: the stem's stride times the three down-samplings' 2^3 (configs
        read it for their padding and patch checks even when the variant builds no D2)."""
        return 8 * int(stem_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W[, D]) with sizes multiple of :attr:`total_stride`. Returns logits shaped (B, 1, H, W[, D])."""
        _check_input(x, self.spatial_dims, self.in_channels, self.total_stride, type(self).__name__)
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            h = fuse(torch.cat([up(h), skips.pop()], dim=1))
        logits = self.out(h)
        if self.stem_stride == 1:
            return logits
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return torch.nn.functional.interpolate(logits, size=x.shape[2:], mode=mode, align_corners=False)


class ErrorPredictor(LocalDiscriminator):
    """Error-prediction head: the dense FCN of :class:`LocalDiscriminator`, regressing the synthesis error.

    Not in the paper. It sees the source X and the synthetic image G(X) (channels in that order) and is trained on
    the detached |Y - G(X)| (:meth:`custom_components.DualAttentionTrainer.error_step`), so its output is the
    expected absolute error at each voxel, in the target's normalised intensity units (>= 0, through a softplus).
    It is known without the target, so it serves where D2's confidence map was meant to: as the QA map written
    beside each synthetic image (``1 - predicted error``, see :class:`custom_components.transforms.confidence.ConfidenceMapd`)
    and, during training, as a difficulty map for the attention (``attention_source: "predicted"``).

    Args:
        spatial_dims, channels, norm, act, stem_stride: as for :class:`LocalDiscriminator`.
        in_channels: channels of source + synthetic image (2 for single-channel images).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 2, channels: Sequence[int] = (8, 16, 32, 64),
                 norm: str | tuple | None = ("instance", {"affine": True}),
                 act: str | tuple = ("leakyrelu", {"negative_slope": 0.2}), stem_stride: int = 2) -> None:
        super().__init__(spatial_dims, in_channels, channels, norm, act, stem_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 2C, H, W[, D]) = (source, synthetic). Returns the predicted |Y - G(X)|, shape (B, 1, H, W[, D])."""
        return torch.nn.functional.softplus(super().forward(x))


def local_input_channels(local_conditional: bool | str, image_channels: int = 1) -> int:
    """Input channels of D2: the image's, doubled when D2 also sees the source (``local_conditional``, which may be
    command-line text; see :meth:`custom_components.DualAttentionTrainer.local_input`)."""
    return 2 * image_channels if as_flag(local_conditional, "local_conditional") else image_channels


def load_pretrained(network: torch.nn.Module, path: str | None,
                    device: str | torch.device | None = None) -> torch.nn.Module:
    """Initialise ``network`` from a saved state dict (e.g. a plain UNet's ``model.pt``); ``None`` does nothing.
    The network is then moved to ``device`` (if given).

    Used to start the adversarial training from a generator trained with the plain voxel loss: the difficulty-aware
    attention only has hard regions to find once G renders the easy ones well. Loaded with ``weights_only=True`` and
    checked as inference checks its weights (:func:`custom_components.networks.weights.load_weights`).
    """
    if path not in (None, "", "none", "None"):
        network = load_weights(network, path, "cpu", role="pretrained generator", option="pretrained_generator",
                               eval_mode=False)
    return network if device is None else network.to(device)
