"""Invertible intensity normalisation per modality.

MRI has no absolute scale, so it is mapped to [b_min, b_max] by percentiles computed inside the foreground;
CT is mapped by a fixed Hounsfield window. The parameters used are recorded in the image's MONAI
``applied_operations`` so that :meth:`InvertibleIntensityWindowd.inverse` (or MONAI's ``Invertd``) can map a
prediction back to the original scale.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys

__all__ = ["InvertibleIntensityWindowd", "SamplingWeightd"]


class InvertibleIntensityWindowd(MapTransform, InvertibleTransform):
    """Linearly map [a_min, a_max] to [b_min, b_max], recording the window so the mapping can be inverted.

    If ``a_min``/``a_max`` are given the window is fixed (e.g. a CT HU window [-1024, 3000]); otherwise they are
    the ``lower``/``upper`` percentiles of the image inside ``mask_key`` (or of the voxels > 0 when no mask).

    Args:
        keys: image keys to normalise.
        a_min, a_max: fixed input window; both ``None`` for percentile mode.
        lower, upper: percentiles (0-100) used when no fixed window is given.
        b_min, b_max: output range.
        clip: clip the output to [b_min, b_max]; values outside the window are then not recoverable, the inverse
            maps them to the window's bounds.
        mask_key: key of a foreground mask for the percentiles (ignored when missing from the data).
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, a_min: float | None = None, a_max: float | None = None,
                 lower: float = 0.5, upper: float = 99.5, b_min: float = 0.0, b_max: float = 1.0, clip: bool = True,
                 mask_key: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if (a_min is None) != (a_max is None):
            raise ValueError(f"give both a_min and a_max or neither, got a_min={a_min!r}, a_max={a_max!r}.")
        if a_min is not None and not a_max > a_min:
            raise ValueError(f"a_max ({a_max!r}) must be larger than a_min ({a_min!r}).")
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower!r}, upper={upper!r}.")
        if not b_max > b_min:
            raise ValueError(f"b_max ({b_max!r}) must be larger than b_min ({b_min!r}).")
        self.a_min, self.a_max, self.lower, self.upper = a_min, a_max, lower, upper
        self.b_min, self.b_max, self.clip, self.mask_key = b_min, b_max, clip, mask_key

    def _window(self, img: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
        if self.a_min is not None:
            return float(self.a_min), float(self.a_max)
        values = img[mask.expand_as(img) > 0] if mask is not None else img[img > 0]
        if values.numel() == 0:
            values = img.flatten()
        q = torch.quantile(values.float()[:: max(1, values.numel() // 1_000_000)],  # quantile caps input size
                           torch.tensor([self.lower / 100, self.upper / 100], dtype=torch.float32))
        lo, hi = float(q[0]), float(q[1])
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        mask = torch.as_tensor(mask) if mask is not None else None
        for key in self.key_iterator(d):
            img = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(torch.as_tensor(d[key]))
            a_min, a_max = self._window(img.as_tensor(), mask)
            out = (img.float() - a_min) / (a_max - a_min) * (self.b_max - self.b_min) + self.b_min
            if self.clip:
                out = out.clamp(self.b_min, self.b_max)
            d[key] = out
            self.push_transform(d, key, extra_info={"a_min": a_min, "a_max": a_max})
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d, key)[TraceKeys.EXTRA_INFO]
            d[key] = self.invert_values(d[key], info["a_min"], info["a_max"])
        return d

    def invert_values(self, img: torch.Tensor, a_min: float, a_max: float) -> torch.Tensor:
        """Map normalised values back to the window [a_min, a_max]'s scale."""
        return (img - self.b_min) / (self.b_max - self.b_min) * (a_max - a_min) + a_min


class SamplingWeightd(MapTransform):
    """Weight map for ``RandWeightedCropd``: 1 inside the foreground mask, plus ``tumour_weight`` inside the label.

    With ``tumour_weight = 0`` patch (or slice) centres are drawn uniformly inside the foreground; a positive value
    over-samples tumours, e.g. 4 makes a tumour voxel five times as likely a centre as a normal brain voxel.
    Without a mask the whole image is foreground.

    Args:
        mask_key: foreground mask key (optional in the data).
        label_key: tumour label key (optional in the data; voxels > 0 count).
        tumour_weight: extra weight of tumour voxels, >= 0.
        ref_key: image whose shape is used when there is no mask.
        output_key: key of the weight map.
    """

    def __init__(self, mask_key: str = "mask", label_key: str = "label", tumour_weight: float = 0.0,
                 ref_key: str = "source", output_key: str = "sampling_weight") -> None:
        super().__init__([ref_key], allow_missing_keys=False)
        if tumour_weight < 0:
            raise ValueError(f"tumour_weight must be >= 0, got {tumour_weight!r}.")
        self.mask_key, self.label_key, self.ref_key = mask_key, label_key, ref_key
        self.tumour_weight, self.output_key = float(tumour_weight), output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = torch.as_tensor(d[self.ref_key])
        mask = d.get(self.mask_key)
        weight = (torch.as_tensor(mask) > 0).float() if mask is not None else torch.ones_like(ref, dtype=torch.float32)
        label = d.get(self.label_key)
        if label is not None and self.tumour_weight > 0:
            weight = weight + self.tumour_weight * (torch.as_tensor(label) > 0).float()
        d[self.output_key] = weight
        return d
