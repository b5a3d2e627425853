"""Tests of the deterministic paired phantom generator (``custom_components.phantom``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom_components.phantom import (
    TISSUE_LABELS,
    ensure_phantom,
    make_affine,
    make_subject,
    subject_rng,
    write_phantom_dataset,
)

REPO = Path(__file__).resolve().parents[2]
SHAPE = (48, 48, 32)
SPACING = (2.0, 2.0, 3.0)
SMALL = {"n_train": 2, "n_val": 1, "n_test": 1, "shape": SHAPE, "spacing": SPACING}
T = TISSUE_LABELS


def _subject(task: str, index: int, seed: int = 0) -> dict[str, np.ndarray]:
    return make_subject(task, SHAPE, SPACING, subject_rng(seed, index))


@pytest.fixture(scope="module")
def t1t2_subjects() -> list[dict[str, np.ndarray]]:
    return [_subject("t1t2", i, seed=3) for i in range(4)]


@pytest.fixture(scope="module")
def mrct_subjects() -> list[dict[str, np.ndarray]]:
    return [_subject("mrct", i, seed=3) for i in range(3)]


@pytest.fixture(scope="module")
def t1t2_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "t1t2"
    return Path(write_phantom_dataset(out, task="t1t2", seed=1, **SMALL))


def _unexplained_fraction(x: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Share of the variance of ``y`` left within quantile bins of ``x`` (1 - correlation ratio)."""
    edges = np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    bins = np.digitize(x, edges)
    within = sum(float(((y[bins == b] - y[bins == b].mean()) ** 2).sum()) for b in np.unique(bins))
    return within / float(((y - y.mean()) ** 2).sum())


# --------------------------------------------------------------------------- #
# make_subject
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("task", ["t1t2", "mrct"])
def test_deterministic(task: str) -> None:
    a, b, c = _subject(task, 0, seed=7), _subject(task, 0, seed=7), _subject(task, 0, seed=8)
    other = _subject(task, 1, seed=7)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    image = "t1" if task == "t1t2" else "mr"
    assert not np.array_equal(a[image], c[image])
    assert not np.array_equal(a[image], other[image])


def test_t1t2_arrays(t1t2_subjects: list[dict[str, np.ndarray]]) -> None:
    for s in t1t2_subjects:
        assert set(s) == {"t1", "t2", "seg", "brainmask", "tissue"}
        for key in ("t1", "t2"):
            assert s[key].shape == SHAPE and s[key].dtype == np.float32
            assert np.isfinite(s[key]).all() and s[key].min() >= 0.0
        for key in ("seg", "brainmask", "tissue"):
            assert s[key].shape == SHAPE and s[key].dtype == np.uint8
        assert set(np.unique(s["brainmask"])) == {0, 1}
        # the brain mask is the intracranial volume: no scalp, skull or outside air
        outside = np.isin(s["tissue"], [T["background"], T["skin"], T["fat"], T["cortical_bone"], T["diploe"]])
        assert not s["brainmask"][outside].any()
        assert s["brainmask"][np.isin(s["tissue"], [T["csf"], T["gm"], T["wm"]])].all()


def test_tumour_labels(t1t2_subjects: list[dict[str, np.ndarray]]) -> None:
    for s in t1t2_subjects:
        seg = s["seg"]
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        tumour = seg > 0
        assert tumour.sum() > 20
        assert (seg == 4).any() and (seg == 2).any()
        assert s["brainmask"][tumour].all(), "tumour must lie inside the brain mask"
    all_labels = set(np.unique(np.concatenate([s["seg"].ravel() for s in t1t2_subjects])))
    assert all_labels == {0, 1, 2, 4}


def test_t1_t2_contrast(t1t2_subjects: list[dict[str, np.ndarray]]) -> None:
    for s in t1t2_subjects:
        t1 = {k: float(s["t1"][s["tissue"] == T[k]].mean()) for k in ("csf", "gm", "wm", "fat", "cortical_bone")}
        t2 = {k: float(s["t2"][s["tissue"] == T[k]].mean()) for k in ("csf", "gm", "wm", "cortical_bone")}
        assert t1["csf"] < t1["gm"] < t1["wm"] < t1["fat"], t1
        assert t1["cortical_bone"] < t1["gm"]
        assert t2["csf"] > t2["gm"] > t2["wm"] > t2["cortical_bone"], t2
        air = s["tissue"] == T["background"]
        assert s["t1"][air].mean() < 0.1 * t1["wm"] and s["t2"][air].mean() < 0.1 * t2["csf"]
        oedema = s["tissue"] == T["oedema"]
        # oedema: strongly bright in T2, only slightly darker than brain in T1
        assert s["t2"][oedema].mean() > 1.4 * t2["wm"]
        assert s["t1"][oedema].mean() > 0.6 * t1["wm"]


