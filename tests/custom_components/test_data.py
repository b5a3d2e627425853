"""Datalists: loading, checking every subject before training, the phantom step, batch preparation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from custom_components.data.datalist import DatalistError, check_datalist, checked_datalist, load_datalist
from custom_components.apps.phantom_dataset import prepare_phantom


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag(list(spacing) + [1.0])), str(path))
    return str(path)


@pytest.fixture
def subjects(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        d = tmp_path / f"s{i}"
        d.mkdir()
        items.append({"subject": f"s{i}", "source": _write(d / "t1.nii.gz", rng.random((8, 8, 4))),
                      "target": _write(d / "t2.nii.gz", rng.random((8, 8, 4))),
                      "label": _write(d / "seg.nii.gz", np.zeros((8, 8, 4)))})
    return items


def test_good_list_passes(subjects):
    assert check_datalist(subjects) is subjects


def test_every_problem_is_reported_with_subject_and_file(subjects, tmp_path):
    subjects[0]["target"] = str(tmp_path / "s0" / "missing.nii.gz")
    _write(subjects[1]["target"], np.full((8, 8, 4), np.nan))
    with pytest.raises(DatalistError) as e:
        check_datalist(subjects, name="training")
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "subject s0: target file" in msg and "missing.nii.gz does not exist" in msg
    assert "subject s1: target file" in msg and "non-finite" in msg


def test_shape_and_affine_mismatch(subjects):
    _write(subjects[0]["target"], np.zeros((8, 8, 5)))
    _write(subjects[1]["label"], np.zeros((8, 8, 4)), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(DatalistError) as e:
        check_datalist(subjects)
    msg = str(e.value)
    assert "subject s0: target" in msg and "(8, 8, 5), expected (8, 8, 4)" in msg
    assert "subject s1: label" in msg and "affine" in msg


def test_unreadable_and_empty(subjects):
    with open(subjects[0]["source"], "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DatalistError, match="subject s0: source file .* cannot be read"):
        check_datalist(subjects)
    with pytest.raises(DatalistError, match="empty"):
        check_datalist([])
    with pytest.raises(DatalistError, match="no 'target' entry"):
        check_datalist([{"subject": "x", "source": subjects[1]["source"]}])


def test_load_datalist_resolves_relative_paths(tmp_path):
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"subject": "a", "source": "a/t1.nii.gz"}], "validation": []}))
    items = load_datalist(tmp_path / "dl.json", "training")
    assert items == [{"subject": "a", "source": str(tmp_path / "a" / "t1.nii.gz")}]
    with pytest.raises(DatalistError, match="'validation' list is empty"):
        load_datalist(tmp_path / "dl.json", "validation")
    with pytest.raises(DatalistError, match="no 'test' list"):
        load_datalist(tmp_path / "dl.json", "test")
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(tmp_path / "nope.json", "training")


# ---- issue 10, items 9, 10, 13: bad input caught before work --------------------------------------------------


def test_two_channel_source_is_rejected_naming_the_file(subjects):
    _write(subjects[1]["source"], np.zeros((8, 8, 4, 2)))
    with pytest.raises(DatalistError) as e:
        check_datalist(subjects)
    assert f"subject s1: source file {subjects[1]['source']} has shape (8, 8, 4, 2), expected one 3D volume" in str(e.value)
    _write(subjects[1]["source"], np.zeros((8, 8, 4, 1)))  # one channel is fine
    check_datalist(subjects)


def test_duplicate_ids_and_subject_listed_twice_are_named(subjects):
    with pytest.raises(DatalistError) as e:
        check_datalist(subjects + [dict(subjects[0])])
    msg = str(e.value)
    assert "subject id s0 appears 2 times (entries [0, 2])" in msg
    assert f"file {subjects[0]['source']} is listed 2 times (subjects s0, s0)" in msg
    renamed = dict(subjects[1], subject="s9")  # the same images under another id
    with pytest.raises(DatalistError, match=r"is listed 2 times \(subjects s1, s9\)"):
        check_datalist(subjects + [renamed])


def test_training_validation_leakage_is_named(subjects):
    from custom_components.data.datalist import check_splits

    check_splits(subjects[:1], subjects[1:])
    with pytest.raises(DatalistError) as e:
        check_splits(subjects, [subjects[1]], name="dl.json")
    msg = str(e.value)
    assert "subject id s1 is in both the training and the validation list" in msg
    assert "dl.json: 1 subject(s) leak from training into validation" in msg  # one subject, several problem lines
    assert f"file {subjects[1]['source']} is in the training list (subject s1) and the validation list" in msg
    with pytest.raises(DatalistError, match="subject s0"):
        check_splits(subjects[:1], [dict(subjects[0], subject="val7")])


def test_nan_in_mask_or_label_is_caught(subjects):
    _write(subjects[0]["label"], np.full((8, 8, 4), np.nan))
    with pytest.raises(DatalistError, match=r"subject s0: label file .* contains 256 non-finite values"):
        check_datalist(subjects)


def test_training_list_without_masks_is_rejected(subjects):
    from custom_components.data.datalist import require_keys

    with pytest.raises(DatalistError) as e:
        require_keys(subjects, ["mask"], name="training list", why=" (patches are sampled inside the mask)")
    assert "2 entries missing (patches are sampled inside the mask)" in str(e.value)
    assert "subject s0: no 'mask' entry" in str(e.value) and "subject s1: no 'mask' entry" in str(e.value)
    assert require_keys(subjects, ["label"]) is subjects


def test_patch_size_must_be_a_multiple_of_the_total_stride():
    from custom_components.data.datalist import check_patch_size

    check_patch_size([96, 96], 2, {"generator": [2, 2, 2], "local discriminator": 8})
    with pytest.raises(ValueError, match=r"patch_size \[100, 96\]: \[100\] not a multiple of 8, the total stride of the generator"):
        check_patch_size([100, 96], 2, {"generator": [2, 2, 2]})
    with pytest.raises(ValueError, match="not a multiple of 16, the total stride of the local"):
        check_patch_size([24, 24], 2, {"generator": [2, 2, 2], "local discriminator": 16})
    # the half-resolution D2 (total stride 16) would reduce a 16 x 16 patch to one element at its deepest level
    with pytest.raises(ValueError, match=r"1 x 1 at its deepest level .*at least 32"):
        check_patch_size([16, 16], 2, {"generator": [2, 2, 2], "local discriminator": 16})
    check_patch_size([32, 16], 2, {"generator": [2, 2, 2], "local discriminator": 16})
    with pytest.raises(ValueError, match=r"has 2 sizes, expected 3 \(spatial_dims is 3\)"):
        check_patch_size([96, 96], 3, {"generator": [2, 2, 2]})


def test_checked_datalist_names_the_section_and_the_file_and_requires_keys(subjects, tmp_path):
    """train.json's train_datalist: load, check every file, then require the masks patches are sampled in."""
    (tmp_path / "dl.json").write_text(json.dumps({"training": subjects, "validation": subjects[:1]}))
    dl = str(tmp_path / "dl.json")
    assert [i["subject"] for i in checked_datalist(dl, "validation")] == ["s0"]
    with pytest.raises(DatalistError) as e:
        checked_datalist(dl, "training", require=["mask"], why="patches are sampled inside the mask")
    assert str(e.value).startswith(f"training list of {dl}: 2 entries missing (patches are sampled inside the mask)")
    _write(subjects[0]["target"], np.full((8, 8, 4), np.nan))
    (tmp_path / "dl.json").write_text(json.dumps({"training": subjects}))
    with pytest.raises(DatalistError, match=rf"^training list of {dl}: 1 problem\(s\).*\n  subject s0: target"):
        checked_datalist(dl, "training", require=["mask"])  # the files are checked before the keys


