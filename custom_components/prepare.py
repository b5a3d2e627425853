"""Datalist preparation for BraTS and SynthRAD, and SimpleITK preprocessing of a datalist.

Preparation (:func:`prepare_brats`, :func:`prepare_synthrad`) finds the files of every subject folder, screens each
subject (files present and readable, 3D, same shape, affines equal within ``atol``, finite values, a non-empty
foreground mask), splits the accepted subjects deterministically (:func:`split_subjects`) and writes a MONAI
datalist JSON::

    {"task": ..., "split": {"seed", "rule", "counts", "training": [ids], ...},
     "rejected": [{"subject", "reason"}], "warnings": [{"subject", "warning"}],
     "training": [{"subject", "source", "target", "label"?, "mask"}], "validation": [...], "test": [...]}

Files inside the datalist's folder (such as the derived BraTS masks) are written relative to it, input files
outside it with absolute paths. Rejected subjects are reported and left out, never silently.

Preprocessing (:func:`preprocess`) runs, per subject: N4 bias-field correction of the MR images
(:func:`n4_bias_correction`), optional rigid registration of the source onto the target
(:func:`rigid_register`) and resampling of every image onto one grid (the target's, optionally at a new spacing;
:func:`target_grid`, :func:`resample_onto`). It writes ``<output_dir>/<subject>/<key>.nii.gz``, a datalist
``<output_dir>/datalist.json`` and a log ``<output_dir>/preprocess_log.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BRATS_MODALITIES",
    "PAPER_SPLIT",
    "SECTIONS",
    "find_brats_files",
    "find_synthrad_files",
    "format_report",
    "n4_bias_correction",
    "prepare_brats",
    "prepare_synthrad",
    "preprocess",
    "preprocess_subject",
    "resample_onto",
    "rigid_register",
    "screen_subject",
    "split_subjects",
    "target_grid",
]

logger = logging.getLogger(__name__)

#: Datalist sections, in order.
SECTIONS: tuple[str, ...] = ("training", "validation", "test")

#: Training/validation/test counts of the paper's BraTS split (354 subjects).
PAPER_SPLIT: tuple[int, int, int] = (200, 60, 94)

#: Modality option -> (file suffix in BraTS 2018-2021 naming, file suffix in BraTS 2023+ naming).
BRATS_MODALITIES: dict[str, tuple[str, str]] = {
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f"),
    "seg": ("seg", "seg"),
}

#: BraTS naming: layout name -> (separator after the subject id, index into the BRATS_MODALITIES tuples).
_BRATS_LAYOUTS: dict[str, tuple[str, int]] = {"2018-2021": ("_", 0), "2023+": ("-", 1)}

_NIFTI_EXTS = (".nii.gz", ".nii")
_SYNTHRAD_EXTS = (".nii.gz", ".nii", ".mha")


# ---------------------------------------------------------------------------------------------------------------
# splitting


def split_subjects(subjects: Sequence[str], seed: int = 0, fractions: Sequence[float] = (0.56, 0.17, 0.27),
                   paper_split: bool = True) -> dict[str, Any]:
    """Deterministic training/validation/test split of subject ids.

    The ids are sorted, then shuffled with ``numpy.random.default_rng(seed)``, so the split depends only on the set
    of ids and the seed. With ``paper_split`` and at least 354 subjects, the first 200 shuffled ids go to training,
    the next 60 to validation and all the others to test (94, plus any subject beyond 354: extra subjects never
    change the training protocol). Otherwise validation and test get ``round(fraction * n)`` subjects each, at least
    one, and training the rest.

    Returns ``{"seed", "rule", "counts", "training", "validation", "test"}`` with sorted id lists per section.
    """
    ids = [str(s) for s in subjects]
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise ValueError(f"subject ids must be unique, got duplicates {dup[:5]}.")
    fractions = _check_fractions(fractions)
    n = len(ids)
    if n < 3:
        raise ValueError(f"at least 3 accepted subjects are needed for training/validation/test splits, got {n}.")
    order = [sorted(ids)[i] for i in np.random.default_rng(int(seed)).permutation(n)]
    if paper_split and n >= sum(PAPER_SPLIT):
        n_train, n_val = PAPER_SPLIT[0], PAPER_SPLIT[1]
        extra = n - sum(PAPER_SPLIT)
        rule = f"paper split {PAPER_SPLIT[0]}/{PAPER_SPLIT[1]}/{PAPER_SPLIT[2]}"
        rule += f" (+{extra} subject(s) beyond {sum(PAPER_SPLIT)} added to test)" if extra else ""
    else:
        n_val = max(1, int(np.floor(fractions[1] * n + 0.5)))
        n_test = max(1, int(np.floor(fractions[2] * n + 0.5)))
        while n - n_val - n_test < 1:  # keep at least one training subject
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        n_train = n - n_val - n_test
        rule = "fractions " + "/".join(f"{f:g}" for f in fractions)
        if paper_split:
            rule += f" (fewer than {sum(PAPER_SPLIT)} subjects for the paper split)"
    sections = {
        "training": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }
    return {"seed": int(seed), "rule": rule, "counts": {k: len(v) for k, v in sections.items()}, **sections}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if isinstance(fractions, str) or len(fractions) != 3:
        raise ValueError(f"fractions must be 3 numbers (training, validation, test), got {fractions!r}.")
    values = tuple(float(f) for f in fractions)
    if min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions!r} (sum {sum(values):g}).")
    return values  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# finding files


def _find_with_ext(folder: Path, stem: str, exts: Sequence[str]) -> Path | None:
    for ext in exts:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def find_brats_files(subject_dir: str | os.PathLike, source: str = "t1", target: str = "t2",
                     label: bool = True) -> tuple[dict[str, str], list[str]]:
    """Files of one BraTS subject folder ``<root>/<ID>/``, in 2018-2021 or 2023+ naming (detected per folder).

    Returns ``({"source": path, "target": path, "label": path}, problems)``; ``label`` is left out when
    ``label=False``, and every missing file is a problem naming the expected path.
    """
    folder = Path(subject_dir)
    sid = folder.name
    for name in (source, target):
        if name not in BRATS_MODALITIES or name == "seg":
            raise ValueError(f"BraTS modality must be one of t1, t1ce, t2, flair, got {name!r}.")
    found = {
        layout: sum(_find_with_ext(folder, f"{sid}{sep}{names[i]}", _NIFTI_EXTS) is not None
                    for names in BRATS_MODALITIES.values())
        for layout, (sep, i) in _BRATS_LAYOUTS.items()
    }
    layout = max(found, key=lambda k: found[k])
    if found[layout] == 0:
        return {}, [f"no BraTS image found in {folder} (expected {sid}_<t1|t1ce|t2|flair|seg>.nii.gz, 2018-2021 "
                    f"naming, or {sid}-<t1n|t1c|t2w|t2f|seg>.nii.gz, 2023+ naming)"]
    sep, i = _BRATS_LAYOUTS[layout]
    wanted = {"source": source, "target": target, **({"label": "seg"} if label else {})}
    files, problems = {}, []
    for key, modality in wanted.items():
        stem = f"{sid}{sep}{BRATS_MODALITIES[modality][i]}"
        path = _find_with_ext(folder, stem, _NIFTI_EXTS)
        if path is None:
            expected = folder / f"{stem}.nii.gz"
            problems.append(f"missing {modality} file ({key}): expected {expected} ({layout} naming)")
        else:
            files[key] = str(path)
    return files, problems


def find_synthrad_files(subject_dir: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """Files ``mr``, ``ct`` and ``mask`` of one SynthRAD subject folder (``.nii.gz`` 2023 or ``.mha`` 2025 layout).

    Returns ``({"source": mr, "target": ct, "mask": mask}, problems)``, a problem per missing file.
    """
    folder = Path(subject_dir)
    names = {"source": "mr", "target": "ct", "mask": "mask"}
    counts = {ext: sum((folder / f"{n}{ext}").is_file() for n in names.values()) for ext in _SYNTHRAD_EXTS}
    ext = max(counts, key=lambda e: counts[e])
    if counts[ext] == 0:
        return {}, [f"no SynthRAD image found in {folder} (expected mr, ct and mask as .nii.gz or .mha)"]
    files, problems = {}, []
    for key, name in names.items():
        path = folder / f"{name}{ext}"
        if path.is_file():
            files[key] = str(path)
        else:
            problems.append(f"missing {name} file ({key}): expected {path}")
    return files, problems


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

    Each file is checked with :func:`custom_components.readers.screen_image` (without a channel axis); this
    function adds the checks across the subject's files.

    ``job`` holds ``subject``, ``files`` (datalist key -> path), ``problems`` (found while looking for files),
    ``atol``, and optionally ``derive_mask`` (output path of a foreground mask ``(source > 0) | (target > 0)`` with
    holes filled, written with the source's affine), ``ct_key`` and ``hu_min`` (a warning if that image's minimum
    is not below ``hu_min``, i.e. it does not look like Hounsfield units).

    Returns ``{"subject", "accepted", "reasons", "warnings", "files"}`` (``files`` includes the derived mask).
    """
    from .readers import screen_image

    subject, files = job["subject"], dict(job["files"])
    reasons, warnings = list(job.get("problems", [])), []
    keep = {"source", "target", "mask"} | ({job["ct_key"]} if job.get("ct_key") else set())
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
    if not reasons:
        if job.get("derive_mask"):
            from scipy import ndimage

            mask = ndimage.binary_fill_holes((arrays["source"] > 0) | (arrays["target"] > 0))
            if not mask.any():
                reasons.append("empty foreground: source and target are 0 everywhere (no brain voxel)")
            else:
                _write_mask(mask, ref[2], job["derive_mask"])  # type: ignore[index]
                files["mask"] = job["derive_mask"]
        elif "mask" in arrays and not (arrays["mask"] > 0).any():
            reasons.append(f"empty mask: {files['mask']} has no foreground voxel")
    ct_key = job.get("ct_key")
    if not reasons and ct_key in arrays:
        low = float(arrays[ct_key].min())
        if low >= job.get("hu_min", -500.0):
            warnings.append(f"{ct_key} minimum is {low:g}, not below {job.get('hu_min', -500.0):g}: "
                            "values may not be in Hounsfield units")
    return {"subject": subject, "accepted": not reasons, "reasons": reasons, "warnings": warnings, "files": files}


