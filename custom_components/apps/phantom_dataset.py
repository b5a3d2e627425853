"""The phantom data set on disk: write it, reuse it when present, refuse to overwrite it silently.

:func:`write_phantom_dataset` writes the subjects simulated by :func:`custom_components.apps.phantom.make_subject` as
NIfTI files, ``<output_dir>/<subject_id>/<key>.nii.gz``, with a MONAI datalist ``<output_dir>/datalist.json`` (paths
relative to ``output_dir``) and the generation parameters ``<output_dir>/phantom.json`` (including the generator
``version`` and, for ``t1t2``, the ``tumour_mode``). A complete data set with the same parameters is reused, an
incomplete one completed; anything else (another ``tumour_mode``, or one made by an older generator version) is only
replaced with ``overwrite=True``.
:func:`ensure_phantom` is the entry point of the bundle configs.

Example::

    from custom_components.apps.phantom_dataset import ensure_phantom
    datalist = ensure_phantom("data/phantom_t1t2", task="t1t2", seed=0)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .phantom import (
    DEFAULT_TUMOUR_MODE,
    PHANTOM_VERSION,
    TASKS,
    check_shape,
    check_spacing,
    check_task,
    check_tumour_mode,
    make_subject,
    subject_rng,
)
from ..config.options import as_flag
from ..engines.distributed import main_rank_only

__all__ = [
    "prepare_phantom","ensure_phantom", "make_affine", "subject_id", "write_phantom_dataset"]

logger = logging.getLogger(__name__)

#: Datalist key -> image key, per task.
_DATALIST_KEYS: dict[str, dict[str, str]] = {
    "t1t2": {"source": "t1", "target": "t2", "label": "seg", "mask": "brainmask"},
    "mrct": {"source": "mr", "target": "ct", "mask": "mask"},
}

_SUBJECT_DIR_RE = re.compile(r"^phantom_(t1t2|mrct)_\d+$")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return int(value)


def make_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine with diagonal ``spacing`` and the origin placed so the volume is centred."""
    affine = np.diag([float(s) for s in spacing] + [1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * np.asarray(spacing, dtype=np.float64)
    return affine


def subject_id(task: str, index: int) -> str:
    """Subject identifier, e.g. ``phantom_t1t2_000``."""
    return f"phantom_{task}_{index:03d}"


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib  # imported lazily: keeps importing this module cheap

    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(path))


def _parameters(
    task: str,
    n_train: int,
    n_val: int,
    n_test: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int,
    tumour_mode: str,
) -> dict[str, Any]:
    return {
        "generator": "custom_components.apps.phantom",  # the simulation module, whose version follows
        "version": PHANTOM_VERSION,
        "task": task,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "shape": list(shape),
        "spacing": list(spacing),
        "seed": seed,
        # mrct has no tumour: the option does not change its arrays and is recorded as null
        "tumour_mode": tumour_mode if task == "t1t2" else None,
    }


def _expected_files(params: dict[str, Any]) -> list[str]:
    """Relative paths of every image a data set with ``params`` consists of."""
    n_total = params["n_train"] + params["n_val"] + params["n_test"]
    return [
        f"{subject_id(params['task'], i)}/{key}.nii.gz" for i in range(n_total) for key in TASKS[params["task"]]
    ]


def _differences(old: Any, new: dict[str, Any]) -> list[str]:
    if not isinstance(old, dict):
        return [f"phantom.json is not a parameter dict: {old!r}"]
    return [f"{k}: existing {old.get(k)!r} != requested {new[k]!r}" for k in new if old.get(k) != new[k]]


def write_phantom_dataset(
    output_dir: str | os.PathLike[str],
    task: str = "t1t2",
    n_train: int = 16,
    n_val: int = 4,
    n_test: int = 4,
    shape: Sequence[int] = (96, 96, 48),
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    seed: int = 0,
    overwrite: bool = False,
    tumour_mode: str = DEFAULT_TUMOUR_MODE,
) -> str:
    """Write a phantom data set and its MONAI datalist; return the datalist path.

    Layout: ``<output_dir>/<subject_id>/<key>.nii.gz``, ``<output_dir>/datalist.json``
    (``{"task", "training", "validation", "test"}``, image paths relative to
    ``output_dir``) and ``<output_dir>/phantom.json`` (generation parameters).

    Never overwrites silently: if ``output_dir`` holds a complete data set with the
    same parameters it is reused (an incomplete one is completed); if it holds one
    with other parameters, or files that are not a phantom data set,
    :class:`FileExistsError` is raised. ``overwrite=True`` always regenerates: it
    removes the previous phantom subject folders, ``datalist.json`` and
    ``phantom.json``, and leaves unrelated files alone.

    Args:
        output_dir: target folder (created if missing).
        task: ``"t1t2"`` or ``"mrct"``.
        n_train: number of training subjects (>= 1).
        n_val: number of validation subjects (>= 0).
        n_test: number of test subjects (>= 0).
        shape: volume shape, at least 32 voxels per axis.
        spacing: voxel size in millimetres.
        seed: non-negative seed; subject ``i`` uses ``subject_rng(seed, i)``.
        overwrite: regenerate even if a data set is present (replacing it).
        tumour_mode: ``"learnable"`` (default: the tumour's T2 is a function of its T1) or ``"irreducible"``
            (version 1's tumour texture, absent from T1); see :mod:`custom_components.apps.phantom`. Validated for
            ``mrct`` too, but ignored there (no tumour) and recorded as ``null``.

    Returns:
        Path of ``datalist.json`` as a string.
    """
    task = check_task(task)
    tumour_mode = check_tumour_mode(tumour_mode)
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 0)
    n_test = _check_int("n_test", n_test, 0)
    shape = check_shape(shape)
    spacing = check_spacing(spacing)
    seed = _check_int("seed", seed, 0)
    params = _parameters(task, n_train, n_val, n_test, shape, spacing, seed, tumour_mode)

    out = Path(output_dir)
    datalist_path = out / "datalist.json"
    params_path = out / "phantom.json"
    expected = _expected_files(params)

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if params_path.is_file():
            try:
                old = json.loads(params_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                old = f"<unreadable: {err}>"
            diff = _differences(old, params)
            if not diff and not overwrite:
                if datalist_path.is_file() and all((out / f).is_file() for f in expected):
                    logger.info("phantom data set already present in %s, reusing it", out)
                    return str(datalist_path)
                logger.warning("phantom data set in %s is incomplete; generating it again", out)
            elif not overwrite:
                raise FileExistsError(
                    f"output_dir {str(out)!r} holds a phantom data set with different parameters "
                    f"({'; '.join(diff)}); pass overwrite=True to replace it or choose another folder"
                )
        elif not overwrite:
            entries = sorted(p.name for p in out.iterdir())
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FileExistsError(
                f"output_dir {str(out)!r} is not empty and holds no phantom data set (found: {shown}); "
                "pass overwrite=True to write into it or choose another folder"
            )
        if overwrite:
            logger.info("overwrite=True: removing the previous phantom data set in %s", out)
            for entry in out.iterdir():
                if entry.is_dir() and _SUBJECT_DIR_RE.match(entry.name):
                    shutil.rmtree(entry)
            for name in ("datalist.json", "phantom.json"):
                (out / name).unlink(missing_ok=True)

    out.mkdir(parents=True, exist_ok=True)
    datalist_path.unlink(missing_ok=True)  # the datalist is written last: it marks completion
    params_path.write_text(json.dumps(params, indent=2) + "\n")

    affine = make_affine(shape, spacing)
    splits = (("training", n_train), ("validation", n_val), ("test", n_test))
    datalist: dict[str, Any] = {"task": task}
    index = 0
    n_total = n_train + n_val + n_test
    for split, count in splits:
        items = []
        for _ in range(count):
            sid = subject_id(task, index)
            arrays = make_subject(task, shape, spacing, subject_rng(seed, index), tumour_mode=tumour_mode)
            (out / sid).mkdir(exist_ok=True)
            for key in TASKS[task]:
                _save_nifti(arrays[key], affine, out / sid / f"{key}.nii.gz")
            item = {"subject": sid}
            item.update({dl_key: f"{sid}/{img_key}.nii.gz" for dl_key, img_key in _DATALIST_KEYS[task].items()})
            items.append(item)
            index += 1
            logger.info("phantom %s: wrote subject %d/%d (%s, %s)", task, index, n_total, sid, split)
        datalist[split] = items

    tmp = datalist_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(datalist, indent=2) + "\n")
    tmp.replace(datalist_path)
    logger.info("phantom data set written to %s", out)
    return str(datalist_path)


def ensure_phantom(output_dir: str | os.PathLike[str], **kwargs: Any) -> str:
    """Generate the phantom data set in ``output_dir`` unless it is already there.

    Same arguments and behaviour as :func:`write_phantom_dataset` (a complete data
    set with the same parameters is reused, a different one raises
    :class:`FileExistsError`); meant for a bundle config's ``initialize`` step.
    Returns the datalist path.
    """
    return write_phantom_dataset(output_dir, **kwargs)


def prepare_phantom(dataset_dir: str | os.PathLike, phantom: Mapping[str, Any],
                    enabled: bool | str = True) -> str | None:
    """Generate the built-in phantom data set in ``dataset_dir`` (once, on rank 0) unless it is there already.

    ``phantom`` holds the arguments of :func:`custom_components.apps.phantom_dataset.ensure_phantom` (``task``, ``n_train``,
    ...). Returns the datalist path, or ``None`` when not ``enabled`` (which may be command-line text: train.json's
    ``make_phantom``).
    """
    if not as_flag(enabled, "make_phantom"):
        return None
    return main_rank_only(ensure_phantom, dataset_dir, **phantom)
