"""A MONAI image reader backed by SimpleITK, for ``.mha``/``.mhd``/``.nrrd``/NIfTI files.

MONAI's :class:`monai.data.ITKReader` needs the ``itk`` package, which this project does not depend on. SimpleITK
reads the same formats; this reader returns the array and metadata in the convention of MONAI's ``ITKReader`` and
``NibabelReader``:

* the array is indexed ``(i, j, k)`` = ``(x, y, z)`` (the transpose of ``SimpleITK.GetArrayFromImage``, which is
  ``(z, y, x)``); multi-component pixels go last, ``(x, y, z, c)``;
* ``affine`` / ``original_affine`` map voxel indices to world coordinates in RAS (ITK works in LPS: the affine
  built from direction, spacing and origin has its first two rows negated), so ``LoadImage`` gives the same
  ``MetaTensor.affine`` as ``NibabelReader`` does for the same image stored as NIfTI;
* ``spatial_shape``, ``spacing``, ``pixdim`` (NIfTI layout: ``[qfac, sx, sy, sz, 1, ...]``), ``space`` and
  ``original_channel_dim`` (``nan`` = "no_channel" for single-component images).

Example (also as ``{"_target_": "custom_components.data.readers.SimpleITKReader"}`` in a config)::

    from monai.transforms import LoadImaged
    load = LoadImaged(keys=["source", "target"], reader=SimpleITKReader(), image_only=True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from monai.data import ImageReader, is_supported_format
from monai.data.utils import is_no_channel, orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = [
    "ITK_SUFFIXES", "SimpleITKReader", "SUPPORTED_SUFFIXES", "Screened", "load_image", "load_imaged", "screen_image",
    "sitk_affine",
]

#: File name endings read by :class:`SimpleITKReader`.
SUPPORTED_SUFFIXES: tuple[str, ...] = ("mha", "mhd", "nrrd", "nhdr", "nii", "nii.gz")
#: Endings the bundle reads with :class:`SimpleITKReader`; NIfTI is read by MONAI's default ``NibabelReader``.
ITK_SUFFIXES: tuple[str, ...] = ("mha", "mhd", "nrrd", "nhdr")


def sitk_affine(image: Any, lps_to_ras: bool = True) -> np.ndarray:
    """The ``(r+1, r+1)`` voxel-to-world affine of a SimpleITK image (``r = min(dimension, 3)``), RAS by default."""
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    sr = max(min(ndim, 3), 1)
    affine = np.eye(sr + 1)
    affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(spacing[:sr])
    affine[:sr, -1] = origin[:sr]
    return orientation_ras_lps(affine) if lps_to_ras else affine


class SimpleITKReader(ImageReader):
    """Load ``.mha``, ``.mhd``, ``.nrrd`` and ``.nii``/``.nii.gz`` images with SimpleITK.

    Args:
        channel_dim: channel dimension of the image; ``None`` gives ``original_channel_dim`` = ``nan``
            ("no_channel") for single-component images and ``-1`` for vector images; ``"no_channel"`` forces ``nan``.
        reverse_indexing: if ``True``, return the array in SimpleITK's ``(z, y, x)`` order; the default ``False``
            gives MONAI's ``(x, y, z)`` order. The metadata is the same either way.
        affine_lps_to_ras: convert the affine from ITK's LPS to RAS (default, as ``NibabelReader``).
        suffixes: file endings this reader accepts when ``LoadImage`` picks a reader by suffix.
        kwargs: extra arguments for ``SimpleITK.ReadImage`` (e.g. ``outputPixelType``).

    A list of files is read as channels: single-component images are stacked on a new first axis
    (``original_channel_dim`` = 0), vector images are concatenated along their last axis. All files of the list must
    have the same spatial shape and affine.
    """

    def __init__(self, channel_dim: str | int | None = None, reverse_indexing: bool = False,
                 affine_lps_to_ras: bool = True, suffixes: Sequence[str] = SUPPORTED_SUFFIXES, **kwargs: Any) -> None:
        super().__init__()
        self.suffixes = tuple(s.lstrip(".") for s in suffixes)
        if not (channel_dim is None or channel_dim == "no_channel" or isinstance(channel_dim, int)):
            raise ValueError(f"channel_dim must be None, 'no_channel' or an int, got {channel_dim!r}.")
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.reverse_indexing = reverse_indexing
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """Whether all of ``filename`` end with one of ``suffixes`` (default :data:`SUPPORTED_SUFFIXES`)."""
        return is_supported_format(filename, list(self.suffixes))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> Any:
        """Read one file (returns a ``SimpleITK.Image``) or several (returns a list of them)."""
        import SimpleITK as sitk

        filenames = ensure_tuple(data)
        if not filenames:
            raise ValueError("SimpleITKReader.read: no file name given.")
        kwargs_ = {**self.kwargs, **kwargs}
        images = []
        for name in filenames:
            name = str(name)
            if not Path(name).is_file():
                raise FileNotFoundError(f"SimpleITKReader: file {name!r} does not exist.")
            try:
                images.append(sitk.ReadImage(name, **kwargs_))
            except RuntimeError as e:
                raise RuntimeError(f"SimpleITKReader: cannot read {name!r} ({str(e).strip().splitlines()[-1]}).") from e
        return images if len(filenames) > 1 else images[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Array and metadata of one image, or of a list of images stacked as channels (see the class docstring)."""
        arrays: list[np.ndarray] = []
        meta: dict = {}
        images = list(img) if isinstance(img, (list, tuple)) else [img]  # a SimpleITK image is itself iterable
        for i, image in enumerate(images):
            data = self._get_array_data(image)
            header = self._get_meta_dict(image)
            if i == 0:
                meta = header
            else:
                for key in (MetaKeys.SPATIAL_SHAPE, MetaKeys.AFFINE):
                    if not np.allclose(header[key], meta[key]):
                        raise ValueError(
                            f"SimpleITKReader: image {i} of the list has {key} {header[key].tolist()}, different from "
                            f"the first image's {meta[key].tolist()}; channels must share one grid."
                        )
            arrays.append(data)
        if len(arrays) == 1:
            return arrays[0], meta
        if is_no_channel(meta[MetaKeys.ORIGINAL_CHANNEL_DIM]):
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta
        return np.concatenate(arrays, axis=int(meta[MetaKeys.ORIGINAL_CHANNEL_DIM])), meta

    def _get_array_data(self, image: Any) -> np.ndarray:
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, c)
        if self.reverse_indexing:
            return array
        if image.GetNumberOfComponentsPerPixel() == 1:
            return array.T
        return np.moveaxis(array.T, 0, -1)  # (c, x, y, z) -> (x, y, z, c)

    def _get_meta_dict(self, image: Any) -> dict:
        meta: dict[str, Any] = {}
        for key in image.GetMetaDataKeys():
            if not key.startswith("ITK_"):
                meta[key] = image.GetMetaData(key)
        ndim = image.GetDimension()
        sr = max(min(ndim, 3), 1)
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        affine = sitk_affine(image, self.affine_lps_to_ras)
        size = list(image.GetSize())
        if isinstance(self.channel_dim, int) and image.GetNumberOfComponentsPerPixel() == 1:
            size.pop(self.channel_dim)
        meta["spacing"] = spacing
        pixdim = np.ones(8)
        pixdim[0] = 1.0 if np.linalg.det(affine[:sr, :sr]) >= 0 else -1.0
        pixdim[1 : 1 + min(ndim, 7)] = spacing[:7]
        meta[MetaKeys.PIXDIM] = pixdim
        meta[MetaKeys.ORIGINAL_PIXDIM] = pixdim.copy()
        meta[MetaKeys.ORIGINAL_AFFINE] = affine
        meta[MetaKeys.AFFINE] = affine.copy()
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(size[:sr])
        meta[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
        if self.channel_dim is None:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = (
                float("nan") if image.GetNumberOfComponentsPerPixel() == 1 and ndim <= 3 else -1
            )
        else:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
        return meta


def load_imaged(keys: Any, **kwargs: Any):
    """MONAI ``LoadImaged`` that picks the reader by file ending: NIfTI with MONAI's default readers, ``.mha``,
    ``.mhd``, ``.nrrd`` with :class:`SimpleITKReader` (MONAI's ITK reader needs the ``itk`` package).

    Every format :func:`load_image` (and so the input screening, :func:`screen_image`) reads is read by this
    transform the same way.
    Config use: ``{"_target_": "custom_components.data.readers.load_imaged", "keys": "source", "image_only": true}``.
    """
    from monai.transforms import LoadImaged

    loader = LoadImaged(keys, reader=None, **kwargs)
    loader.register(SimpleITKReader(suffixes=ITK_SUFFIXES))
    return loader


def load_image(path: str | os.PathLike, **kwargs: Any):
    """Load one image as a MONAI ``MetaTensor``, with the readers of :func:`load_imaged`."""
    from monai.transforms import LoadImage

    loader = LoadImage(reader=None, image_only=True, **kwargs)
    loader.register(SimpleITKReader(suffixes=ITK_SUFFIXES))
    return loader(path)


class Screened(NamedTuple):
    """What :func:`screen_image` found: the loaded image (``None`` if it could not be loaded or has the wrong
    shape) and the problem (``None`` if the file is fine)."""

    image: Any
    problem: str | None


def screen_image(path: str | os.PathLike, what: str = "file", allow_channel: bool = True,
                 check_values: bool = True) -> Screened:
    """Check that one input file is a usable volume, loading it with :func:`load_image` (as the bundle reads it).

    The file must exist, be readable, hold one 3D volume with a single channel (a 4D file whose last axis has size
    1 is accepted when ``allow_channel``, as MONAI's readers treat it as a channel) and, when ``check_values``,
    only finite values. The problem names the file (as ``"<what> <path>"``, e.g. ``what="source file"``), what was
    expected and what was found. A file holding non-finite values is still returned with its problem, so callers
    can go on comparing it with the other files of a subject. Never raises for a bad file.

    Example::

        image, problem = screen_image("t1.nii.gz", what="source file")
    """
    name = f"{what} {path}"
    if not Path(path).is_file():
        return Screened(None, f"{name} does not exist")
    try:
        img = load_image(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported for this file only
        return Screened(None, f"{name} cannot be read ({type(e).__name__}: {str(e).strip()[:300]})")
    shape = tuple(int(s) for s in img.shape)
    one_channel = allow_channel and len(shape) == 4 and shape[-1] == 1
    if len(shape) != 3 and not one_channel:
        found = f"{shape[-1]} channels" if len(shape) == 4 and shape[-1] > 1 else f"a {len(shape)}D image"
        expected = "one 3D volume with a single channel" if allow_channel else "one 3D volume (no channel axis)"
        return Screened(None, f"{name} has shape {shape}, expected {expected} (found {found})")
    if check_values:
        import torch

        finite = torch.isfinite(torch.as_tensor(img))
        if not finite.all():
            return Screened(img, f"{name} contains {int((~finite).sum())} non-finite values (NaN/inf), expected "
                                 "finite values only")
    return Screened(img, None)

