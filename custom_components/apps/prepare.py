"""Datalists for BraTS and SynthRAD: screen every subject, split the accepted ones, write a MONAI datalist JSON.

:func:`prepare_brats` and :func:`prepare_synthrad` find the files of every subject folder
(:mod:`custom_components.utils.layouts`), screen each subject (files present and readable, 3D, same shape, affines equal
within ``atol``, finite values, a non-empty foreground mask; :func:`screen_subject`), split the accepted subjects
deterministically (:func:`split_subjects`) and write::

    {"task": ..., "split": {"seed", "rule", "counts", "training": [ids], ...},
     "rejected": [{"subject", "reason"}], "warnings": [{"subject", "warning"}],
     "training": [{"subject", "source", "target", "label"?, "mask"}], "validation": [...], "test": [...]}

Files inside the datalist's folder (such as the derived BraTS masks) are written relative to it, input files
outside it with absolute paths (:func:`relative_to_datalist`). Rejected subjects are reported and left out, never
silently. :func:`custom_components.apps.preprocess.preprocess` takes such a datalist further.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from ..data.datalist import BRATS_LABELS, label_problems
from ..utils.layouts import BRATS_MODALITIES, find_brats_files, find_synthrad_files, subject_dirs
from ..config.options import as_flag
from ..data.readers import screen_image
from .splits import SECTIONS, split_subjects, _check_fractions

__all__ = [
    "format_report",
    "prepare_brats",
    "prepare_synthrad",
    "relative_to_datalist",
    "run_per_subject",
    "screen_subject",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# splitting


# ---------------------------------------------------------------------------------------------------------------
# screening


def _write_mask(mask: np.ndarray, affine: np.ndarray, path: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(mask.astype(np.uint8), np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def screen_subject(job: dict[str, Any]) -> dict[str, Any]:
    """Screen one subject; never raises: every problem becomes a rejection reason.

    Each file is checked with :func:`custom_components.data.readers.screen_image` (without a channel axis); this
    function adds the checks across the subject's files.

    ``job`` holds ``subject``, ``files`` (datalist key -> path), ``problems`` (found while looking for files),
    ``atol``, and optionally ``derive_mask`` (output path of a foreground mask ``(source > 0) | (target > 0)`` with
    holes filled, written with the source's affine; an existing file with the same mask is left untouched, and one
    with another mask is replaced only if no other datalist uses it: ``mask_users`` names those that do),
    ``label_values`` (the values a ``label`` may hold, e.g. the BraTS labels; a label outside them, or whose tumour
    covers most of the mask, rejects the subject: :func:`custom_components.data.datalist.label_problems`), ``ct_key`` and
    ``hu_min`` (a warning if that image has no voxel below ``hu_min``, i.e. no air near -1000 HU: it does not look
    like Hounsfield units).

    Returns ``{"subject", "accepted", "reasons", "warnings", "files"}`` (``files`` includes the derived mask).
    """

    subject, files = job["subject"], dict(job["files"])
    reasons, warnings = list(job.get("problems", [])), []
    keep = {"source", "target", "mask", "label"} | ({job["ct_key"]} if job.get("ct_key") else set())
    arrays: dict[str, np.ndarray] = {}
    ref: tuple[str, tuple, np.ndarray] | None = None
    for key, path in files.items():
        # a 4D file with one channel is rejected here: the derived mask and the preprocessing expect 3D volumes
        img, problem = screen_image(path, what=f"{key} file", allow_channel=False)
        if problem is not None:
            reasons.append(problem)
        if img is None:
            continue
        array = np.asarray(img)
        shape, affine = tuple(array.shape), np.asarray(img.affine, dtype=np.float64)
        if ref is None:
            ref = (key, shape, affine)
        elif shape != ref[1]:
            reasons.append(f"shape mismatch: {key} {shape} vs {ref[0]} {ref[1]}")
        elif not np.allclose(affine, ref[2], atol=job["atol"]):
            reasons.append(f"affine mismatch: {key} differs from {ref[0]} by up to "
                           f"{np.abs(affine - ref[2]).max():.4g} (> atol {job['atol']:g})")
        if key in keep:
            arrays[key] = array
    mask = None
    if not reasons:
        if job.get("derive_mask"):
            from scipy import ndimage

            mask = ndimage.binary_fill_holes((arrays["source"] > 0) | (arrays["target"] > 0))
            if not mask.any():
                reasons.append("empty foreground: source and target are 0 everywhere (no brain voxel)")
        elif "mask" in arrays:
            mask = arrays["mask"] > 0
            if not mask.any():
                reasons.append(f"empty mask: {files['mask']} has no foreground voxel")
    if not reasons and "label" in arrays:

        reasons += label_problems(arrays["label"], mask, files["label"], job.get("label_values"))
    if not reasons and job.get("derive_mask"):
        problem = _save_derived_mask(mask, ref[2], job["derive_mask"], job.get("mask_users", []))  # type: ignore[index]
        if problem:
            reasons.append(problem)
        else:
            files["mask"] = job["derive_mask"]
    ct_key = job.get("ct_key")
    if not reasons and ct_key in arrays:
        low = float(arrays[ct_key].min())
        if low >= job.get("hu_min", -900.0):
            warnings.append(f"{ct_key} file {files[ct_key]} has no voxel near -1000 HU (air): its minimum is "
                            f"{low:g}, not below {job.get('hu_min', -900.0):g}; values may not be in Hounsfield units "
                            "(e.g. stored as 0..4095 without the rescale intercept)")
    return {"subject": subject, "accepted": not reasons, "reasons": reasons, "warnings": warnings, "files": files}


def _save_derived_mask(mask: np.ndarray, affine: np.ndarray, path: str, users: Sequence[str]) -> str | None:
    """Write the derived ``mask`` to ``path`` unless the same mask is there already; refuse (return the reason) to
    replace a different mask that other datalists (``users``) point to."""
    old = None
    if Path(path).is_file():
        try:
            import nibabel as nib

            old = np.asarray(nib.load(path).dataobj) > 0
        except Exception:  # noqa: BLE001 - an unreadable old mask is replaced (or refused below)
            old = None
        if old is not None and old.shape == mask.shape and np.array_equal(old, mask):
            return None  # the same mask: leave the file (and every datalist using it) as it is
        if users:
            found = f"{int(old.sum())} voxels" if old is not None else "an unreadable file"
            return (f"derived mask {path} is used by {', '.join(users)} and holds another mask ({found}, this "
                    f"subject's has {int(mask.sum())}); it is not replaced: prepare this datalist into another folder")
    _write_mask(mask, affine, path)
    return None


def _mask_users(folder: Path, exclude: Path) -> dict[str, list[str]]:
    """Resolved mask path -> the datalists (``*.json`` in ``folder`` other than ``exclude``) whose entries use it."""
    users: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.json")):
        if f.resolve() == exclude.resolve():
            continue
        try:
            content = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(content, dict):
            continue
        for section in SECTIONS:
            for item in content.get(section, []) if isinstance(content.get(section), list) else []:
                if isinstance(item, dict) and isinstance(item.get("mask"), str):
                    path = Path(item["mask"]) if os.path.isabs(item["mask"]) else folder / item["mask"]
                    users.setdefault(str(path.resolve()), []).append(str(f))
    return users


# ---------------------------------------------------------------------------------------------------------------
# running per subject and writing the datalist


def run_per_subject(fn: Callable[[dict], dict], jobs: list[dict], workers: int, desc: str,
                    on_error: Callable[[dict, BaseException], dict]) -> Iterator[dict]:
    """``fn`` over ``jobs`` (one per subject) with a tqdm bar, in ``workers`` processes (in this process if 1).

    Results are yielded as they finish; a job that raises (or whose worker dies) yields ``on_error(job, error)``
    instead, so one subject never stops the others. Also used by :func:`custom_components.apps.preprocess.preprocess`.
    """
    from tqdm import tqdm

    workers = int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    with tqdm(total=len(jobs), desc=desc, unit="subject") as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                try:
                    yield fn(job)
                except Exception as e:  # noqa: BLE001 - reported per subject
                    yield on_error(job, e)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = {pool.submit(fn, job): job for job in jobs}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as e:  # noqa: BLE001 - e.g. a worker killed by the OS
                    yield on_error(futures[future], e)
                bar.update()


def relative_to_datalist(path: str | os.PathLike, base: Path) -> str:
    """``path`` as a datalist in folder ``base`` records it: relative to ``base`` when inside it, absolute otherwise."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _prepare(name: str, jobs: list[dict], output: Path, info: dict[str, Any], fractions: Sequence[float],
             seed: int, workers: int, paper_split: bool) -> dict[str, Any]:
    """Screen ``jobs``, split the accepted subjects, write and return the datalist."""
    results = sorted(
        run_per_subject(screen_subject, jobs, workers, f"screening {name}",
                        lambda job, e: {"subject": job["subject"], "accepted": False, "files": {}, "warnings": [],
                                        "reasons": [f"screening failed ({type(e).__name__}: {e})"]}),
        key=lambda r: r["subject"],
    )
    accepted = {r["subject"]: r["files"] for r in results if r["accepted"]}
    datalist: dict[str, Any] = {
        **info,
        "num_screened": len(results),
        "num_accepted": len(accepted),
        "rejected": [{"subject": r["subject"], "reason": "; ".join(r["reasons"])}
                     for r in results if not r["accepted"]],
        "warnings": [{"subject": r["subject"], "warning": w} for r in results for w in r["warnings"]],
    }
    for item in datalist["rejected"]:
        logger.warning("%s: subject %s rejected: %s", name, item["subject"], item["reason"])
    for item in datalist["warnings"]:
        logger.warning("%s: subject %s: %s", name, item["subject"], item["warning"])
    try:
        split = split_subjects(sorted(accepted), seed=seed, fractions=fractions, paper_split=paper_split)
    except ValueError as e:
        raise ValueError(f"{name}: {e}\n{format_report(datalist, str(output))}") from None
    datalist["split"] = split
    base = output.parent
    for section in SECTIONS:
        datalist[section] = [{"subject": sid, **{k: relative_to_datalist(p, base) for k, p in accepted[sid].items()}}
                             for sid in split[section]]
    base.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(datalist, indent=2) + "\n")
    logger.info("%s: split %s (seed %d): %s", name, split["counts"], split["seed"], split["rule"])
    logger.info("%s: wrote %s", name, output)
    return datalist


