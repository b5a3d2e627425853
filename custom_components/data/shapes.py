"""Volume sizes, as read from the headers, checked against the networks' strides and the metrics' windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np

from .datalist import DatalistError

__all__ = ["SSIM_WINDOW", "check_volume_sizes", "ras_shape", "slice_size_problem"]


def ras_shape(shape: Sequence[int], affine: Any = None) -> tuple[int, ...]:
    """The spatial ``shape`` of a 3D image with ``affine`` (its first three axes) after
    ``Orientationd(axcodes="RAS")``, the axes the networks see. Without an affine the axes are kept."""
    shape = tuple(int(s) for s in shape[:3])
    if affine is None:
        return shape
    try:
        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    except Exception:  # noqa: BLE001 - a degenerate affine: MONAI keeps the axes as they are
        return shape
    out = list(shape)
    for axis, (target, _) in enumerate(ornt):
        if not np.isnan(target):
            out[int(target)] = shape[axis]
    return tuple(out)


def slice_size_problem(shape: Sequence[int], inferer: Any) -> str | None:
    """Why a volume of RAS ``shape`` is too small for the networks run by ``inferer``, or ``None``.

    A :class:`~custom_components.inferers.inferer.WholeSliceInferer` pads each slice to a multiple of its ``divisor`` (the
    networks' total stride); at their deepest level the networks then see one element per ``divisor`` voxels, and
    their instance normalisation needs at least two. A slice covering a single cell (16 x 16 with divisor 16) fails
    there. Window inferers pad every window to ``roi_size`` (checked by ``check_patch_size``): no constraint here.
    """
    divisor, spatial_dim = getattr(inferer, "divisor", None), getattr(inferer, "spatial_dim", None)
    if not divisor or spatial_dim is None or len(shape) != 3:
        return None
    plane = [int(s) for i, s in enumerate(shape) if i != spatial_dim]
    if math.prod(math.ceil(s / divisor) for s in plane) >= 2:
        return None
    return (f"its slices are {plane[0]} x {plane[1]} voxels (axes of the RAS volume {tuple(shape)}), too small for "
            f"the networks: they reduce a slice by {divisor} and need at least 2 elements there, so one in-plane size "
            f"must be at least {divisor + 1} voxels")


#: the window of MONAI's SSIMMetric (validation and evaluation compute it over whole volumes): every axis needs it
SSIM_WINDOW = 11


def _header_shape(path: str) -> tuple[tuple[int, ...], Any]:
    """(shape, affine) of an image from its header only (NIfTI through nibabel, other formats through SimpleITK)."""
    if str(path).endswith((".nii", ".nii.gz")):
        image = nib.load(str(path))
        return tuple(int(s) for s in image.shape), image.affine
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(int(s) for s in reader.GetSize()), None


def check_volume_sizes(items: Sequence[dict], inferer: Any = None, key: str = "source", min_size: int = SSIM_WINDOW,
                       name: str = "datalist", why: str = "the SSIM window of the validation metrics") -> None:
    """Refuse, before any work, volumes too small for whole-volume validation or evaluation: an axis shorter than
    ``min_size`` (the SSIM window: a 48 x 48 x 1 volume failed in SSIM without naming the subject) or slices too
    small for the networks run by ``inferer`` (:func:`slice_size_problem`). Reads the headers only; the
    :class:`DatalistError` names every such subject and file."""
    problems = []
    for item in items:
        path = item.get(key)
        if not isinstance(path, str):
            continue
        try:
            shape, affine = _header_shape(path)
        except Exception:  # noqa: BLE001 - unreadable files are reported by the loader with their own message
            continue
        spatial = shape[:3]
        subject = item.get("subject", path)
        if len(spatial) < 3 or min(spatial) < min_size:
            problems.append(f"subject {subject}: {key} file {path} is {' x '.join(map(str, spatial))} voxels; every "
                            f"axis needs at least {min_size} voxels ({why}).")
            continue
        problem = slice_size_problem(ras_shape(spatial, affine), inferer)
        if problem:
            problems.append(f"subject {subject}: {key} file {path}: {problem}.")
    if problems:
        raise DatalistError(f"{name}: {len(problems)} volume(s) too small, found before any work:\n  "
                            + "\n  ".join(problems))
