"""Datalists: loading and checking them before training, the built-in phantom, and batch preparation."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .readers import screen_image

__all__ = [
    "BRATS_LABELS",
    "DatalistError",
    "HU_AIR_MAX",
    "PrepareSourceTarget",
    "check_datalist",
    "check_patch_size",
    "check_splits",
    "checked_datalist",
    "ct_warning",
    "label_problems",
    "load_datalist",
    "read_datalist_json",
    "require_keys",
]

logger = logging.getLogger(__name__)


class DatalistError(ValueError):
    """A datalist names a missing, unreadable or inconsistent file; the message lists every problem found."""


def read_datalist_json(path: str | os.PathLike, name: str = "datalist", hint: str = "") -> dict:
    """The parsed content of a datalist JSON file; :class:`DatalistError` if it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"{name} {str(path)!r} does not exist{hint}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatalistError(f"{name} {str(path)!r} is not valid JSON: {e}") from None


def load_datalist(datalist: str | os.PathLike, section: str, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Read ``section`` (``training``/``validation``/``test``) of a MONAI datalist JSON, with absolute paths.

    Relative paths are resolved against ``base_dir`` (default: the datalist's folder). Non-path entries
    (``subject``) are kept as they are.
    """
    # not monai.data.load_decathlon_datalist: it joins an entry other than image/label to base_dir only when that path
    # exists, so a missing source/target/mask keeps its relative path (the checks would name the wrong file) and a
    # subject id becomes a path when a folder of that name exists (the phantom's layout)
    path = Path(datalist)
    content = read_datalist_json(path, hint=" (generate the phantom or point 'datalist' to a file)")
    if section not in content:
        raise DatalistError(f"datalist {str(path)!r} has no {section!r} list (found: {sorted(content)}).")
    items = content[section]
    if not isinstance(items, list) or not items:
        raise DatalistError(f"datalist {str(path)!r}: the {section!r} list is empty.")
    base = Path(base_dir) if base_dir is not None else path.parent
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatalistError(f"datalist {str(path)!r}: {section}[{i}] should be a dict of paths, got {item!r}.")
        out.append({k: (str(base / v) if isinstance(v, str) and k != "subject" else v) for k, v in item.items()})
        out[-1].setdefault("subject", Path(item.get("source", f"{section}_{i}")).parent.name or f"{section}_{i}")
    return out


#: BraTS segmentation labels: 0 background, 1 necrotic core, 2 oedema, 3 enhancing tumour (2023+), 4 enhancing (-2021)
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 3, 4)
#: a CT in Hounsfield units has air (about -1000 HU) around the body; a minimum above this is not HU
HU_AIR_MAX = -900.0


def label_problems(label: np.ndarray, mask: np.ndarray | None, path: str, allowed: Sequence[int] | None = None,
                   max_fraction: float = 0.5) -> list[str]:
    """What is wrong with tumour label ``label`` (file ``path``): values that are not whole non-negative numbers,
    values outside ``allowed`` (e.g. :data:`BRATS_LABELS`), or a tumour (``label > 0``) covering more than
    ``max_fraction`` of the foreground ``mask`` (of the whole image without a mask): a background coded as a
    non-zero value. Each problem names the file, what was expected and what was found."""
    label = np.asarray(label)
    values = np.unique(label[np.isfinite(label)])
    problems = []
    odd = values[(values < 0) | (values != np.round(values))]
    if odd.size:
        problems.append(f"label file {path} holds {odd.size} value(s) that are not class numbers "
                        f"({', '.join(f'{v:g}' for v in odd[:6])}); expected whole numbers >= 0")
    if allowed is not None:
        outside = [v for v in values if v >= 0 and v == round(v) and int(v) not in set(allowed)]
        if outside:
            problems.append(f"label file {path} holds value(s) {', '.join(f'{v:g}' for v in outside[:6])} outside "
                            f"{{{', '.join(map(str, allowed))}}} (the BraTS labels)")
    region = np.asarray(mask) > 0 if mask is not None and np.asarray(mask).shape == label.shape else None
    total = int(region.sum()) if region is not None else label.size
    tumour = int(((label > 0) & region).sum()) if region is not None else int((label > 0).sum())
    if total and tumour > max_fraction * total:
        where = "of the foreground mask" if region is not None else "of the image"
        problems.append(f"label file {path} marks {100 * tumour / total:.0f}% {where} as tumour (label > 0), more "
                        f"than {100 * max_fraction:.0f}%: is the background coded as a non-zero value?")
    return problems


def ct_warning(ct: np.ndarray, path: str, hu_air_max: float = HU_AIR_MAX) -> str | None:
    """A warning when CT ``ct`` (file ``path``) has no voxel near -1000 HU (air): minimum above ``hu_air_max``."""
    low = float(np.nanmin(np.asarray(ct))) if np.asarray(ct).size else float("nan")
    if not low <= hu_air_max:
        return (f"CT file {path} has no voxel near -1000 HU (air): its minimum is {low:g}, not below {hu_air_max:g}; "
                "values may not be in Hounsfield units (e.g. stored as 0..4095 without the rescale intercept)")
    return None


def check_datalist(items: Sequence[dict], image_keys: Sequence[str] = ("source", "target"),
                   aux_keys: Sequence[str] = ("label", "mask"), atol: float = 1e-3, check_values: bool = True,
                   name: str = "datalist", label_values: Sequence[int] | None = None, max_label_fraction: float = 0.5,
                   ct_key: str | None = None, hu_air_max: float = HU_AIR_MAX) -> Sequence[dict]:
    """Check every subject before training; raise :class:`DatalistError` listing all problems found.

    Checks: the list is not empty; no subject id or image file appears twice; every ``image_keys`` entry is
    present; every file passes :func:`custom_components.data.readers.screen_image` (exists, readable, one 3D volume
    with one channel, finite values when ``check_values``); images and any ``aux_keys`` files of a subject have the
    same spatial shape and affines equal within ``atol``; a ``label`` holds class numbers (whole, >= 0, within
    ``label_values`` when given) and its tumour covers at most ``max_label_fraction`` of the ``mask``
    (:func:`label_problems`). The ``ct_key`` image (a CT target) without a voxel near -1000 HU gets a warning naming
    the subject and the file (:func:`ct_warning`).

    Returns ``items`` unchanged, so the call can sit between a datalist and a dataset in a config.
    """

    if len(items) == 0:
        raise DatalistError(f"{name}: the list of subjects is empty.")
    problems: list[str] = _duplicates(items, image_keys)
    for i, item in enumerate(items):
        subject = item.get("subject", f"#{i}")
        ref: tuple[str, Any] | None = None
        arrays: dict[str, Any] = {}
        for key in list(image_keys) + [k for k in aux_keys if k in item]:
            if key not in item:
                problems.append(f"subject {subject}: no {key!r} entry (expected keys {list(image_keys)}).")
                continue
            path = item[key]
            img, problem = screen_image(path, what=f"{key} file", check_values=check_values)
            if problem is not None:
                problems.append(f"subject {subject}: {problem}.")
            if img is None:
                continue
            if key in ("label", "mask", ct_key):
                arrays[key] = img
            shape, affine = tuple(img.shape[:3]), np.asarray(img.affine)
            if ref is None:
                ref = (f"{key} {path}", (shape, affine))
                continue
            ref_shape, ref_affine = ref[1]
            if shape != ref_shape:
                problems.append(f"subject {subject}: {key} file {path} has shape {shape}, expected {ref_shape} like {ref[0]}.")
            elif not np.allclose(affine, ref_affine, atol=atol):
                problems.append(
                    f"subject {subject}: {key} file {path} has an affine different from {ref[0]} "
                    f"(max difference {np.abs(affine - ref_affine).max():.4g} > {atol})."
                )
        if "label" in arrays:
            mask = arrays.get("mask")
            problems += [f"subject {subject}: {p}{'' if p.endswith('?') else '.'}" for p in label_problems(
                np.asarray(arrays["label"]).reshape(arrays["label"].shape[:3]), None if mask is None else
                np.asarray(mask).reshape(mask.shape[:3]), item["label"], label_values, max_label_fraction)]
        if ct_key in arrays:
            warning = ct_warning(np.asarray(arrays[ct_key]), item[ct_key], hu_air_max)
            if warning:
                logger.warning("%s: subject %s: %s", name, subject, warning)
    if problems:
        raise DatalistError(f"{name}: {len(problems)} problem(s) found before training:\n  " + "\n  ".join(problems))
    logger.info("%s: %d subjects checked", name, len(items))
    return items


def _duplicates(items: Sequence[dict], image_keys: Sequence[str]) -> list[str]:
    """Subject ids and image files that appear more than once in one list."""
    problems = []
    ids: dict[str, list[int]] = {}
    files: dict[str, list[str]] = {}
    for i, item in enumerate(items):
        ids.setdefault(str(item.get("subject", f"#{i}")), []).append(i)
        for key in image_keys:
            if isinstance(item.get(key), str):
                files.setdefault(os.path.realpath(item[key]), []).append(str(item.get("subject", f"#{i}")))
    for sid, where in ids.items():
        if len(where) > 1:
            problems.append(f"subject id {sid} appears {len(where)} times (entries {where}).")
    for f, subjects in files.items():
        if len(subjects) > 1:
            problems.append(f"file {f} is listed {len(subjects)} times (subjects {', '.join(subjects)}).")
    return problems


def check_splits(training: Sequence[dict], validation: Sequence[dict], image_keys: Sequence[str] = ("source", "target"),
                 name: str = "datalist") -> None:
    """Refuse a subject (same id or same image file) in both the training and the validation list: it would leak
    into the choice of the best model. :class:`DatalistError` names every such subject."""
    def index(items):
        ids = {str(i.get("subject")) for i in items if i.get("subject") is not None}
        files = {os.path.realpath(i[k]): str(i.get("subject")) for i in items for k in image_keys if isinstance(i.get(k), str)}
        return ids, files

    (train_ids, train_files), (val_ids, val_files) = index(training), index(validation)
    problems = [f"subject id {s} is in both the training and the validation list." for s in sorted(train_ids & val_ids)]
    problems += [f"file {f} is in the training list (subject {train_files[f]}) and the validation list (subject "
                 f"{val_files[f]})." for f in sorted(set(train_files) & set(val_files))]
    if problems:
        leaked = (train_ids & val_ids) | {val_files[f] for f in set(train_files) & set(val_files)}
        raise DatalistError(f"{name}: {len(leaked)} subject(s) leak from training into validation:\n  "
                            + "\n  ".join(problems))


def require_keys(items: Sequence[dict], keys: Sequence[str], name: str = "datalist", why: str = "") -> Sequence[dict]:
    """:class:`DatalistError` naming every subject of ``items`` without one of ``keys``; ``items`` otherwise."""
    missing = [f"subject {item.get('subject', f'#{i}')}: no {k!r} entry" for i, item in enumerate(items)
               for k in keys if k not in item]
    if missing:
        raise DatalistError(f"{name}: {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} missing{why}:\n  "
                            + "\n  ".join(missing))
    return items


def _axis_strides(strides: Sequence[Any] | int, ndim: int) -> list[int]:
    """Total stride along each of ``ndim`` axes of a network whose levels have ``strides`` (one int per level, or a
    per-axis sequence per level, as MONAI's UNet takes them), or of a given total stride (an int)."""
    if isinstance(strides, (int, np.integer)):
        return [int(strides)] * ndim
    totals = [1] * ndim
    for level in strides:
        per_axis = [int(level)] * ndim if isinstance(level, (int, np.integer)) else [int(v) for v in level]
        if len(per_axis) != ndim:
            raise ValueError(f"a per-axis stride {list(level)} has {len(per_axis)} entries, expected {ndim}.")
        totals = [t * v for t, v in zip(totals, per_axis)]
    return totals


def check_patch_size(patch_size: Sequence[int], spatial_dims: int, strides: Mapping[str, Sequence[int] | int]) -> None:
    """The patch must have ``spatial_dims`` sizes, each a multiple of every network's total stride along its axis.

    ``strides`` maps a network name to its strides (one per level, each an int or a per-axis sequence) or its total
    stride.
    """
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {list(patch_size)} has {len(patch_size)} sizes, expected {spatial_dims} "
                         f"(spatial_dims is {spatial_dims}).")
    for net, st in strides.items():
        totals = _axis_strides(st, len(patch_size))
        bad = [int(p) for p, t in zip(patch_size, totals) if int(p) % t]
        if bad:
            shown = totals[0] if len(set(totals)) == 1 else totals
            raise ValueError(
                f"patch_size {list(patch_size)}: {bad} not a multiple of {shown}, the total stride of the {net} "
                f"(each size must be divisible by its axis's stride, e.g. "
                f"{[max(t, int(p) // t * t) for p, t in zip(patch_size, totals)]})."
            )
        deepest = [int(p) // t for p, t in zip(patch_size, totals)]
        if int(np.prod(deepest)) < 2:  # instance/batch norm of one element per channel fails in training
            raise ValueError(
                f"patch_size {list(patch_size)}: the {net} reduces it to {' x '.join(map(str, deepest))} at its deepest "
                f"level (total stride {totals[0] if len(set(totals)) == 1 else totals}), where normalisation has a "
                f"single element; make one size at least {2 * totals[0]} "
                f"(e.g. {[2 * totals[0]] + [int(p) for p in patch_size[1:]]})."
            )


def _is_brats(header: Mapping[str, Any]) -> bool:
    """Whether a datalist's header says its labels follow the BraTS convention: written by ``prepare_brats.py``
    (``"description": "BraTS ..."``) or the built-in t1t2 phantom, which mimics BraTS."""
    return str(header.get("description", "")).startswith("BraTS") or header.get("task") == "t1t2"


def checked_datalist(datalist: str | os.PathLike, section: str, require: Sequence[str] = (), why: str = "",
                     **check_args: Any) -> list[dict]:
    """The ``section`` list of ``datalist`` (:func:`load_datalist`), checked by :func:`check_datalist` and, when
    ``require`` names keys every entry must have, :func:`require_keys` (``why`` says what needs them).

    The datalist's header sets the value checks: a BraTS datalist (or the t1t2 phantom) has its labels checked
    against :data:`BRATS_LABELS`; a CT target (``"target_modality": "ct"`` or ``"task": "mrct"``) is checked for
    Hounsfield units.

    Errors name the list as ``"<section> list of <datalist>"``. Config use::

        "train_datalist": {"_target_": "custom_components.data.datalist.checked_datalist", "datalist": "@datalist",
                           "section": "training", "require": ["mask"], "why": "patches are sampled inside the mask"}
    """
    name = f"{section} list of {datalist}"
    header = read_datalist_json(datalist, hint=" (generate the phantom or point 'datalist' to a file)")
    header = header if isinstance(header, dict) else {}
    if _is_brats(header):
        check_args.setdefault("label_values", BRATS_LABELS)
    if str(header.get("target_modality", "")).lower() == "ct" or header.get("task") == "mrct":
        check_args.setdefault("ct_key", "target")
    items = check_datalist(load_datalist(datalist, section), name=name, **check_args)
    if require:
        require_keys(items, require, name=name, why=f" ({why})" if why else "")
    return items


class PrepareSourceTarget:
    """``prepare_batch`` for MONAI engines: ``(source, target)`` from a dict batch, moved to ``device``.

    With ``target_key=None`` (inference) the target is ``None``.
    """

    def __init__(self, source_key: str = "source", target_key: str | None = "target") -> None:
        self.source_key, self.target_key = source_key, target_key

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = [k for k in (self.source_key, self.target_key) if k is not None]
        for key in keys:
            if key not in batchdata:
                raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batchdata)}).")
        out = [torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking, **kwargs) for k in keys]
        return out[0], (out[1] if len(out) > 1 else None)


# --- sizes the networks and the metrics need, checked from the image headers before any work ----------------------