def test_prepare_phantom_runs_only_when_switched_on(tmp_path, monkeypatch):
    import custom_components.apps.phantom_dataset

    calls = []
    monkeypatch.setattr(custom_components.apps.phantom_dataset, "ensure_phantom", lambda root, **kw: calls.append((root, kw)) or "dl")
    assert prepare_phantom(tmp_path, {"task": "t1t2", "n_train": 2}, enabled="false") is None
    assert calls == []
    assert prepare_phantom(tmp_path, {"task": "t1t2", "n_train": 2}, enabled="true") == "dl"
    assert calls == [(tmp_path, {"task": "t1t2", "n_train": 2})]
    with pytest.raises(ValueError, match="make_phantom must be true or false"):
        prepare_phantom(tmp_path, {}, enabled="sometimes")


# ---------------------------------------------------------------------------------------------------------------
# issue 17, item 8: labels and units


def test_labels_that_are_not_classes_or_cover_the_mask_are_refused_naming_subject_and_file(subjects):
    """Labels holding {7, 255, -1, 0.5} trained silently; a background coded 1 gave psnr_tumour = psnr_volume."""
    from custom_components.data.datalist import BRATS_LABELS

    odd = np.zeros((8, 8, 4))
    odd[0, 0, 0], odd[0, 1, 0], odd[0, 2, 0], odd[0, 3, 0] = 7, 255, -1, 0.5
    _write(subjects[0]["label"], odd)
    background_one = np.ones((8, 8, 4))
    background_one[2:4, 2:4, 1:3] = 2
    _write(subjects[1]["label"], background_one)
    with pytest.raises(DatalistError) as e:
        check_datalist(subjects, label_values=BRATS_LABELS)
    msg = str(e.value)
    assert f"subject s0: label file {subjects[0]['label']} holds 2 value(s) that are not class numbers (-1, 0.5)" in msg
    assert f"subject s0: label file {subjects[0]['label']} holds value(s) 7, 255 outside {{0, 1, 2, 3, 4}}" in msg
    assert f"subject s1: label file {subjects[1]['label']} marks 100% of the image as tumour" in msg
    with pytest.raises(DatalistError, match="not class numbers"):  # without the BraTS values: still no class numbers
        check_datalist(subjects)


