from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from custom_components.data import DatalistError, check_datalist, check_run_dirs, latest_checkpoint, load_datalist


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


def test_run_dirs_never_overwrite_silently(tmp_path):
    ckpt, model = tmp_path / "ckpt", tmp_path / "model.pt"
    ckpt.mkdir()
    check_run_dirs(ckpt, model)  # fresh: fine
    with pytest.raises(FileNotFoundError, match="resume was requested"):
        check_run_dirs(ckpt, model, resume=True)
    (ckpt / "checkpoint_epoch=1.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--resume true"):
        check_run_dirs(ckpt, model)
    check_run_dirs(ckpt, model, resume=True)
    assert latest_checkpoint(ckpt).endswith("checkpoint_epoch=1.pt")
    check_run_dirs(ckpt, model, overwrite=True)
    assert not list(ckpt.iterdir())


def test_as_flag_reads_command_line_text():
    from custom_components.data import as_flag

    assert as_flag(True) and as_flag("true") and as_flag("1") and as_flag("True")
    assert not as_flag(False) and not as_flag("false") and not as_flag("0")
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        as_flag("maybe", "resume")