def test_tumour_t2_not_pointwise_function_of_t1(t1t2_subjects: list[dict[str, np.ndarray]]) -> None:
    for s in t1t2_subjects:
        tumour = s["seg"] > 0
        normal = np.isin(s["tissue"], [T["gm"], T["wm"], T["deep_gm"]]) & ~ndimage.binary_dilation(tumour, iterations=2)
        f_tumour = _unexplained_fraction(s["t1"][tumour], s["t2"][tumour])
        f_normal = _unexplained_fraction(s["t1"][normal], s["t2"][normal])
        # binned T1 explains most T2 variance in normal brain, little inside the tumour
        assert f_tumour > 0.6, f_tumour
        assert f_tumour > f_normal + 0.2, (f_tumour, f_normal)


def test_mrct_arrays_and_ct_values(mrct_subjects: list[dict[str, np.ndarray]]) -> None:
    for s in mrct_subjects:
        assert set(s) == {"mr", "ct", "mask", "tissue"}
        mr, ct, mask, tissue = s["mr"], s["ct"], s["mask"], s["tissue"]
        assert mr.dtype == ct.dtype == np.float32 and mask.dtype == np.uint8
        assert mr.shape == ct.shape == mask.shape == SHAPE
        # body mask: the whole head, including scalp, skull and the sinuses inside it
        np.testing.assert_array_equal(mask > 0, tissue > 0)
        assert (tissue == T["sinus"]).any()
        assert abs(float(ct[mask == 0].mean()) + 1000.0) < 5.0
        sinus_core = ndimage.binary_erosion(tissue == T["sinus"])
        assert sinus_core.any() and float(np.median(ct[sinus_core])) < -950.0
        bone = np.isin(tissue, [T["cortical_bone"], T["diploe"]])
        in_range = (ct[bone] >= 700.0) & (ct[bone] <= 2000.0)
        assert in_range.mean() > 0.95 and ct[bone].max() <= 2000.0
        assert float(ct[tissue == T["cortical_bone"]].mean()) > float(ct[tissue == T["diploe"]].mean()) + 300.0
        for k in ("csf", "gm", "wm"):
            assert 0.0 <= float(np.median(ct[tissue == T[k]])) <= 80.0, k
        assert np.median(ct[tissue == T["gm"]]) > np.median(ct[tissue == T["wm"]])
        # MR: bone and air are both dark, so bone vs air is ambiguous from the MR alone
        wm = float(mr[tissue == T["wm"]].mean())
        assert float(mr[bone].mean()) < 0.4 * wm
        assert float(mr[mask == 0].mean()) < 0.1 * wm and float(mr[tissue == T["sinus"]].mean()) < 0.2 * wm


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
    # the files hold exactly what make_subject returns for (seed, index)
    expected = make_subject("t1t2", SHAPE, SPACING, subject_rng(1, 2))
    on_disk = nib.load(root / "phantom_t1t2_002" / "t2.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(on_disk, expected["t2"])
    seg = np.asarray(nib.load(root / "phantom_t1t2_002" / "seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, expected["seg"])


def test_dataset_passes_project_datalist_check(t1t2_dataset: Path) -> None:
    data = pytest.importorskip("custom_components.data")
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
    with caplog.at_level(logging.INFO, logger="custom_components.phantom"):
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
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"n_train": 1, "n_val": 0, "n_test": 0, "shape": SHAPE} | kwargs
    with pytest.raises(ValueError, match=name):
        write_phantom_dataset(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()


def test_make_subject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="task"):
        make_subject("pet", SHAPE, SPACING, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        make_subject("t1t2", (31, 48, 48), SPACING, np.random.default_rng(0))


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
    assert json.loads((out / "phantom.json").read_text())["spacing"] == [1.5, 1.5, 2.0]


def test_defaults_unchanged(tmp_path: Path) -> None:
    """Without ``--shape``/``--spacing`` the data set keeps its original grid, so existing data sets are reused."""
    path = write_phantom_dataset(tmp_path / "default", n_train=1, n_val=0, n_test=0)
    params = json.loads((Path(path).parent / "phantom.json").read_text())
    assert params["shape"] == [96, 96, 48] and params["spacing"] == [2.0, 2.0, 3.0]
    image = nib.load(Path(path).parent / "phantom_t1t2_000" / "t1.nii.gz")
    assert image.shape == (96, 96, 48) and np.allclose(image.header.get_zooms(), (2.0, 2.0, 3.0))


@pytest.mark.slow
def test_brats_size_subject() -> None:
    """A BraTS-size subject (240 x 240 x 155, 1 mm) has a head of realistic size and a tumour inside the brain."""
    s = make_subject("t1t2", (240, 240, 155), (1.0, 1.0, 1.0), subject_rng(0, 0))
    assert s["t1"].shape == s["seg"].shape == (240, 240, 155)
    icv_ml = float(s["brainmask"].sum()) / 1000.0  # 1 mm^3 voxels
    assert 900.0 < icv_ml < 2000.0, icv_ml  # adult intracranial volume is ~1200-1700 mL
    tumour = s["seg"] > 0
    assert tumour.sum() > 1000 and (s["brainmask"][tumour] > 0).mean() > 0.95
    # the head does not touch the edges of the field of view
    head = s["tissue"] > 0
    assert not head[0].any() and not head[-1].any() and not head[:, 0].any() and not head[:, -1].any()
