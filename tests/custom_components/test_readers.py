from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.bundle import ConfigParser
from monai.transforms import LoadImage, LoadImaged

from custom_components.data.readers import SimpleITKReader

SPACING = (0.8, 1.2, 2.5)
ORIGIN = (10.0, -20.0, 5.5)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90-degree rotation in the x-y plane
VOXELS = [(0, 0, 0), (1, 2, 3), (6, 5, 4), (3, 0, 2)]


def _image(values_zyx: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(values_zyx)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


@pytest.fixture
def written(tmp_path):
    values = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)  # (z, y, x)
    img = _image(values)
    paths = {}
    for suffix in ("mha", "nrrd", "nii.gz"):
        paths[suffix] = str(tmp_path / f"img.{suffix}")
        sitk.WriteImage(img, paths[suffix])
    return values, paths


@pytest.mark.parametrize("suffix", ["mha", "nrrd", "nii.gz"])
def test_affine_shape_and_values_match_nibabel(written, suffix):
    values, paths = written
    truth = nib.load(paths["nii.gz"])  # SimpleITK's NIfTI, read by nibabel: the RAS ground truth
    img = LoadImage(reader=SimpleITKReader(), image_only=True)(paths[suffix])
    assert tuple(img.shape) == (7, 6, 5) == truth.shape
    np.testing.assert_allclose(img.affine.numpy(), truth.affine, atol=1e-5)
    np.testing.assert_allclose(img.pixdim.numpy(), SPACING, atol=1e-6)
    for i, j, k in VOXELS:
        assert float(img[i, j, k]) == pytest.approx(float(values[k, j, i]))
        assert float(img[i, j, k]) == pytest.approx(float(truth.get_fdata()[i, j, k]))
    meta = img.meta
    assert math.isnan(meta["original_channel_dim"])
    np.testing.assert_array_equal(meta["spatial_shape"], [7, 6, 5])
    np.testing.assert_allclose(meta["spacing"], SPACING, atol=1e-6)
    np.testing.assert_allclose(meta["pixdim"][1:4], SPACING, atol=1e-6)
    np.testing.assert_allclose(meta["original_affine"], truth.affine, atol=1e-5)
    assert str(meta["space"]) == "RAS"
    assert meta["filename_or_obj"] == paths[suffix]


def test_lps_affine_option(written):
    _, paths = written
    img = LoadImage(reader=SimpleITKReader(affine_lps_to_ras=False), image_only=True)(paths["mha"])
    assert img.affine[0, 3] == pytest.approx(ORIGIN[0]) and img.affine[1, 3] == pytest.approx(ORIGIN[1])
    assert str(img.meta["space"]) == "LPS"


def test_list_of_files_is_stacked_as_channels(written, tmp_path):
    _, paths = written
    img = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)([paths["mha"], paths["nrrd"]])
    assert tuple(img.shape) == (2, 7, 6, 5)
    other = tmp_path / "other.mha"
    sitk.WriteImage(_image(np.zeros((5, 6, 8), np.float32)), str(other))
    with pytest.raises(ValueError, match="spatial_shape"):
        LoadImage(reader=SimpleITKReader(), image_only=True)([paths["mha"], str(other)])


def test_vector_image_has_channel_last(tmp_path):
    values = np.random.default_rng(1).random((4, 5, 6, 3)).astype(np.float32)  # (z, y, x, c)
    path = str(tmp_path / "vec.mha")
    sitk.WriteImage(sitk.GetImageFromArray(values, isVector=True), path)
    img = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)(path)
    assert tuple(img.shape) == (3, 6, 5, 4)
    assert float(img[2, 5, 1, 3]) == pytest.approx(float(values[3, 1, 5, 2]))