def _run(fn: Callable[[dict], dict], jobs: list[dict], workers: int, desc: str,
         on_error: Callable[[dict, BaseException], dict]) -> Iterator[dict]:
    """``fn`` over ``jobs`` with a tqdm bar, in ``workers`` processes (in this process if ``workers <= 1``)."""
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


def _subject_dirs(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root {str(root)!r} is not a folder (it should hold one folder per subject).")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"root {str(root)!r} holds no subject folder.")
    return dirs


def _datalist_path(path: str | os.PathLike, base: Path) -> str:
    """Relative to ``base`` when inside it, absolute otherwise."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _prepare(name: str, jobs: list[dict], output: Path, info: dict[str, Any], fractions: Sequence[float],
             seed: int, workers: int, paper_split: bool) -> dict[str, Any]:
    """Screen ``jobs``, split the accepted subjects, write and return the datalist."""
    results = sorted(
        _run(screen_subject, jobs, workers, f"screening {name}",
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
        datalist[section] = [
            {"subject": sid, **{k: _datalist_path(p, base) for k, p in accepted[sid].items()}} for sid in split[section]
        ]
    base.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(datalist, indent=2) + "\n")
    logger.info("%s: split %s (seed %d): %s", name, split["counts"], split["seed"], split["rule"])
    logger.info("%s: wrote %s", name, output)
    return datalist


def _check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    from .data import as_flag

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
        output: datalist JSON to write; its folder also receives ``masks/<ID>_mask.nii.gz`` (BraTS has no brain
            mask: it is derived as ``(source > 0) | (target > 0)`` with holes filled, on the source's grid).
        source, target: modality names ``t1``, ``t1ce``, ``t2``, ``flair`` (``t1n``, ``t1c``, ``t2w``, ``t2f`` in
            2023+ files).
        fractions, seed, paper_split: see :func:`split_subjects`.
        workers: processes used for screening.
        label: require the tumour segmentation (``label`` entry); ``False`` leaves it out.
        atol: tolerance of the affine comparison between a subject's files.
        overwrite: replace an existing ``output``.

    Returns the datalist written.
    """
    from .data import as_flag

    for name, value in (("source", source), ("target", target)):
        if value not in BRATS_MODALITIES or value == "seg":
            raise ValueError(f"{name} must be one of t1, t1ce, t2, flair, got {value!r}.")
    if source == target:
        raise ValueError(f"source and target must differ, got {source!r} for both.")
    output = _check_output(output, overwrite)
    _check_fractions(fractions)
    label = as_flag(label, "label")
    jobs = []
    for folder in _subject_dirs(root):
        files, problems = find_brats_files(folder, source, target, label=label)
        mask_path = output.parent / "masks" / f"{folder.name}_mask.nii.gz"
        jobs.append({"subject": folder.name, "files": files, "problems": problems, "atol": float(atol),
                     "derive_mask": None if problems else str(mask_path)})
    info = {"description": f"BraTS {source} -> {target}", "task": f"{source}{target}", "source_modality": source,
            "target_modality": target, "root": str(Path(root).resolve()),
            "mask_rule": "derived: (source > 0) | (target > 0), holes filled, on the source grid"}
    return _prepare("BraTS", jobs, output, info, fractions, seed, workers, as_flag(paper_split, "paper_split"))


def prepare_synthrad(root: str | os.PathLike, output: str | os.PathLike,
                     fractions: Sequence[float] = (0.56, 0.17, 0.27), seed: int = 0, workers: int = 1,
                     paper_split: bool = True, atol: float = 1e-3, hu_min: float = -500.0,
                     overwrite: bool = False) -> dict[str, Any]:
    """Screen a SynthRAD MR -> CT folder (``<root>/<ID>/{mr,ct,mask}.nii.gz`` or ``.mha``) and write a datalist.

    Items are ``source`` = mr, ``target`` = ct, ``mask`` = the body mask; the datalist records ``"task": "mrct"``.
    A CT whose minimum is not below ``hu_min`` gets a warning (not a rejection). Other arguments as in
    :func:`prepare_brats`. ``.mha`` files need :class:`custom_components.readers.SimpleITKReader` to be loaded.
    """
    output = _check_output(output, overwrite)
    _check_fractions(fractions)
    jobs = []
    for folder in _subject_dirs(root):
        files, problems = find_synthrad_files(folder)
        jobs.append({"subject": folder.name, "files": files, "problems": problems, "atol": float(atol),
                     "ct_key": "target", "hu_min": float(hu_min)})
    info = {"description": "SynthRAD MR -> CT", "task": "mrct", "source_modality": "mr", "target_modality": "ct",
            "root": str(Path(root).resolve())}
    from .data import as_flag

    return _prepare("SynthRAD", jobs, output, info, fractions, seed, workers, as_flag(paper_split, "paper_split"))


# ---------------------------------------------------------------------------------------------------------------
# preprocessing with SimpleITK


def n4_bias_correction(image: Any, mask: Any | None = None, shrink_factor: int = 4,
                       iterations: Sequence[int] = (50, 50, 50, 50)) -> tuple[Any, dict[str, Any]]:
    """N4 bias-field correction (Tustison et al., IEEE TMI 2010) of a SimpleITK image.

    The field is fitted on the image shrunk by ``shrink_factor`` inside ``mask`` (default: Otsu foreground), with
    ``len(iterations)`` fitting levels, then evaluated at full resolution; the image is divided by it everywhere.
    Returns the float32 corrected image and the parameters used.
    """
    import SimpleITK as sitk

    if int(shrink_factor) < 1:
        raise ValueError(f"n4 shrink_factor must be >= 1, got {shrink_factor}.")
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask_rule = "otsu" if mask is None else "given"
    mask = sitk.OtsuThreshold(image, 0, 1, 200) if mask is None else sitk.Cast(mask > 0, sitk.sitkUInt8)
    small, small_mask = image, mask
    if int(shrink_factor) > 1:
        small = sitk.Shrink(image, [int(shrink_factor)] * image.GetDimension())
        small_mask = sitk.Shrink(mask, [int(shrink_factor)] * image.GetDimension())
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    corrected = sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)
    info = {"shrink_factor": int(shrink_factor), "iterations": [int(i) for i in iterations],
            "mask": mask_rule,
            "final_convergence": float(corrector.GetCurrentConvergenceMeasurement())}
    return corrected, info


