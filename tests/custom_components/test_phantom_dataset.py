"""Tests of the phantom data set on disk (``custom_components.apps.phantom_dataset``) and its CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_components.apps.phantom import PHANTOM_VERSION, make_subject, subject_rng
from custom_components.apps.phantom_dataset import ensure_phantom, make_affine, write_phantom_dataset

REPO = Path(__file__).resolve().parents[2]
SHAPE = (48, 48, 32)
SPACING = (2.0, 2.0, 3.0)
SMALL = {"n_train": 2, "n_val": 1, "n_test": 1, "shape": SHAPE, "spacing": SPACING}


@pytest.fixture(scope="module")
def t1t2_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "t1t2"
    return Path(write_phantom_dataset(out, task="t1t2", seed=1, **SMALL))


# --------------------------------------------------------------------------- #
# data set on disk
# --------------------------------------------------------------------------- #
def test_dataset_files_and_datalist(t1t2_dataset: Path) -> None:
    root = t1t2_dataset.parent
    datalist = json.loads(t1t2_dataset.read_text())
    assert datalist["task"] == "t1t2"
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [2, 1, 1]
    subjects = [item["subject"] for k in ("training", "validation", "test") for item in datalist[k]]
    assert subjects == [f"phantom_t1t2_{i:03d}" for i in range(4)]
    affine = make_affine(SHAPE, SPACING)
    assert np.allclose(affine[:3, 3], -(np.array(SHAPE) - 1) / 2 * np.array(SPACING))
    for item in datalist["training"] + datalist["validation"] + datalist["test"]:
        assert set(item) == {"subject", "source", "target", "label", "mask"}
        for key, name in (("source", "t1"), ("target", "t2"), ("label", "seg"), ("mask", "brainmask")):
            assert item[key] == f"{item['subject']}/{name}.nii.gz"  # relative to the datalist folder
            image = nib.load(root / item[key])
            assert image.shape == SHAPE
            assert np.allclose(image.affine, affine)
            assert np.allclose(image.header.get_zooms(), SPACING)
            assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
            assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
            dtype = np.float32 if key in ("source", "target") else np.uint8
            assert image.get_data_dtype() == dtype
    params = json.loads((root / "phantom.json").read_text())
    assert params["seed"] == 1 and params["task"] == "t1t2" and params["shape"] == list(SHAPE)
    assert params["version"] == PHANTOM_VERSION == 2 and params["tumour_mode"] == "learnable"  # the default
    # the files hold exactly what make_subject returns for (seed, index)
    expected = make_subject("t1t2", SHAPE, SPACING, subject_rng(1, 2))
    on_disk = nib.load(root / "phantom_t1t2_002" / "t2.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(on_disk, expected["t2"])
    seg = np.asarray(nib.load(root / "phantom_t1t2_002" / "seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, expected["seg"])


def test_dataset_passes_project_datalist_check(t1t2_dataset: Path) -> None:
    data = pytest.importorskip("custom_components.data.datalist")
    items = data.load_datalist(t1t2_dataset, "training")
    assert data.check_datalist(items) is items


def test_mrct_dataset(tmp_path: Path) -> None:
    path = Path(write_phantom_dataset(tmp_path / "mrct", task="mrct", n_train=1, n_val=0, n_test=0, shape=SHAPE))
    datalist = json.loads(path.read_text())
    assert datalist["task"] == "mrct" and datalist["validation"] == [] and datalist["test"] == []
    (item,) = datalist["training"]
    assert item == {
        "subject": "phantom_mrct_000",
        "source": "phantom_mrct_000/mr.nii.gz",
        "target": "phantom_mrct_000/ct.nii.gz",
        "mask": "phantom_mrct_000/mask.nii.gz",
    }
    ct = nib.load(path.parent / item["target"]).get_fdata()
    assert ct.min() >= -1024 and ct.max() > 700


def test_reuse_same_parameters(t1t2_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = t1t2_dataset.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="custom_components.apps.phantom_dataset"):
        again = ensure_phantom(root, task="t1t2", seed=1, **SMALL)
    assert again == str(t1t2_dataset)
    assert "already present" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_overwrite_same_parameters_regenerates(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = {"task": "t1t2", "n_train": 1, "n_val": 0, "n_test": 0, "shape": SHAPE, "seed": 4}
    write_phantom_dataset(out, **args)
    t1_path = out / "phantom_t1t2_000" / "t1.nii.gz"
    t1_path.write_bytes(b"corrupted")
    write_phantom_dataset(out, **args)  # reused as is: same parameters, all files present
    assert t1_path.read_bytes() == b"corrupted"
    write_phantom_dataset(out, overwrite=True, **args)
    expected = make_subject("t1t2", SHAPE, SPACING, subject_rng(4, 0))["t1"]
    np.testing.assert_array_equal(nib.load(t1_path).get_fdata(dtype=np.float32), expected)


def test_different_parameters_raise_then_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_phantom_dataset(out, task="t1t2", n_train=1, n_val=0, n_test=0, shape=SHAPE, seed=0)
    t1_before = nib.load(out / "phantom_t1t2_000" / "t1.nii.gz").get_fdata()
    with pytest.raises(FileExistsError) as err:
        write_phantom_dataset(out, task="t1t2", n_train=1, n_val=0, n_test=0, shape=SHAPE, seed=5)
    assert str(out) in str(err.value) and "seed" in str(err.value)
    with pytest.raises(FileExistsError, match="n_train"):
        ensure_phantom(out, task="t1t2", n_train=2, n_val=0, n_test=0, shape=SHAPE, seed=0)
    # nothing was changed by the refused calls
    np.testing.assert_array_equal(nib.load(out / "phantom_t1t2_000" / "t1.nii.gz").get_fdata(), t1_before)

    (out / "notes.txt").write_text("unrelated file, kept by overwrite")
    write_phantom_dataset(out, task="mrct", n_train=1, n_val=0, n_test=0, shape=SHAPE, seed=5, overwrite=True)
    assert json.loads((out / "phantom.json").read_text())["seed"] == 5
    assert not (out / "phantom_t1t2_000").exists()
    assert (out / "phantom_mrct_000" / "ct.nii.gz").is_file() and (out / "notes.txt").is_file()


def test_other_tumour_mode_is_not_reused(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = {"task": "t1t2", "n_train": 1, "n_val": 0, "n_test": 0, "shape": SHAPE, "seed": 3}
    write_phantom_dataset(out, tumour_mode="irreducible", **args)
    assert json.loads((out / "phantom.json").read_text())["tumour_mode"] == "irreducible"
    t2_path = out / "phantom_t1t2_000" / "t2.nii.gz"
    irreducible = make_subject("t1t2", SHAPE, SPACING, subject_rng(3, 0), tumour_mode="irreducible")["t2"]
    np.testing.assert_array_equal(nib.load(t2_path).get_fdata(dtype=np.float32), irreducible)
    before = t2_path.read_bytes()
    for call in (write_phantom_dataset, ensure_phantom):  # the default mode is "learnable"
        with pytest.raises(FileExistsError, match="tumour_mode: existing 'irreducible' != requested 'learnable'"):
            call(out, **args)
    assert t2_path.read_bytes() == before
    assert ensure_phantom(out, tumour_mode="irreducible", **args) == str(out / "datalist.json")  # same mode: reused
    write_phantom_dataset(out, tumour_mode="learnable", overwrite=True, **args)
    learnable = make_subject("t1t2", SHAPE, SPACING, subject_rng(3, 0), tumour_mode="learnable")["t2"]
    np.testing.assert_array_equal(nib.load(t2_path).get_fdata(dtype=np.float32), learnable)
    assert json.loads((out / "phantom.json").read_text())["tumour_mode"] == "learnable"


def test_data_set_of_older_generator_is_not_reused(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = {"task": "t1t2", "n_train": 1, "n_val": 0, "n_test": 0, "shape": SHAPE, "seed": 0}
    write_phantom_dataset(out, **args)
    params = json.loads((out / "phantom.json").read_text())
    params["version"] = 1  # as written by the generator before tumour_mode existed
    del params["tumour_mode"]
    (out / "phantom.json").write_text(json.dumps(params))
    with pytest.raises(FileExistsError, match=r"version: existing 1 != requested 2.*tumour_mode: existing None"):
        ensure_phantom(out, **args)
    with pytest.raises(FileExistsError, match="tumour_mode"):  # not even for the mode that reproduces version 1
        ensure_phantom(out, tumour_mode="irreducible", **args)


def test_mrct_ignores_tumour_mode(tmp_path: Path) -> None:
    out = tmp_path / "mrct"
    args = {"task": "mrct", "n_train": 1, "n_val": 0, "n_test": 0, "shape": SHAPE, "seed": 0}
    path = write_phantom_dataset(out, tumour_mode="irreducible", **args)
    assert json.loads((out / "phantom.json").read_text())["tumour_mode"] is None
    assert ensure_phantom(out, **args) == path  # the option does not change mrct arrays: reused
    with pytest.raises(ValueError, match=r"tumour_mode must be one of \['irreducible', 'learnable'\]"):
        ensure_phantom(out, tumour_mode="none", **args)


def test_prepare_phantom_passes_tumour_mode(tmp_path: Path) -> None:
    """The bundle config's ``phantom`` dict reaches the writer, ``tumour_mode`` included, and is validated."""
    data = pytest.importorskip("custom_components.apps.phantom_dataset")
    config = {"task": "t1t2", "n_train": 1, "n_val": 0, "n_test": 0, "shape": [32, 32, 32], "seed": 0}
    path = data.prepare_phantom(tmp_path / "ds", config | {"tumour_mode": "irreducible"})
    assert json.loads((Path(path).parent / "phantom.json").read_text())["tumour_mode"] == "irreducible"
    allowed = r"tumour_mode must be one of \['irreducible', 'learnable'\], got tumour_mode='x'"
    with pytest.raises(ValueError, match=allowed):
        data.prepare_phantom(tmp_path / "bad", config | {"tumour_mode": "x"})
    assert not (tmp_path / "bad").exists()