def test_config_target_and_dotted_name(written):
    _, paths = written
    parser = ConfigParser({"load": {"_target_": "LoadImaged", "keys": ["image"], "image_only": True,
                                    "ensure_channel_first": True,
                                    "reader": {"_target_": "custom_components.data.readers.SimpleITKReader"}}})
    out = parser.get_parsed_content("load")({"image": paths["mha"]})
    assert tuple(out["image"].shape) == (1, 7, 6, 5)
    load = LoadImaged("image", reader="custom_components.data.readers.SimpleITKReader", image_only=True)
    out = load({"image": paths["nrrd"]})
    assert tuple(out["image"].shape) == (7, 6, 5)


def test_suffix_and_errors(tmp_path):
    reader = SimpleITKReader()
    assert reader.verify_suffix("a.mha") and reader.verify_suffix("a.mhd")
    assert reader.verify_suffix(["a.nii.gz", "b.nrrd"])
    assert not reader.verify_suffix("a.png")
    with pytest.raises(FileNotFoundError, match="missing.mha"):
        reader.read(str(tmp_path / "missing.mha"))
    (tmp_path / "bad.mha").write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="bad.mha"):
        reader.read(str(tmp_path / "bad.mha"))
    with pytest.raises(ValueError, match="channel_dim"):
        SimpleITKReader(channel_dim="last")


# ---- screen_image: the one input screening of datalist checks, inference and preparation (issue 12) ----------


def _nifti(path, values):
    nib.save(nib.Nifti1Image(np.asarray(values, dtype=np.float32), np.eye(4)), str(path))
    return str(path)


def _bad_files(tmp_path):
    nan = np.ones((6, 5, 4), np.float32)
    nan[0, 0, :2] = np.nan
    nan[1, 1, 1] = np.inf
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    return {
        "missing": (str(tmp_path / "missing.nii.gz"), "does not exist"),
        "unreadable": (str(tmp_path / "broken.nii.gz"), "cannot be read ("),
        "2D": (_nifti(tmp_path / "flat.nii.gz", np.zeros((6, 5))),
               "has shape (6, 5), expected one 3D volume with a single channel (found a 2D image)"),
        "channels": (_nifti(tmp_path / "multi.nii.gz", np.zeros((6, 5, 4, 2))),
                     "has shape (6, 5, 4, 2), expected one 3D volume with a single channel (found 2 channels)"),
        "non-finite": (_nifti(tmp_path / "nan.nii.gz", nan), "contains 3 non-finite values (NaN/inf)"),
    }


@pytest.mark.parametrize("kind", ["missing", "unreadable", "2D", "channels", "non-finite"])
def test_screen_image_names_the_file_and_the_problem(tmp_path, kind):
    from custom_components.data.readers import screen_image

    path, expected = _bad_files(tmp_path)[kind]
    image, problem = screen_image(path, what="source file")
    assert problem is not None and problem.startswith(f"source file {path} ")
    assert expected in problem
    assert (image is not None) == (kind == "non-finite")  # a non-finite image is returned for further comparisons


@pytest.mark.parametrize("suffix", ["mha", "nii.gz"])
def test_screen_image_accepts_a_good_volume_as_load_image_reads_it(written, suffix):
    from custom_components.data.readers import load_image, screen_image

    values, paths = written
    image, problem = screen_image(paths[suffix])
    assert problem is None
    np.testing.assert_array_equal(np.asarray(image), np.asarray(load_image(paths[suffix])))
    np.testing.assert_allclose(image.affine, load_image(paths[suffix]).affine)


def test_screen_image_single_channel_and_value_switches(tmp_path):
    from custom_components.data.readers import screen_image

    one = _nifti(tmp_path / "one.nii.gz", np.zeros((6, 5, 4, 1)))
    assert screen_image(one).problem is None
    problem = screen_image(one, allow_channel=False).problem
    assert "has shape (6, 5, 4, 1), expected one 3D volume (no channel axis) (found a 4D image)" in problem
    nan = _nifti(tmp_path / "nan.nii.gz", np.full((6, 5, 4), np.nan))
    assert screen_image(nan, check_values=False).problem is None
