"""The confidence map of a synthetic image as a post-processing transform: D2's map, or the error head's."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import MapTransform

from ..config.options import as_flag

__all__ = ["ConfidenceMapd", "confidence_condition_key"]


def confidence_condition_key(local_conditional: bool | str) -> str | None:
    """The ``condition_key`` of :class:`ConfidenceMapd` for a D2 trained with or without ``local_conditional`` (which
    may be command-line text): the evaluator output's ``source`` for a conditional D2, else ``None``."""
    return "source" if as_flag(local_conditional, "local_conditional") else None


class ConfidenceMapd(MapTransform):
    """Add a confidence map M of ``keys`` under ``output_key``: the QA map, high where the synthesis is trusted.

    With ``activation="sigmoid"`` the network is the local discriminator and M = sigmoid(D2(image)) (the paper's
    map); with ``activation="error"`` it is the error-prediction head (:class:`custom_components.networks.nets.ErrorPredictor`)
    and M = 1 - clip(predicted |Y - G(X)|, 0, 1): one minus the expected absolute error as a fraction of the
    normalised intensity range.

    Runs in a MONAI post-processing chain on one channel-first image (C, H, W, D) in the network's normalised
    intensity scale, through ``inferer`` (e.g. the same ``SliceInferer`` as the generator). The result keeps the
    image's metadata, so ``Invertd`` and ``SaveImaged`` treat it like the prediction.

    Args:
        keys: the synthetic image key (usually ``pred``).
        network: the local discriminator D2; ``None`` disables the transform.
        inferer: how to apply D2 to a whole volume.
        output_key: key of the confidence map.
        device: device to run D2 on.
        condition_key: for a conditional D2 (trained with ``local_conditional``) or the error-prediction head, the
            key of the source image the network sees beside the synthetic one (``image`` in a MONAI evaluator's
            output); ``None`` otherwise.
        activation: ``"sigmoid"`` (D2's logits) or ``"error"`` (a predicted absolute error).
    """

    def __init__(self, keys: KeysCollection, network: torch.nn.Module | None, inferer: Inferer | None = None,
                 output_key: str = "confidence", device: str | torch.device | None = None,
                 condition_key: str | None = None, activation: str = "sigmoid") -> None:
        super().__init__(keys)
        if activation not in ("sigmoid", "error"):
            raise ValueError(f"activation must be 'sigmoid' or 'error', got {activation!r}.")
        self.activation = activation
        if len(self.keys) != 1:
            raise ValueError(f"ConfidenceMapd takes one key, got {self.keys}.")
        self.network = network
        self.inferer = inferer or SimpleInferer()
        self.output_key = output_key
        self.device = device
        self.condition_key = condition_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.network is None:
            return d
        img = d[self.keys[0]]
        device = self.device or next(self.network.parameters()).device
        x = torch.as_tensor(img).float()
        if self.condition_key is not None:
            x = torch.cat([torch.as_tensor(d[self.condition_key]).float().to(x.device), x], dim=0)
        self.network.eval()
        with torch.no_grad():
            try:
                logits = self.inferer(x[None].to(device), self.network)
            except (RuntimeError, ValueError) as e:
                if "spatial element" not in str(e):
                    raise
                name = img.meta.get("filename_or_obj", "the image") if isinstance(img, MetaTensor) else "the image"
                raise ValueError(f"{name} of spatial size {tuple(x.shape[1:])} is too small for the "
                                 f"{type(self.network).__name__} of the confidence map ({e}).") from None
        out = torch.as_tensor(logits)[0]
        conf = torch.sigmoid(out) if self.activation == "sigmoid" else 1.0 - out.clamp(0.0, 1.0)
        conf = conf.to(torch.as_tensor(img).device)
        d[self.output_key] = MetaTensor(conf, meta=img.meta, applied_operations=list(img.applied_operations)) \
            if isinstance(img, MetaTensor) else conf
        return d
