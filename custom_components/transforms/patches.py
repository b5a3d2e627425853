"""The per-batch part of the training pipeline in one pass: crop, squeeze and flip every key by indexing.

The cached volumes are cropped with plain tensor slices (views), squeezed and flipped with ``torch`` calls, with the
same random draws as the chain it replaces, ``RandTableWeightedCropd`` -> ``SqueezeDimd`` -> ``RandFlipd`` inside an
:class:`~custom_components.transforms.dictionary.UntrackedCompose`, so the patches are identical (tested). What it saves is
MONAI's per-call machinery (a ``SpatialCrop`` and a ``Flip`` built and traced per patch and key): a fixed cost per
batch that shows behind short steps (``scripts/benchmark.py``'s data-wait stage, issue 19).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import RandFlipd
from monai.transforms.croppad.array import Crop
from monai.utils import ensure_tuple, fall_back_tuple

from .dictionary import RandTableWeightedCropd, UntrackedCompose

__all__ = ["FusedPatchd"]


class FusedPatchd(UntrackedCompose):
    """``num_samples`` patches per volume, each key cropped, optionally squeezed and randomly flipped in one pass.

    Random states are those of a ``Compose([RandTableWeightedCropd(...), SqueezeDimd(...), RandFlipd(...)])``: the
    centres come from the inner crop's generator (the cached table of ``SamplingTabled``, or the weight map), one
    flip draw per patch from the inner flip's, and ``set_random_state`` seeds both as that ``Compose`` would.
    Keys not cropped are deep-copied into every patch; the weight map and the table are not passed on.

    Args:
        keys: images to crop.
        w_key: weight map key.
        spatial_size: patch size (with a trailing 1 for 2D patches of 3D volumes).
        num_samples: patches per volume.
        squeeze_dim: dimension to squeeze after the crop (channel first; e.g. 3 for 2D patches), or ``None``.
        flip_prob: probability of flipping a patch.
        flip_axis: spatial axis (or axes) flipped, counted after the squeeze.
        table_key: key of the ``SamplingTabled`` table.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, w_key: str, spatial_size: Sequence[int] | int, num_samples: int = 1,
                 squeeze_dim: int | None = None, flip_prob: float = 0.5, flip_axis: int | Sequence[int] = 0,
                 table_key: str = "sampling_table", allow_missing_keys: bool = False) -> None:
        self.crop = RandTableWeightedCropd(keys, w_key, spatial_size, num_samples, table_key, allow_missing_keys)
        self.flip = RandFlipd(keys, prob=flip_prob, spatial_axis=flip_axis, allow_missing_keys=allow_missing_keys)
        super().__init__([self.crop, self.flip])
        if squeeze_dim is not None and squeeze_dim < 1:
            raise ValueError(f"squeeze_dim must be a spatial dimension (>= 1, channel first), got {squeeze_dim}.")
        self.squeeze_dim = squeeze_dim
        self.flip_dims = [int(a) + 1 for a in ensure_tuple(flip_axis)]

    def __call__(self, input_: Mapping[Hashable, torch.Tensor], start=0, end=None, threading=False,  # noqa: D102
                 lazy=None) -> list[dict]:
        crop, d = self.crop, dict(input_)
        weight, table = d.pop(crop.w_key, None), d.pop(crop.table_key, None)
        keys = list(crop.key_iterator(d))
        ref = weight if weight is not None else (d[keys[0]] if keys else None)
        if ref is None:
            raise ValueError(f"FusedPatchd: none of the keys {list(crop.keys)} and no weight map {crop.w_key!r} in "
                             f"the data (found {sorted(map(str, d))}).")
        crop.randomize(weight, table, ref.ndim - 1)
        size = fall_back_tuple(crop.cropper.spatial_size, ref.shape[1:])
        others = [k for k in d if k not in keys]
        patches = []
        for centre in crop.cropper.centers:
            region = (slice(None), *Crop.compute_slices(roi_center=centre, roi_size=size))
            self.flip.randomize(None)
            patch = {k: deepcopy(d[k]) for k in others}
            for k in keys:
                x = d[k][region]
                if isinstance(x, MetaTensor):
                    x = x.as_tensor()
                if self.squeeze_dim is not None:
                    if x.shape[self.squeeze_dim] != 1:
                        raise ValueError(f"FusedPatchd: cannot squeeze dimension {self.squeeze_dim} of {k!r}'s patch "
                                         f"of shape {tuple(x.shape)} (expected size 1).")
                    x = x.squeeze(self.squeeze_dim)
                patch[k] = torch.flip(x, self.flip_dims) if self.flip._do_transform else x
            patches.append(patch)
        return patches
