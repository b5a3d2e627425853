"""Outputs written under a temporary name and renamed when complete, so a killed run leaves no incomplete file
under a final name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from monai.data import NibabelWriter

logger = logging.getLogger(__name__)

__all__ = ["AtomicNibabelWriter", "IMAGE_SUFFIXES", "PARTIAL_TAG", "partial_name", "remove_partial_outputs"]


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")

PARTIAL_TAG = ".partial-"  # temporary outputs: ".<name>.partial-<pid><ext>" beside the final file


def _split_ext(name: str) -> tuple[str, str]:
    for ext in (".nii.gz", *IMAGE_SUFFIXES):
        if name.endswith(ext):
            return name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, ext


def partial_name(path: str | os.PathLike, pid: int | None = None) -> Path:
    """The temporary name :class:`AtomicNibabelWriter` writes ``path`` under (same folder and extension, so the
    writer picks the same format and compression)."""
    path = Path(path)
    stem, ext = _split_ext(path.name)
    return path.with_name(f".{stem}{PARTIAL_TAG}{os.getpid() if pid is None else pid}{ext}")


def remove_partial_outputs(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of output ``path`` left by runs that were killed (their process is gone)."""
    path = Path(path)
    stem, ext = _split_ext(path.name)
    removed = []
    if path.parent.is_dir():
        for f in path.parent.glob(f".{stem}{PARTIAL_TAG}*{ext}"):
            pid = f.name[len(f".{stem}{PARTIAL_TAG}"): len(f.name) - len(ext)]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another live run is writing it
            logger.warning("removing %s, left by an interrupted inference", f)
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing each file under a temporary name in its folder, renamed when complete, and
    keeping every spatial axis of a single-channel image.

    A run killed while writing leaves only a hidden ``.<name>.partial-<pid>.nii.gz`` (removed by the next run's
    screening), never a truncated file under the output's name. ``NibabelWriter`` (through ``SaveImaged``'s
    ``squeeze_end_dims``) removes all trailing axes of size 1 after moving the channel last, so a 48 x 48 x 1 input
    would be written as a 2D image that has lost its third spacing (and without squeezing, every output would gain
    a fourth axis): this writer removes the channel axis only. For ``SaveImaged``:
    ``"writer": "custom_components.apps.writers.AtomicNibabelWriter"``.
    """

    def set_data_array(self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True,
                       **kwargs: Any) -> None:
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if channel_dim is not None and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        path = Path(filename)
        tmp = partial_name(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            super().write(str(tmp), verbose=False, **obj_kwargs)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if verbose:
            logger.info("written: %s", path)
