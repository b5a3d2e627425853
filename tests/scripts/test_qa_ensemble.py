"""The ensemble-disagreement QA baseline (scripts/qa_ensemble.py) on tiny NIfTI files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_components.metrics.synthesis import QA_KEYS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import qa_ensemble  # noqa: E402

SHAPE = (16, 16, 8)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), AFFINE), str(path))


def _dataset(tmp_path: Path, informative: bool, n_subjects: int = 2, target_units: bool = False,
             seed: int = 0) -> tuple[Path, list[Path], dict]:
    """A datalist, 3 members' inference folders (the layout inference.json writes), and each reference's
    foreground MAE per subject, computed here.

    Member 0 = target + small noise, with large errors on 10 % of the voxels; members 1 and 2 = member 0 + d and
    member 0 - d / 2, so the spread grows with d and the ensemble mean (member 0 + d / 6) stays close to member 0.
    ``informative``: d is large where member 0's error is large; else d is large on other random voxels.
    """
    rng = np.random.default_rng(seed)
    data, members = tmp_path / "data", [tmp_path / f"member_{i}" for i in range(3)]
    entries, mae = [], {"ensemble_mean": [], "member_0": []}
    for s in range(n_subjects):
        sub = f"sub_{s:02d}"
        u = rng.uniform(0.2, 0.8, SHAPE)
        target = 100.0 + 900.0 * u  # original units; the percentile window maps it back to about [0, 1]
        mask = np.zeros(SHAPE)
        mask[1:-1, 1:-1, 1:-1] = 1
        label = np.zeros(SHAPE)
        label[4:8, 4:8, 2:5] = 1
        for name, arr in (("t1", u), ("t2", target), ("mask", mask), ("seg", label)):
            _save(data / sub / f"{name}.nii.gz", arr)
        entries.append({"subject": sub, "source": f"{sub}/t1.nii.gz", "target": f"{sub}/t2.nii.gz",
                        "mask": f"{sub}/mask.nii.gz", "label": f"{sub}/seg.nii.gz"})
        lo, hi = np.percentile(target[target > 0], [0.5, 99.5])
        target_n = (target - lo) / (hi - lo)
        bad = rng.random(SHAPE) < 0.1
        m0 = target_n + 0.01 * rng.standard_normal(SHAPE) + np.where(bad, rng.choice([-0.3, 0.3], SHAPE), 0.0)
        spread = bad if informative else rng.random(SHAPE) < 0.1
        d = np.where(spread, 0.2, 0.01) * (1 + 0.1 * rng.random(SHAPE))
        for member, pred in zip(members, (m0, m0 + d, m0 - d / 2)):
            _save(member / sub / "t1_synthetic.nii.gz", pred * (hi - lo) + lo if target_units else pred)
        fg, t = mask > 0, np.clip(target_n, 0, 1)
        for reference, pred in (("ensemble_mean", m0 + d / 6), ("member_0", m0)):
            mae[reference].append(np.abs(np.clip(pred, 0, 1) - t)[fg].mean())
    (data / "datalist.json").write_text(json.dumps({"test": entries}))
    return data / "datalist.json", members, mae


def _run(datalist, members, out, **kwargs) -> dict:
    path = qa_ensemble.main([str(m) for m in members], str(datalist), str(out), **kwargs)
    return json.loads(Path(path).read_text())


def test_disagreement_where_member_0_is_wrong_is_a_good_qa_map(tmp_path):
    datalist, members, mae = _dataset(tmp_path, informative=True)
    summary = _run(datalist, members, tmp_path / "out")
    for reference in ("ensemble_mean", "member_0"):
        assert summary[reference]["qa_auroc_worst"] > 0.8
        assert summary[reference]["qa_sparsification_gain"] > 0.5
        assert set(QA_KEYS) <= set(summary[reference])
        # each row is scored against its own prediction's error, in the evaluation's normalised units
        assert summary[reference]["mae_foreground"] == pytest.approx(np.mean(mae[reference]), rel=1e-4)
    assert summary["ensemble_mean"]["mae_foreground"] != pytest.approx(summary["member_0"]["mae_foreground"])
    assert summary["n_subjects"] == 2
    with open(tmp_path / "out" / qa_ensemble.OUTPUT_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["subject"], r["reference"]) for r in rows] == [
        ("sub_00", "ensemble_mean"), ("sub_00", "member_0"), ("sub_01", "ensemble_mean"), ("sub_01", "member_0")]
    assert np.mean([float(r["qa_auroc_worst"]) for r in rows if r["reference"] == "member_0"]) == \
        pytest.approx(summary["member_0"]["qa_auroc_worst"])
    assert all(float(r["qa_confidence_tumour"]) >= 0 for r in rows)  # the label was read


def test_random_disagreement_is_uninformative(tmp_path):
    datalist, members, _ = _dataset(tmp_path, informative=False, n_subjects=3)
    summary = _run(datalist, members, tmp_path / "out")
    for reference in ("ensemble_mean", "member_0"):
        assert summary[reference]["qa_auroc_worst"] == pytest.approx(0.5, abs=0.1)
        assert abs(summary[reference]["qa_sparsification_gain"]) < 0.25


def test_synthetic_images_in_target_units_are_normalised_by_the_target_window(tmp_path):
    a = _run(*_dataset(tmp_path / "a", informative=True)[:2], tmp_path / "a" / "out")
    datalist, members, _ = _dataset(tmp_path / "b", informative=True, target_units=True)
    b = _run(datalist, members, tmp_path / "b" / "out", target_window=None)
    for k in QA_KEYS + ("mae_foreground",):
        assert b["member_0"][k] == pytest.approx(a["member_0"][k], rel=1e-4, abs=1e-6)
    # read as if already normalised, the same files give other errors
    c = _run(datalist, members, tmp_path / "b" / "out_wrong")
    assert c["member_0"]["mae_foreground"] != pytest.approx(a["member_0"]["mae_foreground"], rel=0.1)


def test_missing_member_file_names_subject_and_path(tmp_path):
    datalist, members, _ = _dataset(tmp_path, informative=True)
    missing = members[2] / "sub_01" / "t1_synthetic.nii.gz"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="sub_01") as e:
        _run(datalist, members, tmp_path / "out")
    assert str(missing) in str(e.value) and "sub_00" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_and_checks_inputs(tmp_path):
    datalist, members, _ = _dataset(tmp_path, informative=True, n_subjects=1)
    _run(datalist, members, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        _run(datalist, members, tmp_path / "out")
    _run(datalist, members, tmp_path / "out", overwrite=True)
    with pytest.raises(ValueError, match="at least 2"):
        _run(datalist, members[:1], tmp_path / "out2")
    _save(members[1] / "sub_00" / "t1_synthetic.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="sub_00.*shape"):
        _run(datalist, members, tmp_path / "out3")


def test_cli(tmp_path):
    datalist, members, _ = _dataset(tmp_path, informative=True, n_subjects=1)
    cmd = [sys.executable, "scripts/qa_ensemble.py", "--members", repr([str(m) for m in members]),
           "--datalist", str(datalist), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / qa_ensemble.OUTPUT_JSON).read_text())["member_0"]["qa_auroc_worst"] > 0.8