def test_incomplete_dataset_is_completed(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_phantom_dataset(out, task="t1t2", n_train=1, n_val=1, n_test=0, shape=SHAPE, seed=2)
    (out / "phantom_t1t2_001" / "t2.nii.gz").unlink()
    write_phantom_dataset(out, task="t1t2", n_train=1, n_val=1, n_test=0, shape=SHAPE, seed=2)
    assert (out / "phantom_t1t2_001" / "t2.nii.gz").is_file()


def test_foreign_folder_raises(tmp_path: Path) -> None:
    out = tmp_path / "other"
    out.mkdir()
    (out / "scan.nii.gz").write_bytes(b"not a phantom")
    with pytest.raises(FileExistsError, match="holds no phantom"):
        write_phantom_dataset(out, n_train=1, n_val=0, n_test=0, shape=SHAPE)
    assert (out / "scan.nii.gz").read_bytes() == b"not a phantom"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"task": "ct"}, "task"),
        ({"n_train": 0}, "n_train"),
        ({"n_val": -1}, "n_val"),
        ({"n_test": 1.5}, "n_test"),
        ({"shape": (16, 48, 48)}, "shape"),
        ({"shape": (48, 48)}, "shape"),
        ({"shape": (48, 0, 48)}, "shape"),
        ({"spacing": (2.0, 0.0, 3.0)}, "spacing"),
        ({"seed": -1}, "seed"),
        ({"tumour_mode": "random"}, r"tumour_mode must be one of \['irreducible', 'learnable'\]"),
        ({"task": "mrct", "tumour_mode": None}, "tumour_mode"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"n_train": 1, "n_val": 0, "n_test": 0, "shape": SHAPE} | kwargs
    with pytest.raises(ValueError, match=name):
        write_phantom_dataset(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable, "scripts/make_phantom.py", "--output_dir", str(out), "--task", "mrct",
        "--n_train", "1", "--n_val", "1", "--n_test", "0", "--shape", "40,40,32", "--seed", "3",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    datalist = out / "datalist.json"
    assert result.stdout.strip().splitlines()[-1] == str(datalist)
    content = json.loads(datalist.read_text())
    assert content["task"] == "mrct" and len(content["training"]) == 1 and len(content["validation"]) == 1
    assert nib.load(out / content["training"][0]["target"]).shape == (40, 40, 32)
    assert json.loads((out / "phantom.json").read_text())["shape"] == [40, 40, 32]


def test_cli_shape_and_spacing(tmp_path: Path) -> None:
    """``--shape``/``--spacing`` set the grid of every written file; the tumour is still there."""
    out = tmp_path / "sized"
    cmd = [
        sys.executable, "scripts/make_phantom.py", "--output_dir", str(out), "--task", "t1t2", "--n_train", "1",
        "--n_val", "0", "--n_test", "0", "--shape", "64,56,40", "--spacing", "1.5,1.5,2", "--verbose", "false",
        "--tumour_mode", "irreducible",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (item,) = json.loads((out / "datalist.json").read_text())["training"]
    for key in ("source", "target", "label", "mask"):
        image = nib.load(out / item[key])
        assert image.shape == (64, 56, 40)
        assert np.allclose(image.header.get_zooms(), (1.5, 1.5, 2.0))
        np.testing.assert_allclose(image.affine, make_affine((64, 56, 40), (1.5, 1.5, 2.0)))
    seg = np.asarray(nib.load(out / item["label"]).dataobj)
    assert (seg > 0).sum() > 0 and set(np.unique(seg)) <= {0, 1, 2, 4}
    params = json.loads((out / "phantom.json").read_text())
    assert params["spacing"] == [1.5, 1.5, 2.0] and params["tumour_mode"] == "irreducible"
    t2 = nib.load(out / item["target"]).get_fdata(dtype=np.float32)
    expected = make_subject("t1t2", (64, 56, 40), (1.5, 1.5, 2.0), subject_rng(0, 0), tumour_mode="irreducible")
    np.testing.assert_array_equal(t2, expected["t2"])


def test_cli_bad_tumour_mode(tmp_path: Path) -> None:
    cmd = [sys.executable, "scripts/make_phantom.py", "--output_dir", str(tmp_path / "bad"), "--tumour_mode", "easy",
           "--verbose", "false"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "tumour_mode must be one of ['irreducible', 'learnable'], got tumour_mode='easy'" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_defaults_unchanged(tmp_path: Path) -> None:
    """Without ``--shape``/``--spacing`` the data set keeps its original grid, so existing data sets are reused."""
    path = write_phantom_dataset(tmp_path / "default", n_train=1, n_val=0, n_test=0)
    params = json.loads((Path(path).parent / "phantom.json").read_text())
    assert params["shape"] == [96, 96, 48] and params["spacing"] == [2.0, 2.0, 3.0]
    image = nib.load(Path(path).parent / "phantom_t1t2_000" / "t1.nii.gz")
    assert image.shape == (96, 96, 48) and np.allclose(image.header.get_zooms(), (2.0, 2.0, 3.0))
