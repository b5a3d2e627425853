from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from custom_components.apps.prepare import prepare_brats, relative_to_datalist, run_per_subject, screen_subject
from custom_components.apps.splits import split_subjects


def _nii(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------- split


def test_paper_split_with_360_subjects():
    ids = [f"s{i:03d}" for i in range(360)]
    split = split_subjects(ids, seed=3)
    assert split["counts"] == {"training": 200, "validation": 60, "test": 100}
    assert "paper split" in split["rule"] and "+6" in split["rule"]
    assert sorted(split["training"] + split["validation"] + split["test"]) == ids
    assert split == split_subjects(list(reversed(ids)), seed=3)  # depends on the set of ids and the seed only
    assert split["training"] != split_subjects(ids, seed=4)["training"]
    assert split_subjects(ids[:354])["counts"] == {"training": 200, "validation": 60, "test": 94}
    assert split_subjects(ids, paper_split=False)["counts"] == {"training": 202, "validation": 61, "test": 97}


@pytest.mark.parametrize("n, counts", [(3, (1, 1, 1)), (4, (2, 1, 1)), (10, (5, 2, 3)), (353, (198, 60, 95))])
def test_fraction_split(n, counts):
    split = split_subjects([f"s{i}" for i in range(n)], seed=0)
    assert tuple(split["counts"].values()) == counts
    assert "fractions" in split["rule"]


@pytest.mark.parametrize("ids, fractions, match", [
    (["a", "b"], (0.56, 0.17, 0.27), "at least 3"),
    (["a", "a", "b"], (0.56, 0.17, 0.27), "unique"),
    (["a", "b", "c"], (0.5, 0.5, 0.5), "sum to 1"),
    (["a", "b", "c"], (0.5, 0.5), "3 numbers"),
])
def test_split_errors(ids, fractions, match):
    with pytest.raises(ValueError, match=match):
        split_subjects(ids, fractions=fractions)


# ------------------------------------------------------------------------------------------------- screening


def _screen(tmp_path, source, target, mask=None, affine=None, **job):
    files = {"source": _nii(tmp_path / "s.nii.gz", source), "target": _nii(tmp_path / "t.nii.gz", target, affine)}
    if mask is not None:
        files["mask"] = _nii(tmp_path / "m.nii.gz", mask)
    return screen_subject({"subject": "x", "files": files, "problems": [], "atol": 1e-3, **job})


def test_screen_accepts_and_derives_mask(tmp_path):
    vol = np.zeros((8, 8, 6), np.float32)
    vol[2:6, 2:6, 1:5] = 1.0
    vol[3, 3, 2] = 0.0  # a hole inside the brain is filled
    out = tmp_path / "masks" / "x_mask.nii.gz"
    result = _screen(tmp_path, vol, 2 * vol, derive_mask=str(out))
    assert result["accepted"] and result["files"]["mask"] == str(out)
    assert nib.load(str(out)).get_fdata().sum() == 64


@pytest.mark.parametrize("change, reason", [
    (lambda s, t: (s, np.full_like(t, np.nan)), "non-finite"),
    (lambda s, t: (s, t[:, :, :5]), "shape mismatch"),
    (lambda s, t: (np.zeros_like(s), np.zeros_like(t)), "empty foreground"),
])
def test_screen_rejects_with_reason(tmp_path, change, reason):
    vol = np.ones((8, 8, 6), np.float32)
    source, target = change(vol, vol)
    result = _screen(tmp_path, source, target, derive_mask=str(tmp_path / "m.nii.gz"))
    assert not result["accepted"] and reason in "; ".join(result["reasons"])
    assert "mask" not in result["files"]


def test_screen_affine_mask_and_ct_checks(tmp_path):
    vol = np.ones((8, 8, 6), np.float32)
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    assert "affine mismatch" in _screen(tmp_path, vol, vol, mask=vol, affine=shifted)["reasons"][0]
    assert "empty mask" in _screen(tmp_path, vol, vol, mask=0 * vol)["reasons"][0]
    result = _screen(tmp_path, vol, 100 * vol, mask=vol, ct_key="target", hu_min=-500.0)
    assert result["accepted"] and "Hounsfield" in result["warnings"][0]
    assert not _screen(tmp_path, vol, vol - 1000, mask=vol, ct_key="target", hu_min=-500.0)["warnings"]
    (tmp_path / "t.nii.gz").write_bytes(b"garbage")
    result = screen_subject({"subject": "x", "files": {"source": _nii(tmp_path / "s.nii.gz", vol),
                                                       "target": str(tmp_path / "t.nii.gz")}, "atol": 1e-3})
    assert not result["accepted"] and "cannot be read" in result["reasons"][0]


def test_existing_datalist_is_not_overwritten(tmp_path):
    (tmp_path / "datalist.json").write_text("{}")
    (tmp_path / "root").mkdir()
    with pytest.raises(FileExistsError, match="datalist.json"):
        prepare_brats(tmp_path / "root", tmp_path / "datalist.json")
    with pytest.raises(ValueError, match="source must be one of"):
        prepare_brats(tmp_path / "root", tmp_path / "other.json", source="t3")


# ------------------------------------------------------------------------------------------------- helpers


def test_run_per_subject_reports_a_failing_subject_and_goes_on():
    jobs = [{"subject": "a", "x": 2}, {"subject": "b", "x": 0}, {"subject": "c", "x": 4}]
    results = list(run_per_subject(lambda job: {"subject": job["subject"], "y": 1 / job["x"]}, jobs, 1, "test",
                                   lambda job, e: {"subject": job["subject"], "error": type(e).__name__}))
    assert results == [{"subject": "a", "y": 0.5}, {"subject": "b", "error": "ZeroDivisionError"},
                       {"subject": "c", "y": 0.25}]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        list(run_per_subject(lambda job: job, jobs, 0, "test", lambda job, e: job))


def test_relative_to_datalist(tmp_path):
    assert relative_to_datalist(tmp_path / "masks" / "a.nii.gz", tmp_path) == "masks/a.nii.gz"
    outside = tmp_path.parent / "elsewhere" / "a.nii.gz"
    assert relative_to_datalist(outside, tmp_path) == str(outside.resolve())


# ------------------------------------------------------------------------------------------------- issue 17


def _brats_root(root, n=3, seg=None):
    """BraTS 2021 folders in which t1/t2 cover a smaller brain than t1ce/flair (their derived masks differ)."""
    i, j, k = np.indices((12, 12, 8))
    small = ((i - 5.5) ** 2 + (j - 5.5) ** 2) / 16 + (k - 3.5) ** 2 / 9 < 1
    large = ((i - 5.5) ** 2 + (j - 5.5) ** 2) / 25 + (k - 3.5) ** 2 / 12 < 1
    for n_ in range(n):
        sid = f"BraTS2021_{n_:05d}"
        label = np.zeros(small.shape, np.uint8) if seg is None else seg(small)
        label[5:7, 5:7, 3:5] = 1 if seg is None else label[5:7, 5:7, 3:5]
        for name, brain in (("t1", small), ("t2", small), ("t1ce", large), ("flair", large), ("seg", None)):
            data = label if brain is None else (brain * (50.0 + n_)).astype(np.float32)
            _nii(root / sid / f"{sid}_{name}.nii.gz", data)
    return root


def _digest(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_datalists_of_other_modality_pairs_never_share_a_mask_file(tmp_path):
    """Issue 17, item 6: t1->t2 then t1ce->flair into one folder rewrote masks/<ID>_mask.nii.gz under the first
    datalist."""
    import json

    root = _brats_root(tmp_path / "BraTS")
    first = prepare_brats(root, tmp_path / "out" / "t1t2.json", source="t1", target="t2")
    masks = {i["subject"]: tmp_path / "out" / i["mask"] for s in ("training", "validation", "test") for i in first[s]}
    before = {sid: _digest(m) for sid, m in masks.items()}
    second = prepare_brats(root, tmp_path / "out" / "t1ceflair.json", source="t1ce", target="flair")
    assert {sid: _digest(m) for sid, m in masks.items()} == before  # the first datalist's masks are untouched
    item = second["training"][0]
    assert item["mask"] == f"masks/{item['subject']}_flair_t1ce_mask.nii.gz"
    assert masks[item["subject"]].name == f"{item['subject']}_t1_t2_mask.nii.gz"
    assert nib.load(str(tmp_path / "out" / item["mask"])).get_fdata().sum() > nib.load(
        str(masks[item["subject"]])).get_fdata().sum()
    assert json.loads((tmp_path / "out" / "t1t2.json").read_text())["training"][0]["mask"].endswith("_t1_t2_mask.nii.gz")


def test_a_mask_another_datalist_uses_is_never_replaced_by_a_different_one(tmp_path):
    root = _brats_root(tmp_path / "BraTS", n=4)
    first = prepare_brats(root, tmp_path / "out" / "a.json")
    sid = first["training"][0]["subject"]
    mask = tmp_path / "out" / first["training"][0]["mask"]
    before = _digest(mask)
    again = prepare_brats(root, tmp_path / "out" / "b.json")  # same data, same mask: shared, the file untouched
    assert again["rejected"] == [] and _digest(mask) == before
    t1 = root / sid / f"{sid}_t1.nii.gz"
    _nii(t1, np.ones((12, 12, 8), np.float32))  # the data changed: this subject's mask would differ now
    third = prepare_brats(root, tmp_path / "out" / "c.json")
    (rejected,) = third["rejected"]
    assert rejected["subject"] == sid and f"derived mask {mask} is used by" in rejected["reason"]
    assert "a.json" in rejected["reason"] and "b.json" in rejected["reason"] and _digest(mask) == before


@pytest.mark.parametrize("seg, words", [
    (lambda brain: np.where(brain, 7, 255).astype(np.int16), "value(s) 7, 255 outside {0, 1, 2, 3, 4}"),
    (lambda brain: np.ones(brain.shape, np.uint8), "marks 100% of the foreground mask as tumour"),
])
def test_brats_labels_outside_the_brats_values_or_covering_the_brain_reject_the_subject(tmp_path, seg, words):
    """Issue 17, item 8: a label with background 1 gave psnr_tumour = psnr_volume; {7, 255} trained silently."""
    vol = np.zeros((8, 8, 6), np.float32)
    vol[1:7, 1:7, 1:5] = 1.0
    files = {"source": _nii(tmp_path / "s.nii.gz", vol), "target": _nii(tmp_path / "t.nii.gz", 2 * vol),
             "label": _nii(tmp_path / "seg.nii.gz", seg(vol > 0))}
    result = screen_subject({"subject": "BraTS_x", "files": files, "problems": [], "atol": 1e-3,
                             "derive_mask": str(tmp_path / "m.nii.gz"), "label_values": [0, 1, 2, 3, 4]})
    assert not result["accepted"] and words in result["reasons"][0]
    assert f"label file {files['label']}" in result["reasons"][0]
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_ct_without_air_is_named_with_its_file(tmp_path):
    vol = np.ones((8, 8, 6), np.float32)
    result = _screen(tmp_path, vol, 4095 * vol, mask=vol, ct_key="target")  # 0..4095 stored, no intercept
    (warning,) = result["warnings"]
    assert result["accepted"] and f"target file {tmp_path / 't.nii.gz'} has no voxel near -1000 HU" in warning
    assert not _screen(tmp_path, vol, vol - 1024, mask=vol, ct_key="target")["warnings"]