def _check_output(output: str | os.PathLike, overwrite: bool) -> Path:

    output = Path(output)
    if output.suffix != ".json":
        raise ValueError(f"output must be a .json datalist file, got {str(output)!r}.")
    if output.exists() and not as_flag(overwrite, "overwrite"):
        raise FileExistsError(f"datalist {str(output)!r} already exists; pass overwrite=True (--overwrite true) "
                              "to replace it, or choose another --output.")
    return output


def format_report(datalist: dict[str, Any], output: str | None = None) -> str:
    """Human-readable summary of a prepared datalist: counts, split rule, rejected subjects and warnings."""
    lines = [f"{datalist.get('description', 'datalist')}{f': {output}' if output else ''}",
             f"  subjects screened: {datalist.get('num_screened', '?')}, "
             f"accepted: {datalist.get('num_accepted', '?')}, rejected: {len(datalist.get('rejected', []))}"]
    split = datalist.get("split")
    if split:
        counts = ", ".join(f"{k} {v}" for k, v in split["counts"].items())
        lines.append(f"  split (seed {split['seed']}, {split['rule']}): {counts}")
    if datalist.get("rejected"):
        lines.append("  rejected subjects:")
        lines += [f"    {r['subject']}: {r['reason']}" for r in datalist["rejected"]]
    if datalist.get("warnings"):
        lines.append("  warnings:")
        lines += [f"    {w['subject']}: {w['warning']}" for w in datalist["warnings"]]
    return "\n".join(lines)


