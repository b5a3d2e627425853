"""Invertible intensity normalisation per modality, and weighted patch sampling with a per-volume cached table.

MRI has no absolute scale, so it is mapped to [b_min, b_max] by percentiles computed inside the foreground;
CT is mapped by a fixed Hounsfield window. The parameters used are recorded in the image's MONAI
``applied_operations`` so that :meth:`InvertibleIntensityWindowd.inverse` (or MONAI's ``Invertd``) can map a
prediction back to the original scale.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose, InvertibleTransform, MapTransform, RandWeightedCropd
from monai.utils import TraceKeys, fall_back_tuple

__all__ = ["InvertibleIntensityWindowd", "SamplingWeightd", "SamplingTabled", "CropToSamplingRegiond",
           "RandTableWeightedCropd", "UntrackedCompose"]


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


# Not MONAI's FgBgToIndicesd/ClassesToIndicesd (with RandCropByPosNegLabeld/RandCropByLabelClassesd): they draw a class
# with a fixed ratio, then a voxel uniformly inside it; here every voxel has its own weight (foreground 1, tumour
# 1 + tumour_weight, plus ErrorWeightedSampling's continuous error term), which only a weight map can express.
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


def _valid_region(weight_shape: Sequence[int], spatial_size: Sequence[int]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of the patch centres that keep a ``spatial_size`` patch inside the image, and their offset.

    The same 'valid' region as MONAI's ``weighted_patch_samples``.
    """
    img = np.asarray(weight_shape, dtype=int)
    win = np.asarray(fall_back_tuple(spatial_size, img), dtype=int)
    region = tuple(slice(w // 2, m - w + w // 2) if m > w else slice(m // 2, m // 2 + 1) for w, m in zip(win, img))
    return region, np.minimum(win, img) // 2


class SamplingTabled(MapTransform):
    """Cumulative sampling table of a weight map, computed once per volume (deterministic, so ``CacheDataset``
    caches it).

    MONAI's ``RandWeightedCropd`` computes the cumulative sum of the whole weight map on every draw; on a BraTS-size
    volume (9 million voxels) that, and copying the map, is most of the loader's work. This transform stores the
    flat indices (int32) of the voxels with a positive weight inside the valid centre region and, unless all those
    weights are equal, the cumulative sum of their weights (float64), so :class:`RandTableWeightedCropd` draws
    centres by a binary search only; with equal weights (centres uniform inside the mask, the default) no sum is
    stored and the draw is the same as MONAI's from the same random state.

    Args:
        w_key: the weight map (channel-first, one channel), e.g. from :class:`SamplingWeightd`.
        spatial_size: patch size of the crop that will use the table (the valid centre region depends on it).
        table_key: key of the table.
        keep_weight: keep the weight map in the data. Without it (``False``) the table alone is the sampling
            distribution and the map's memory is freed; ``ErrorWeightedSampling`` (``hard_sampling``) needs the map.
    """

    def __init__(self, w_key: str = "sampling_weight", spatial_size: Sequence[int] | int = 96,
                 table_key: str = "sampling_table", keep_weight: bool = True) -> None:
        super().__init__([w_key], allow_missing_keys=False)
        self.w_key, self.table_key = w_key, table_key
        self.spatial_size, self.keep_weight = spatial_size, bool(keep_weight)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        weight = torch.as_tensor(d[self.w_key])
        if weight.ndim < 2 or weight.shape[0] != 1:
            raise ValueError(f"{self.w_key!r} must be a channel-first map with one channel, got shape "
                             f"{tuple(weight.shape)}.")
        region, offset = _valid_region(weight.shape[1:], _ensure_size(self.spatial_size, weight.ndim - 1))
        valid = weight[0][region].reshape(-1)
        if (valid < 0).any():
            raise ValueError(f"{self.w_key!r} has negative weights (min {float(valid.min())}); weights must be >= 0.")
        index = torch.nonzero(valid > 0).reshape(-1)
        if valid.numel() >= 2**31:
            raise ValueError(f"{self.w_key!r} has {valid.numel()} valid centres, more than int32 indices can hold.")
        values = valid[index]
        uniform = values.numel() == 0 or bool(values.min() == values.max())
        if not self.keep_weight:
            d.pop(self.w_key)
        d[self.table_key] = {
            "index": index.to(torch.int32), "cdf": None if uniform else torch.cumsum(values.double(), 0),
            "n_valid": int(valid.numel()), "valid_shape": tuple(int(s) for s in weight[0][region].shape),
            "offset": tuple(int(o) for o in offset), "spatial_size": self.spatial_size,
            # the map the table was made from (a reference, no copy): a replaced map is detected by identity
            "weight": d[self.w_key] if self.keep_weight else None,
        }
        return d


class CropToSamplingRegiond(MapTransform):
    """Crop every key to the bounding box of the positive sampling weights plus the half patch around it.

    A patch centred on a voxel of positive weight lies inside this box (MONAI's ``CropForegroundd`` on the weight
    map with a margin of half the patch, rounded up, clipped to the image), so the voxels outside it, never part of a training
    patch, are not kept. The cropped volumes are copies: the full-size arrays are freed (a cropped view would keep
    them). The valid centres of positive weight inside the box are those of the full volume, shifted, in the same
    order, so :class:`SamplingTabled` + :class:`RandTableWeightedCropd` (or ``RandWeightedCropd``) draw the same
    patches from the same random state as on the uncropped volume. When no centre of positive weight is valid
    (e.g. a mask touching only the image border) the volume is left as it is: the draw is then uniform over the
    whole image, as before.

    Args:
        keys: keys to crop (same spatial shape as the weight map); the weight map is cropped too.
        w_key: the weight map, e.g. from :class:`SamplingWeightd`.
        spatial_size: patch size of the training crop.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, w_key: str = "sampling_weight", spatial_size: Sequence[int] | int = 96,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.w_key, self.spatial_size = w_key, spatial_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.transforms import CropForegroundd

        d = dict(data)
        weight = d[self.w_key]
        size = _ensure_size(self.spatial_size, weight.ndim - 1)
        keys = [k for k in dict.fromkeys([*self.keys, self.w_key]) if k in d or not self.allow_missing_keys]
        # margin ceil(w / 2): MONAI's valid centres end one voxel short of the last patch that fits
        crop = CropForegroundd(keys, source_key=self.w_key, margin=[s - s // 2 for s in size], allow_smaller=True,
                               allow_missing_keys=self.allow_missing_keys)
        start, end = crop.cropper.compute_bounding_box(torch.as_tensor(weight))
        if any(int(e) - int(b) < s for b, e, s in zip(start, end, size)):  # no valid centre of positive weight
            return d
        if all(int(b) == 0 for b in start) and tuple(int(e) for e in end) == tuple(weight.shape[1:]):
            return d  # nothing to cut
        out = crop(d)
        for key in keys:
            if key in out:  # copies, so the full-size storage is released
                out[key] = out[key].clone(memory_format=torch.contiguous_format)
        return out


def _ensure_size(spatial_size: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
    """``spatial_size`` as a tuple of ``ndim`` entries (an int is repeated)."""
    if isinstance(spatial_size, int):
        return (spatial_size,) * ndim
    return tuple(int(s) for s in spatial_size)


class RandTableWeightedCropd(RandWeightedCropd):
    """``RandWeightedCropd`` drawing its centres from the cached table of :class:`SamplingTabled`.

    For the same random state it draws exactly the centres ``RandWeightedCropd`` would (the table is the cumulative
    weight sum without its zero-weight entries), without touching the whole weight map. If the table is missing or
    was not made from the weight map in the data (e.g. ``ErrorWeightedSampling`` replaced the map), it falls back to
    ``RandWeightedCropd``'s own draw, so the sampling is always the weight map's. Without a weight map in the data
    (``SamplingTabled(keep_weight=False)``) the table is the distribution.

    The weight map and the table are not passed on to the patches (they are whole-volume data that no later step
    uses), which saves copying them once per patch.

    Args:
        keys: images to crop.
        w_key: weight map key.
        spatial_size: patch size.
        num_samples: patches per volume.
        table_key: key of the :class:`SamplingTabled` table.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, w_key: str, spatial_size: Sequence[int] | int, num_samples: int = 1,
                 table_key: str = "sampling_table", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, w_key, spatial_size, num_samples, allow_missing_keys)
        self.table_key = table_key

    def _table_fits(self, weight: torch.Tensor | None, table: Any, ndim: int) -> bool:
        if not (isinstance(table, dict) and table.get("spatial_size") is not None
                and _ensure_size(table["spatial_size"], ndim) == _ensure_size(self.cropper.spatial_size, ndim)):
            return False
        return weight is None or table.get("weight") is weight

    def randomize(self, weight_map: torch.Tensor | None, table: dict | None = None,  # type: ignore[override]
                  ndim: int | None = None) -> None:
        ndim = (weight_map.ndim - 1) if ndim is None else ndim
        if table is None or not self._table_fits(weight_map, table, ndim):
            if weight_map is None:
                raise ValueError(f"no weight map {self.w_key!r} and no table for patch size "
                                 f"{self.cropper.spatial_size} ({self.table_key!r}): nothing to sample from.")
            super().randomize(weight_map)
            return
        r_state, n = self.cropper.R, self.cropper.num_samples
        index, cdf = table["index"], table["cdf"]
        if index.numel() == 0 or (cdf is not None and not float(cdf[-1]) > 0):  # no positive weight: uniform
            flat = r_state.randint(0, table["n_valid"], size=n)
        elif cdf is None:  # equal weights: floor(r * n) is the entry searchsorted would find on the sum 1, 2, ...
            r = np.asarray(r_state.random(n), dtype=np.float64)
            flat = index.numpy()[np.minimum((r * index.numel()).astype(np.int64), index.numel() - 1)]
        else:
            r = torch.as_tensor(r_state.random(n), dtype=cdf.dtype)
            flat = index[torch.searchsorted(cdf, r * cdf[-1], right=True).clamp(max=cdf.numel() - 1)].numpy()
        self.cropper.centers = [np.asarray(np.unravel_index(int(i), table["valid_shape"])) + np.asarray(table["offset"])
                                for i in flat]

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> list[dict]:
        d = dict(data)
        weight, table = d.pop(self.w_key, None), d.pop(self.table_key, None)
        ref = next((d[k] for k in self.key_iterator(d)), None)
        ndim = (weight.ndim if weight is not None else (ref.ndim if ref is not None else 1)) - 1
        self.randomize(weight, table, ndim)
        n = self.cropper.num_samples
        ret: list[dict] = [dict(d) for _ in range(n)]
        for i in range(n):
            for key in set(d).difference(self.keys):
                ret[i][key] = deepcopy(d[key])
        lazy_ = self.lazy if lazy is None else lazy
        for key in self.key_iterator(d):
            for i, im in enumerate(self.cropper(d[key], randomize=False, lazy=lazy_)):
                ret[i][key] = im
        return ret


class UntrackedCompose(Compose):
    """A ``Compose`` whose transforms run with MONAI's metadata tracking switched off (plain tensors out).

    For the per-patch random part of the training pipeline (crop, squeeze, flip): nothing after it reads the
    metadata, and tracking it for 8 patches x 4 keys cost about 20 ms per batch at 240 x 240 x 155, against 6 ms
    without (``scripts/benchmark.py``'s data wait). It is a ``Compose``, hence randomisable: ``CacheDataset`` caches
    the transforms before it and seeds the ones inside through ``set_random_state``.

    MONAI keeps the switch in one module-level flag (``monai.data.set_track_meta``); it is set for the duration of
    the call and restored afterwards, also on error. With the default loader it runs between training steps in the
    main process; loader worker processes each have their own flag; with ``ThreadDataLoader`` its thread is the only
    caller during an epoch, and validation, which needs the metadata, runs between epochs.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):  # noqa: D102 (Compose's signature)
        before = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        finally:
            set_track_meta(before)