def rigid_register(fixed: Any, moving: Any, shrink_factors: Sequence[int] = (4, 2, 1),
                   smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0), iterations: int = 200, bins: int = 50,
                   sampling: float = 0.2, learning_rate: float = 1.0, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Rigid (Euler3D) registration of ``moving`` onto ``fixed`` with Mattes mutual information.

    Centred (geometry) initialisation, multi-resolution pyramid (``shrink_factors`` with ``smoothing_sigmas`` in mm),
    regular-step gradient descent (initial step ``learning_rate``, in mm after physical-shift scaling, halved on
    each direction change) of at most ``iterations`` per level, random sampling of ``sampling`` of the voxels
    (seeded). The
    returned transform maps fixed-space points to moving-space points, as ``SimpleITK.Resample`` expects.
    """
    import SimpleITK as sitk

    if fixed.GetDimension() != 3 or moving.GetDimension() != 3:
        raise ValueError(f"rigid registration needs 3D images, got fixed {fixed.GetDimension()}D and "
                         f"moving {moving.GetDimension()}D.")
    if len(shrink_factors) != len(smoothing_sigmas):
        raise ValueError(f"shrink_factors {list(shrink_factors)} and smoothing_sigmas {list(smoothing_sigmas)} "
                         "must have one entry per resolution level.")
    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    transform = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(float(sampling), int(seed))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=float(learning_rate), minStep=1e-4,
                                                    numberOfIterations=int(iterations), relaxationFactor=0.5,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([int(s) for s in shrink_factors])
    method.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_sigmas])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    info = {
        "transform": "Euler3DTransform",
        "parameters": [float(p) for p in transform.GetParameters()],  # 3 angles (rad), 3 translations (mm, LPS)
        "fixed_parameters": [float(p) for p in transform.GetFixedParameters()],  # rotation centre (mm, LPS)
        "metric": "mattes_mutual_information",
        "final_metric": float(method.GetMetricValue()),
        "optimizer": "regular step gradient descent",
        "iterations_last_level": int(method.GetOptimizerIteration()),
        "stop_condition": method.GetOptimizerStopConditionDescription(),
        "shrink_factors": [int(s) for s in shrink_factors],
        "smoothing_sigmas_mm": [float(s) for s in smoothing_sigmas],
        "sampling": float(sampling),
        "bins": int(bins),
        "initialisation": "geometry centres",
    }
    return transform, info


def target_grid(image: Any, spacing: Sequence[float] | float | None = None) -> Any:
    """An empty image holding the grid of ``image``, at ``spacing`` (same origin, direction and physical extent)."""
    import SimpleITK as sitk

    if spacing is None:
        grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        grid.CopyInformation(image)
        return grid
    new_spacing = _spacing(spacing, image.GetDimension())
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), new_spacing)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing(new_spacing)
    return grid


def _spacing(spacing: Sequence[float] | float, ndim: int) -> list[float]:
    values = [float(spacing)] * ndim if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    if len(values) != ndim or min(values) <= 0:
        raise ValueError(f"spacing must be a positive number or {ndim} positive numbers, got {spacing!r}.")
    return values


def _same_grid(a: Any, b: Any, tol: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def resample_onto(image: Any, grid: Any, transform: Any | None = None, interpolator: str = "linear") -> Any:
    """``image`` resampled onto the grid of ``grid`` through ``transform`` (grid points -> image points).

    ``interpolator`` is ``"linear"`` (images) or ``"nearest"`` (labels, masks). Voxels outside ``image`` get its
    minimum (so a CT is padded with air, not 0 HU). Returns ``image`` itself when nothing would change.
    """
    import SimpleITK as sitk

    modes = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolator not in modes:
        raise ValueError(f"interpolator must be one of {sorted(modes)}, got {interpolator!r}.")
    if transform is None and _same_grid(image, grid):
        return image
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return sitk.Resample(image, grid, transform if transform is not None else sitk.Transform(),
                         modes[interpolator], float(stats.GetMinimum()), image.GetPixelID())


def preprocess_subject(job: dict[str, Any]) -> dict[str, Any]:
    """Preprocess one subject (see :func:`preprocess`); errors are returned as ``{"status": "failed", "error"}``."""
    import SimpleITK as sitk

    start = time.time()
    p = job["parameters"]
    entry: dict[str, Any] = {"subject": job["subject"], "section": job["section"], "steps": [], "parameters": p}
    try:
        if job.get("threads"):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(job["threads"]))
        images = {}
        for key, path in job["files"].items():
            try:
                images[key] = sitk.ReadImage(path)
            except RuntimeError as e:
                raise RuntimeError(f"{key} file {path} cannot be read: {str(e).strip().splitlines()[-1]}") from None
        for key in ("source", "target"):
            if key not in images:
                raise ValueError(f"no {key!r} entry (keys: {sorted(images)}).")
            images[key] = sitk.Cast(images[key], sitk.sitkFloat32)
        if p["n4"]:
            entry["n4"] = {}
            for key in ("source",) + (() if p["target_is_ct"] else ("target",)):
                images[key], entry["n4"][key] = n4_bias_correction(images[key], None, p["n4_shrink"],
                                                                   p["n4_iterations"])
                entry["steps"].append(f"n4_{key}")
        transform = None
        if p["register"]:
            transform, entry["registration"] = rigid_register(
                images["target"], images["source"], p["reg_shrink_factors"], p["reg_smoothing_sigmas"],
                p["reg_iterations"], p["reg_bins"], p["reg_sampling"], p["reg_learning_rate"], p["seed"])
            entry["steps"].append("register_source_to_target")
        grid = target_grid(images["target"], p["spacing"])
        if p["spacing"] is not None:
            entry["steps"].append("resample_to_spacing")
        outputs = {}
        for key, image in images.items():
            mode = "linear" if key in ("source", "target") else "nearest"
            out = resample_onto(image, grid, transform if key == "source" else None, mode)
            path = Path(job["output_dir"]) / f"{key}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(out, str(path), True)
            outputs[key] = str(path)
        entry.update(status="done", outputs=outputs, size=list(grid.GetSize()), spacing=list(grid.GetSpacing()))
    except Exception as e:  # noqa: BLE001 - one subject's failure must not stop the others
        entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3))
    entry["seconds"] = round(time.time() - start, 3)
    entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return entry


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def preprocess(input_datalist: str | os.PathLike, output_dir: str | os.PathLike, n4: bool = True,
               spacing: Sequence[float] | float | None = None, register: bool = False,
               target_is_ct: bool | None = None, workers: int = 1, overwrite: bool = False, n4_shrink: int = 4,
               n4_iterations: Sequence[int] = (50, 50, 50, 50), reg_shrink_factors: Sequence[int] = (4, 2, 1),
               reg_smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0), reg_iterations: int = 200,
               reg_bins: int = 50, reg_sampling: float = 0.2, reg_learning_rate: float = 1.0, seed: int = 0,
               threads: int | None = None) -> dict[str, Any]:
    """Preprocess every subject of a datalist (all sections) with SimpleITK.

    Per subject: N4 of the source, and of the target unless it is a CT (``target_is_ct``; default: the datalist's
    ``"task"`` is ``"mrct"``); when ``register``, rigid registration of the source onto the target
    (:func:`rigid_register`); then every image is resampled onto the target's grid, at ``spacing`` if given
    (linear for source/target, nearest for label/mask). The label and mask are assumed to live on the target's
    grid (as in BraTS and SynthRAD), so they are never moved by the registration.

    Writes ``<output_dir>/<subject>/<key>.nii.gz`` (``source``, ``target``, ``label``, ``mask``), the datalist
    ``<output_dir>/datalist.json`` (same sections and top-level information, failed subjects left out and listed
    under ``"failed"``), and ``<output_dir>/preprocess_log.json`` (parameters, and per subject the steps run,
    N4 and registration results, outputs, time, or the error). Subjects the log marks as done whose outputs exist
    are skipped; a log made with other parameters stops the run unless ``overwrite`` (then all are redone).

    Returns ``{"done", "skipped", "failed", "datalist", "log"}``.
    """
    from .data import as_flag, read_datalist_json

    input_datalist, output_dir = Path(input_datalist), Path(output_dir)
    content = read_datalist_json(input_datalist, name="input_datalist")  # DatalistError is a ValueError
    if target_is_ct is None:
        target_is_ct = content.get("task") == "mrct"
    params = {
        "n4": as_flag(n4, "n4"), "spacing": None if spacing is None else _spacing(spacing, 3),
        "register": as_flag(register, "register"), "target_is_ct": as_flag(target_is_ct, "target_is_ct"),
        "n4_shrink": int(n4_shrink), "n4_iterations": [int(i) for i in n4_iterations],
        "reg_shrink_factors": [int(s) for s in reg_shrink_factors],
        "reg_smoothing_sigmas": [float(s) for s in reg_smoothing_sigmas], "reg_iterations": int(reg_iterations),
        "reg_bins": int(reg_bins), "reg_sampling": float(reg_sampling), "reg_learning_rate": float(reg_learning_rate),
        "seed": int(seed),
    }
    overwrite = as_flag(overwrite, "overwrite")
    base = input_datalist.parent
    jobs, seen = [], set()
    for section in SECTIONS:
        for i, item in enumerate(content.get(section, [])):
            sid = str(item.get("subject", f"{section}_{i}"))
            if sid in seen:
                raise ValueError(f"input_datalist {str(input_datalist)!r}: subject {sid!r} appears more than once.")
            seen.add(sid)
            files = {k: str(base / v) for k, v in item.items() if k in ("source", "target", "label", "mask")}
            jobs.append({"subject": sid, "section": section, "files": files, "parameters": params,
                         "output_dir": str(output_dir / sid), "threads": threads})
    if not jobs:
        raise ValueError(f"input_datalist {str(input_datalist)!r} has no subject in {list(SECTIONS)}.")

    log_path = output_dir / "preprocess_log.json"
    log: dict[str, Any] = {"input_datalist": str(input_datalist.resolve()), "parameters": params, "subjects": {}}
    if log_path.is_file() and not overwrite:
        old = json.loads(log_path.read_text())
        if old.get("parameters") != params:
            raise FileExistsError(
                f"{str(log_path)!r} was written with other parameters ({old.get('parameters')}); pass "
                "--overwrite true to redo every subject with the new ones, or choose another --output_dir."
            )
        log["subjects"] = old.get("subjects", {})
    output_dir.mkdir(parents=True, exist_ok=True)

    def done(job: dict) -> bool:
        entry = log["subjects"].get(job["subject"], {})
        return entry.get("status") == "done" and all(Path(f).is_file() for f in entry.get("outputs", {}).values())

    todo = [job for job in jobs if overwrite or not done(job)]
    todo_ids = {job["subject"] for job in todo}
    skipped = [job["subject"] for job in jobs if job["subject"] not in todo_ids]
    if skipped:
        logger.info("preprocess: %d subject(s) already done, skipped", len(skipped))
    for entry in _run(preprocess_subject, todo, workers, "preprocessing",
                      lambda job, e: {"subject": job["subject"], "section": job["section"], "status": "failed",
                                      "error": f"{type(e).__name__}: {e}"}):
        log["subjects"][entry["subject"]] = entry
        _write_json(log_path, log)  # after every subject, so an interrupted run resumes where it stopped
        if entry["status"] != "done":
            logger.error("preprocess: subject %s failed: %s", entry["subject"], entry["error"])
    _write_json(log_path, log)

    out: dict[str, Any] = {k: v for k, v in content.items() if k not in SECTIONS}
    out["preprocessing"] = {**params, "log": log_path.name, "input_datalist": str(input_datalist.resolve())}
    out["failed"] = []
    for job in jobs:
        entry = log["subjects"][job["subject"]]
        if entry["status"] != "done":
            out["failed"].append({"subject": job["subject"], "section": job["section"], "error": entry["error"]})
            continue
        out.setdefault(job["section"], []).append(
            {"subject": job["subject"], **{k: _datalist_path(p, output_dir) for k, p in entry["outputs"].items()}})
    for section in SECTIONS:
        if section in content:
            out.setdefault(section, [])
    _write_json(output_dir / "datalist.json", out)
    summary = {"done": [j["subject"] for j in todo if log["subjects"][j["subject"]]["status"] == "done"],
               "skipped": skipped, "failed": out["failed"], "datalist": str(output_dir / "datalist.json"),
               "log": str(log_path)}
    logger.info("preprocess: %d done, %d skipped, %d failed; wrote %s", len(summary["done"]), len(skipped),
                len(out["failed"]), summary["datalist"])
    return summary