def test_a_brats_or_phantom_datalist_checks_labels_and_a_ct_datalist_checks_units(subjects, tmp_path, caplog):
    import logging

    _write(subjects[0]["label"], np.full((8, 8, 4), 0.0) + (np.arange(8)[:, None, None] == 3) * 7)
    (tmp_path / "dl.json").write_text(json.dumps({"task": "t1t2", "training": subjects}))
    with pytest.raises(DatalistError, match=r"subject s0: label file .* holds value\(s\) 7 outside"):
        checked_datalist(tmp_path / "dl.json", "training")
    _write(subjects[0]["label"], np.zeros((8, 8, 4)))
    for s in subjects:
        _write(s["target"], np.random.default_rng(1).random((8, 8, 4)) * 4095)  # CT stored 0..4095, not HU
    _write(subjects[1]["target"], np.random.default_rng(1).random((8, 8, 4)) * 4000 - 1024)  # this one is HU
    (tmp_path / "ct.json").write_text(json.dumps({"task": "mrct", "training": subjects}))
    with caplog.at_level(logging.WARNING, logger="custom_components.data.datalist"):
        checked_datalist(tmp_path / "ct.json", "training")
    assert f"subject s0: CT file {subjects[0]['target']} has no voxel near -1000 HU (air)" in caplog.text
    assert "subject s1" not in caplog.text


def test_volumes_too_small_for_whole_volume_validation_are_named_from_their_headers(tmp_path):
    """Issue 17, item 10: a 48 x 48 x 1 validation volume failed in SSIM, a 16^3 one in the networks' deepest
    normalisation, both at the first validation (after the whole warm-up) without naming the subject."""
    import nibabel as nib

    from custom_components.data.datalist import DatalistError
    from custom_components.data.shapes import check_volume_sizes
    from custom_components.inferers.inferer import WholeSliceInferer

    items = []
    for name, shape in (("ok", (48, 48, 12)), ("slice", (48, 48, 1)), ("cube", (16, 16, 16)), ("thin", (10, 64, 64))):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
        items.append({"subject": name, "source": str(path)})
    inferer = WholeSliceInferer(sw_batch_size=4, divisor=16)
    check_volume_sizes(items[:1], inferer)
    with pytest.raises(DatalistError) as raised:
        check_volume_sizes(items, inferer, name="validation list")
    text = str(raised.value)
    assert text.startswith("validation list: 3 volume(s) too small")
    assert "subject slice:" in text and "48 x 48 x 1 voxels; every axis needs at least 11" in text
    assert "subject thin:" in text and "subject ok" not in text
    with pytest.raises(DatalistError, match="subject cube: .*its slices are 16 x 16 voxels"):
        check_volume_sizes([items[2]], inferer, min_size=1)


def test_patch_size_is_checked_against_each_axis_s_own_stride():
    """Issue 20: per-axis strides ((2, 2, 1) per level, as MONAI's UNet takes them) were multiplied over all axes
    and levels, so an anisotropic network's patch was judged against a wrong total stride."""
    from custom_components.data.datalist import check_patch_size

    anisotropic = [(2, 2, 1), (2, 2, 1), (2, 2, 2)]  # totals: 8, 8 and 2
    check_patch_size([64, 64, 6], 3, {"generator": anisotropic})
    with pytest.raises(ValueError, match=r"\[5\] not a multiple of \[8, 8, 2\]"):
        check_patch_size([64, 64, 5], 3, {"generator": anisotropic})
    with pytest.raises(ValueError, match="has 2 entries, expected 3"):
        check_patch_size([64, 64, 6], 3, {"generator": [(2, 2)]})
