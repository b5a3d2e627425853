"""Ensemble-disagreement baseline for the confidence map: how well does the spread of N models flag the errors?

Given the inference outputs of N >= 2 independently trained models on the same subjects, this scores the
voxel-wise standard deviation across the members as a QA map, with the same numbers the bundle reports for the
local discriminator's map (:func:`custom_components.metrics.synthesis.confidence_qa`: ``qa_auroc_worst``, ``qa_spearman``,
``qa_ause``, ``qa_sparsification_gain``, ...), so the two can be compared on the same subjects.

Per subject of the datalist section:

* each member's ``SaveImaged`` output is read, at the path the inference writes it
  (:func:`custom_components.apps.inference.output_path` with postfix ``synthetic`` and ``data_root_dir`` = the datalist's
  folder, inference.json's default: ``<member>/<sub-folder of the source>/<source name>_synthetic.nii.gz``), or else
  at ``<member>/<subject>_synthetic.nii.gz``;
* intensities are compared in the evaluation's normalised units (``data_range`` 1): the target is normalised as
  train.json's ``target_intensity`` does (0.5-99.5 percentile window of its voxels > 0 mapped to [0, 1] and clipped;
  a fixed ``--hu_window`` instead, as mrct.json does for CT); the synthetic images, written by inference.json in the
  ``target_window`` units (default [0, 1], i.e. already normalised), are mapped linearly from ``--target_window``
  to [0, 1]. With ``--target_window None`` the synthetic images are taken to be in the target's original units and
  are normalised with the target's own window;
* the QA map is M = 1 - std / max(std) over the foreground (the std across members of the normalised images;
  every QA number is rank based, so any decreasing map of the std gives the same values), scored against the error
  of the ensemble mean (row ``ensemble_mean``) and against the error of member 0 (row ``member_0``: a user ships one
  model, and the ensemble's spread is then a QA map for that model).

Outputs in ``--output_dir``: ``qa_ensemble.csv`` (one row per subject and reference) and ``qa_ensemble.json`` (the
mean of each number over the subjects where it is defined, per reference; NaN written as null). Existing outputs
are kept unless ``--overwrite true``.

Example (three seeds of the dual_attention arm, each run through inference on the test list)::

    python scripts/qa_ensemble.py --members "['runs/s0/inference','runs/s1/inference','runs/s2/inference']" \\
        --datalist data/phantom_t1t2/datalist.json --output_dir qa_ensemble
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_CSV, OUTPUT_JSON = "qa_ensemble.csv", "qa_ensemble.json"
REFERENCES = ("ensemble_mean", "member_0")


def _as_list(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def member_file(item: dict, member_dir: str | Path, data_root_dir: str, postfix: str = "synthetic") -> Path:
    """The synthetic image of a datalist ``item`` in one member's inference folder; ``FileNotFoundError`` naming the
    subject and the paths tried when it is missing."""
    from custom_components.apps.inference import output_path

    member_dir = Path(member_dir)
    candidates = [Path(output_path(item["source"], str(member_dir), postfix, data_root_dir))] \
        if isinstance(item.get("source"), str) else []
    candidates.append(member_dir / f"{item['subject']}_{postfix}.nii.gz")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"subject {item['subject']!r}: no {postfix} image in {str(member_dir)!r}: "
                            f"{' nor '.join(repr(str(p)) for p in candidates)} exists.")


def _t(x):
    import torch

    return torch.as_tensor(x)


def _load(path: str | Path, subject: str, what: str):
    """(array float32, affine) of a NIfTI file, as stored (no reorientation: inference writes the source's grid)."""
    import nibabel as nib
    import numpy as np

    if not Path(path).is_file():
        raise FileNotFoundError(f"subject {subject!r}: the {what} {str(path)!r} does not exist.")
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def normalise_target(target: "np.ndarray", hu_window=None) -> tuple["np.ndarray", float, float]:
    """The target in the evaluation's normalised units, and the window (a_min, a_max) that maps to [0, 1]."""
    import torch
    from monai.utils import TraceKeys

    from custom_components.transforms.dictionary import InvertibleIntensityWindowd

    lo, hi = (None, None) if hu_window is None else (float(hu_window[0]), float(hu_window[1]))
    t = InvertibleIntensityWindowd("target", a_min=lo, a_max=hi, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                   clip=True)  # = train.json's target_intensity (mrct.json's with a hu_window)
    out = t({"target": torch.as_tensor(target)[None]})["target"]
    info = out.applied_operations[-1][TraceKeys.EXTRA_INFO]
    return out.as_tensor()[0].numpy(), float(info["a_min"]), float(info["a_max"])


def subject_rows(item: dict, files: list[Path], target_window=(0.0, 1.0), hu_window=None,
                 worst_fraction: float = 0.1) -> list[dict]:
    """The QA rows (``ensemble_mean``, ``member_0``) of one subject from its members' synthetic images."""
    import numpy as np

    from custom_components.metrics.synthesis import confidence_qa, masked_mae

    subject = item["subject"]
    if "target" not in item:
        raise KeyError(f"subject {subject!r}: the datalist entry has no 'target' (entries: {sorted(item)}).")
    target_raw, affine = _load(item["target"], subject, "target")
    target, a_min, a_max = normalise_target(target_raw, hu_window)
    lo, hi = (a_min, a_max) if target_window is None else (float(target_window[0]), float(target_window[1]))
    if not hi > lo:
        raise ValueError(f"target_window must be (low, high) with high > low, got {target_window!r}.")
    preds = []
    for i, f in enumerate(files):
        pred, pred_affine = _load(f, subject, f"synthetic image of member {i}")
        if pred.shape != target.shape:
            raise ValueError(f"subject {subject!r}: {str(f)!r} has shape {pred.shape}, the target "
                             f"{item['target']!r} has shape {target.shape}.")
        if not np.allclose(pred_affine, affine, atol=1e-3):
            raise ValueError(f"subject {subject!r}: {str(f)!r} and the target {item['target']!r} have different "
                             f"affines (not on the same grid):\n{pred_affine}\n{affine}")
        preds.append((pred - lo) / (hi - lo))
    stack = np.stack(preds)
    aux = {k: _load(item[k], subject, k)[0] for k in ("mask", "label") if isinstance(item.get(k), str)}
    for k, v in aux.items():
        if v.shape != target.shape:
            raise ValueError(f"subject {subject!r}: the {k} {item[k]!r} has shape {v.shape}, the target has "
                             f"shape {target.shape}.")
    mask, label = aux.get("mask"), aux.get("label")
    fg = mask > 0 if mask is not None else np.ones(target.shape, dtype=bool)
    std = stack.std(axis=0)
    top = float(std[fg].max()) if fg.any() else 0.0
    confidence = 1.0 - std / top if top > 0 else np.ones_like(std)
    rows = []
    for reference, pred in zip(REFERENCES, (stack.mean(axis=0), stack[0])):
        row = {"subject": subject, "reference": reference, "n_members": len(files),
               "mae_foreground": masked_mae(_t(np.clip(pred, 0.0, 1.0)), _t(target), _t(fg)),
               "std_foreground": float(std[fg].mean()) if fg.any() else math.nan}
        row.update(confidence_qa(_t(confidence), _t(pred), _t(target), None if mask is None else _t(mask),
                                 None if label is None else _t(label), worst_fraction=worst_fraction, data_range=1.0))
        rows.append(row)
    return rows


def main(members: list | tuple | str, datalist: str, output_dir: str = "qa_ensemble", section: str = "test",
         data_root_dir: str | None = None, target_window: list | tuple | None = (0.0, 1.0),
         hu_window: list | tuple | None = None, worst_fraction: float = 0.1, overwrite: bool = False) -> str:
    """Score the ensemble spread as a QA map; write ``qa_ensemble.csv`` and ``qa_ensemble.json``, return the latter.

    Args:
        members: N >= 2 inference output folders (a list, or a comma-separated string); member 0 is the model
            whose error the ``member_0`` rows score.
        datalist: datalist JSON with ``source`` and ``target`` (optional ``mask``, ``label``) per subject.
        output_dir: folder for the outputs.
        section: datalist section (the one the members were run on).
        data_root_dir: the inference's ``data_root_dir`` (default: the datalist's folder, inference.json's default).
        target_window: the inference's ``target_window`` (units of the synthetic images); ``None`` = the synthetic
            images are in the target's original units.
        hu_window: fixed target window (mrct.json's ``hu_window``); default: the target's 0.5-99.5 percentiles.
        worst_fraction: fraction of foreground voxels counted as the worst errors (``qa_auroc_worst``).
        overwrite: replace existing outputs.
    """
    import csv
    import os

    import numpy as np

    from custom_components.data.datalist import load_datalist
    from custom_components.apps.inference import input_root
    from custom_components.config.options import as_flag

    member_dirs = _as_list(members)
    if len(member_dirs) < 2:
        raise ValueError(f"members must name at least 2 inference output folders, got {member_dirs!r}.")
    for d in member_dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"member folder {d!r} does not exist.")
    out = Path(output_dir)
    existing = [p for p in (out / OUTPUT_CSV, out / OUTPUT_JSON) if p.exists()]
    if existing and not as_flag(overwrite, "overwrite"):
        raise FileExistsError(f"{existing[0]} exists; pass '--overwrite true' or choose another --output_dir.")
    items = load_datalist(datalist, section)
    root = data_root_dir if data_root_dir is not None else input_root(datalist)
    files, missing = {}, []
    for item in items:  # every missing file is reported before any work
        for d in member_dirs:
            try:
                files.setdefault(item["subject"], []).append(member_file(item, d, root))
            except FileNotFoundError as e:
                missing.append(str(e))
    if missing:
        raise FileNotFoundError(f"{len(missing)} synthetic image(s) missing:\n" + "\n".join(missing))
    rows = []
    for item in items:
        rows += subject_rows(item, files[item["subject"]], target_window, hu_window, worst_fraction)
        print(f"[qa_ensemble] {item['subject']}: " + ", ".join(
            f"{r['reference']} auroc {r['qa_auroc_worst']:.3f}" for r in rows[-2:]), flush=True)
    keys = [k for k in rows[0] if k not in ("subject", "reference", "n_members")]
    summary = {"members": [os.path.abspath(d) for d in member_dirs], "datalist": os.path.abspath(datalist),
               "section": section, "n_subjects": len(items), "target_window": target_window, "hu_window": hu_window,
               "confidence": "1 - std / max(std) over the foreground, std across members (normalised units)"}
    for reference in REFERENCES:
        ref_rows = [r for r in rows if r["reference"] == reference]
        means = {}
        for k in keys:
            vals = np.array([r[k] for r in ref_rows], dtype=float)
            vals = vals[np.isfinite(vals)]
            means[k] = float(vals.mean()) if vals.size else None
        summary[reference] = means
    out.mkdir(parents=True, exist_ok=True)
    with open(out / OUTPUT_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / OUTPUT_JSON).write_text(json.dumps(summary, indent=2))
    print(f"{'mean over ' + str(len(items)) + ' subject(s)':<26}" + "".join(f"{r:>16}" for r in REFERENCES))
    for k in keys:
        values = [math.nan if summary[r][k] is None else summary[r][k] for r in REFERENCES]
        print(f"{k:<26}" + "".join(f"{v:>16.4f}" for v in values))
    print(f"written to {out / OUTPUT_CSV} and {out / OUTPUT_JSON}", flush=True)
    return str(out / OUTPUT_JSON)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import fire

    fire.Fire(main)
