from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from custom_components.apps.preprocess import n4_bias_correction, preprocess, resample_onto, rigid_register, target_grid


@pytest.fixture(autouse=True)
def one_thread():
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # another process is training on this machine


def _nii(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _grid(n):
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32)
    return x, y, z, (n - 1) / 2


def _blob(n=24, shift=0.0):
    """Smooth asymmetric blob (two Gaussians) in (z, y, x) order, moved by ``shift`` voxels along x."""
    x, y, z, c = _grid(n)
    x = x - shift
    big = np.exp(-(((x - c) / 4) ** 2 + ((y - c) / 5) ** 2 + ((z - c) / 6) ** 2) / 2)
    small = np.exp(-(((x - c - 4) / 2.5) ** 2 + ((y - c + 4) / 2.5) ** 2 + ((z - c - 3) / 2.5) ** 2) / 2)
    return (100 * big + 60 * small).astype(np.float32)


# ------------------------------------------------------------------------------------------------- SimpleITK steps


def test_n4_reduces_multiplicative_bias():
    x, y, z, c = _grid(32)
    sphere = (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 < 12 ** 2
    biased = (100 * sphere * np.exp(0.4 * (x - c) / 32 + 0.2 * (z - c) / 32)).astype(np.float32)
    corrected, info = n4_bias_correction(sitk.GetImageFromArray(biased), shrink_factor=2, iterations=(20, 20, 20))
    after = sitk.GetArrayFromImage(corrected)

    def cv(v):
        return v[sphere].std() / v[sphere].mean()

    assert cv(after) < 0.3 * cv(biased)
    assert info["iterations"] == [20, 20, 20] and info["mask"] == "otsu"


def test_resampling_to_spacing():
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 24, 24)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    grid = target_grid(image, (2.0, 2.0, 2.0))
    assert grid.GetSize() == (12, 12, 12) and grid.GetSpacing() == (2.0, 2.0, 2.0)
    assert grid.GetOrigin() == image.GetOrigin()
    labels = sitk.GetImageFromArray(np.random.default_rng(1).choice([0, 1, 2, 4], (12, 24, 24)).astype(np.uint8))
    labels.CopyInformation(image)
    out = resample_onto(labels, grid, interpolator="nearest")
    assert out.GetSize() == (12, 12, 12) and out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1, 2, 4}
    assert resample_onto(image, target_grid(image)) is image  # same grid: untouched
    with pytest.raises(ValueError, match="spacing"):
        target_grid(image, (1.0, -1.0, 1.0))


def test_rigid_registration_recovers_shift():
    fixed, moving = sitk.GetImageFromArray(_blob()), sitk.GetImageFromArray(_blob(shift=2.0))
    for img in (fixed, moving):
        img.SetSpacing((1.5, 1.0, 1.0))
    transform, info = rigid_register(fixed, moving, shrink_factors=(2, 1), smoothing_sigmas=(1.0, 0.0))
    shift_voxels = np.asarray(info["parameters"][3:]) / np.asarray([1.5, 1.0, 1.0])
    np.testing.assert_allclose(shift_voxels, [2.0, 0.0, 0.0], atol=0.5)
    assert np.abs(info["parameters"][:3]).max() < 0.05  # radians
    assert info["final_metric"] < 0 and info["transform"] == "Euler3DTransform"
    aligned = sitk.GetArrayFromImage(resample_onto(moving, fixed, transform))
    assert np.abs(aligned - _blob()).max() < 0.25 * np.abs(_blob(shift=2.0) - _blob()).max()


# ------------------------------------------------------------------------------------------------- preprocess


