"""SimpleITK preprocessing of the subjects of a datalist: N4, optional rigid registration, resampling.

:func:`preprocess` runs, per subject: N4 bias-field correction of the MR images (:func:`n4_bias_correction`),
optional rigid registration of the source onto the target (:func:`rigid_register`) and resampling of every image onto
one grid (the target's, optionally at a new spacing; :func:`target_grid`, :func:`resample_onto`). It writes
``<output_dir>/<subject>/<key>.nii.gz``, a datalist ``<output_dir>/datalist.json`` and a log
``<output_dir>/preprocess_log.json``. Its input is a datalist as :mod:`custom_components.apps.prepare` writes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.datalist import read_datalist_json
from ..config.options import as_flag
from .splits import SECTIONS
from .prepare import relative_to_datalist, run_per_subject

__all__ = ["n4_bias_correction", "preprocess", "preprocess_subject", "resample_onto", "rigid_register", "target_grid"]

logger = logging.getLogger(__name__)


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
    for entry in run_per_subject(preprocess_subject, todo, workers, "preprocessing",
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
        paths = {k: relative_to_datalist(p, output_dir) for k, p in entry["outputs"].items()}
        out.setdefault(job["section"], []).append({"subject": job["subject"], **paths})
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