def prepare_brats(root: str | os.PathLike, output: str | os.PathLike, source: str = "t1", target: str = "t2",
                  fractions: Sequence[float] = (0.56, 0.17, 0.27), seed: int = 0, workers: int = 1,
                  paper_split: bool = True, label: bool = True, atol: float = 1e-3,
                  overwrite: bool = False) -> dict[str, Any]:
    """Screen a BraTS folder (``<root>/<ID>/``, 2018-2021 or 2023+ naming) and write a ``source -> target`` datalist.

    Args:
        root: folder holding one folder per subject.
        output: datalist JSON to write; its folder also receives ``masks/<ID>_<a>_<b>_mask.nii.gz`` (BraTS has no
            brain mask: it is derived as ``(source > 0) | (target > 0)`` with holes filled, on the source's grid;
            ``a``, ``b`` are the two modalities it was derived from, sorted, so datalists of other modality pairs
            in the same folder never share a mask file; a mask another datalist uses is never replaced by a
            different one). Labels outside the BraTS values {0, 1, 2, 3, 4}, or marking most of the mask as
            tumour, reject the subject.
        source, target: modality names ``t1``, ``t1ce``, ``t2``, ``flair`` (``t1n``, ``t1c``, ``t2w``, ``t2f`` in
            2023+ files).
        fractions, seed, paper_split: see :func:`split_subjects`.
        workers: processes used for screening.
        label: require the tumour segmentation (``label`` entry); ``False`` leaves it out.
        atol: tolerance of the affine comparison between a subject's files.
        overwrite: replace an existing ``output``.

    Returns the datalist written.
    """

    for name, value in (("source", source), ("target", target)):
        if value not in BRATS_MODALITIES or value == "seg":
            raise ValueError(f"{name} must be one of t1, t1ce, t2, flair, got {value!r}.")
    if source == target:
        raise ValueError(f"source and target must differ, got {source!r} for both.")
    output = _check_output(output, overwrite)
    _check_fractions(fractions)
    label = as_flag(label, "label")

    jobs = []
    users = _mask_users(output.parent, output)
    pair = "_".join(sorted((source, target)))  # the mask is symmetric in its two modalities
    for folder in subject_dirs(root):
        files, problems = find_brats_files(folder, source, target, label=label)
        mask_path = output.parent / "masks" / f"{folder.name}_{pair}_mask.nii.gz"
        jobs.append({"subject": folder.name, "files": files, "problems": problems, "atol": float(atol),
                     "derive_mask": None if problems else str(mask_path), "label_values": list(BRATS_LABELS),
                     "mask_users": users.get(str(mask_path.resolve()), [])})
    info = {"description": f"BraTS {source} -> {target}", "task": f"{source}{target}", "source_modality": source,
            "target_modality": target, "root": str(Path(root).resolve()),
            "mask_rule": f"derived: ({source} > 0) | ({target} > 0), holes filled, on the source grid; "
                         f"masks/<ID>_{pair}_mask.nii.gz"}
    return _prepare("BraTS", jobs, output, info, fractions, seed, workers, as_flag(paper_split, "paper_split"))