def _subject(folder, source, target, broken=False):
    x, y, z, c = _grid(source.shape[0])
    mask = ((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 < 10 ** 2).astype(np.uint8)
    item = {"subject": folder.name}
    for key, value in (("source", source), ("target", target), ("mask", mask)):
        item[key] = f"{folder.name}/{key}.nii.gz"
        _nii(folder / f"{key}.nii.gz", value.transpose(2, 1, 0))  # (z, y, x) -> nibabel's (x, y, z)
    if broken:
        (folder / "source.nii.gz").write_bytes(b"not a nifti")
    return item


def _sphere(n=24):
    x, y, z, c = _grid(n)
    return (100 * ((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 < 9 ** 2) * np.exp(0.3 * (x - c) / n)).astype(np.float32)


FAST = {"n4_shrink": 1, "n4_iterations": (10, 10), "threads": 1}


def test_preprocess_skips_done_subjects_and_survives_a_broken_one(tmp_path):
    data = tmp_path / "data"
    datalist = {"task": "t1t2", "split": {"seed": 0},
                "training": [_subject(data / "a", _sphere(), _sphere()), _subject(data / "b", _sphere(), _sphere())],
                "validation": [_subject(data / "c", _sphere(), _sphere(), broken=True)], "test": []}
    (data / "datalist.json").write_text(json.dumps(datalist))
    out = tmp_path / "out"
    summary = preprocess(data / "datalist.json", out, spacing=(2, 2, 2), **FAST)
    assert summary["done"] == ["a", "b"] and [f["subject"] for f in summary["failed"]] == ["c"]
    assert "source file" in summary["failed"][0]["error"]
    result = json.loads((out / "datalist.json").read_text())
    assert [i["subject"] for i in result["training"]] == ["a", "b"] and result["validation"] == []
    assert result["task"] == "t1t2" and result["split"] == {"seed": 0} and result["failed"][0]["subject"] == "c"
    assert result["training"][0]["mask"] == "a/mask.nii.gz"
    img = nib.load(str(out / "a" / "source.nii.gz"))
    assert img.shape == (12, 12, 12) and np.allclose(img.header.get_zooms(), 2.0)
    assert nib.load(str(out / "a" / "mask.nii.gz")).get_data_dtype() == np.uint8
    log = json.loads((out / "preprocess_log.json").read_text())
    entry = log["subjects"]["a"]
    assert entry["status"] == "done" and entry["steps"] == ["n4_source", "n4_target", "resample_to_spacing"]
    assert entry["n4"]["source"]["iterations"] == [10, 10] and entry["seconds"] >= 0
    assert log["subjects"]["c"]["status"] == "failed"

    again = preprocess(data / "datalist.json", out, spacing=(2, 2, 2), **FAST)
    assert again["skipped"] == ["a", "b"] and again["done"] == [] and len(again["failed"]) == 1
    with pytest.raises(FileExistsError, match="other parameters"):
        preprocess(data / "datalist.json", out, spacing=(1, 1, 1), **FAST)
    (out / "b" / "target.nii.gz").unlink()  # outputs gone: redone although the log says done
    assert preprocess(data / "datalist.json", out, spacing=(2, 2, 2), **FAST)["done"] == ["b"]


def test_preprocess_registers_source_and_skips_n4_of_ct(tmp_path):
    data = tmp_path / "data"
    ct = _blob() * 10 - 1000
    datalist = {"task": "mrct", "training": [_subject(data / "a", _blob(shift=2.0), ct)]}
    (data / "datalist.json").write_text(json.dumps(datalist))
    summary = preprocess(data / "datalist.json", tmp_path / "out", register=True, reg_shrink_factors=(2, 1),
                         reg_smoothing_sigmas=(1.0, 0.0), **FAST)
    assert summary["done"] == ["a"]
    entry = json.loads((tmp_path / "out" / "preprocess_log.json").read_text())["subjects"]["a"]
    assert entry["steps"] == ["n4_source", "register_source_to_target"]
    # the moving blob sits 2 voxels further along i (1 mm); the identity RAS affine is x -> -x in ITK's LPS
    np.testing.assert_allclose(entry["registration"]["parameters"][3:], [-2.0, 0.0, 0.0], atol=0.5)
    source = nib.load(str(tmp_path / "out" / "a" / "source.nii.gz"))
    target = nib.load(str(tmp_path / "out" / "a" / "target.nii.gz"))
    assert source.shape == target.shape and np.allclose(source.affine, target.affine)  # source on the target grid
    np.testing.assert_allclose(target.get_fdata(), ct.transpose(2, 1, 0), atol=1e-3)  # CT: no N4, no resampling