def prepare_synthrad(root: str | os.PathLike, output: str | os.PathLike,
                     fractions: Sequence[float] = (0.56, 0.17, 0.27), seed: int = 0, workers: int = 1,
                     paper_split: bool = True, atol: float = 1e-3, hu_min: float = -900.0,
                     overwrite: bool = False) -> dict[str, Any]:
    """Screen a SynthRAD MR -> CT folder (``<root>/<ID>/{mr,ct,mask}.nii.gz`` or ``.mha``) and write a datalist.

    Items are ``source`` = mr, ``target`` = ct, ``mask`` = the body mask; the datalist records ``"task": "mrct"``.
    A CT with no voxel below ``hu_min`` (no air near -1000 HU) gets a warning naming the file (not a rejection).
    Other arguments as in
    :func:`prepare_brats`. ``.mha`` files need :class:`custom_components.data.readers.SimpleITKReader` to be loaded.
    """
    output = _check_output(output, overwrite)
    _check_fractions(fractions)
    jobs = []
    for folder in subject_dirs(root):
        files, problems = find_synthrad_files(folder)
        jobs.append({"subject": folder.name, "files": files, "problems": problems, "atol": float(atol),
                     "ct_key": "target", "hu_min": float(hu_min)})
    info = {"description": "SynthRAD MR -> CT", "task": "mrct", "source_modality": "mr", "target_modality": "ct",
            "root": str(Path(root).resolve())}

    return _prepare("SynthRAD", jobs, output, info, fractions, seed, workers, as_flag(paper_split, "paper_split"))
