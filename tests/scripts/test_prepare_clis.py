from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from custom_components.data.datalist import check_datalist, load_datalist
from custom_components.apps.prepare import prepare_brats

REPO = Path(__file__).resolve().parents[2]
SHAPE = (16, 16, 12)
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


def _run(script, *args):
    cmd = [sys.executable, f"scripts/{script}", *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def _volumes(seed, shape=SHAPE):
    """A head-like blob: (source, target, seg), zero outside an ellipsoid."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(shape)
    c = (np.asarray(shape) - 1) / 2
    brain = ((i - c[0]) / 6) ** 2 + ((j - c[1]) / 6) ** 2 + ((k - c[2]) / 4.5) ** 2 < 1
    source = (brain * (50 + 10 * rng.random(shape))).astype(np.float32)
    target = (brain * (80 + 20 * rng.random(shape))).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[7:9, 7:9, 5:7] = rng.choice([1, 2, 4])
    return source, target, seg, brain


def _nii(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))


def _brats_subject(root, sid, seed, sep, names, source=None, target=None, skip=(), target_affine=AFFINE):
    folder = root / sid
    folder.mkdir(parents=True)
    s, t, seg, _ = _volumes(seed)
    s, t = (s if source is None else source), (t if target is None else target)
    arrays = {names[0]: s, names[1]: t, names[2]: s * 1.2, names[3]: t * 0.8, "seg": seg}
    for name, array in arrays.items():
        if name not in skip:
            _nii(folder / f"{sid}{sep}{name}.nii.gz", array, target_affine if name == names[1] else AFFINE)


OLD, NEW = ("t1", "t2", "t1ce", "flair"), ("t1n", "t2w", "t1c", "t2f")

#: Broken BraTS subjects and the words their rejection reason must contain.
BROKEN_BRATS = {
    "BraTS2021_90001": "missing t2 file",
    "BraTS2021_90002": "shape mismatch",
    "BraTS-GLI-90003-000": "non-finite",
    "BraTS2021_90004": "empty foreground",
    "BraTS2021_90005": "affine mismatch",
}


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats") / "BraTS"
    for n in range(4):
        _brats_subject(root, f"BraTS2021_{n:05d}", n, "_", OLD)
    for n in range(3):
        _brats_subject(root, f"BraTS-GLI-{n:05d}-000", 10 + n, "-", NEW)
    _brats_subject(root, "BraTS2021_90001", 20, "_", OLD, skip=("t2",))
    _brats_subject(root, "BraTS2021_90002", 21, "_", OLD, target=_volumes(21, (16, 16, 10))[1])
    _brats_subject(root, "BraTS-GLI-90003-000", 22, "-", NEW, source=np.full(SHAPE, np.nan, np.float32))
    _brats_subject(root, "BraTS2021_90004", 23, "_", OLD, source=np.zeros(SHAPE, np.float32),
                   target=np.zeros(SHAPE, np.float32))
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    _brats_subject(root, "BraTS2021_90005", 24, "_", OLD, target_affine=shifted)
    out = root.parent / "out" / "datalist.json"
    result = _run("prepare_brats.py", "--root", root, "--output", out, "--source", "t1", "--target", "t2",
                  "--seed", 7, "--workers", 2)
    return root, out, result


def test_brats_cli_writes_datalist_with_split_and_rejections(brats):
    root, out, result = brats
    assert result.returncode == 0, result.stderr
    datalist = json.loads(out.read_text())
    good = sorted([f"BraTS2021_{n:05d}" for n in range(4)] + [f"BraTS-GLI-{n:05d}-000" for n in range(3)])
    sections = {s: [i["subject"] for i in datalist[s]] for s in ("training", "validation", "test")}
    assert sorted(sum(sections.values(), [])) == good
    assert [len(v) for v in sections.values()] == [4, 1, 2]
    assert datalist["split"]["seed"] == 7 and "fractions" in datalist["split"]["rule"]
    assert {k: datalist["split"][k] for k in sections} == sections
    assert datalist["task"] == "t1t2" and datalist["num_screened"] == 12
    rejected = {r["subject"]: r["reason"] for r in datalist["rejected"]}
    assert set(rejected) == set(BROKEN_BRATS)
    for sid, words in BROKEN_BRATS.items():
        assert words in rejected[sid], (sid, rejected[sid])
        assert sid in result.stdout and words in result.stdout  # printed in the report
    item = next(i for i in datalist["training"] if i["subject"].startswith("BraTS-GLI"))
    assert item["source"].endswith("-t1n.nii.gz") and item["target"].endswith("-t2w.nii.gz")
    assert item["label"].endswith("-seg.nii.gz") and item["mask"] == f"masks/{item['subject']}_t1_t2_mask.nii.gz"
    for sid in BROKEN_BRATS:
        assert not list((out.parent / "masks").glob(f"{sid}_*mask.nii.gz"))
    assert sorted(p.name for p in root.iterdir()) == sorted(good + list(BROKEN_BRATS))  # input left alone


def test_brats_datalist_passes_check_and_masks_match_brain(brats):
    _, out, _ = brats
    for section in ("training", "validation", "test"):
        items = load_datalist(out, section)
        check_datalist(items, image_keys=("source", "target"), aux_keys=("label", "mask"), name=section)
    item = load_datalist(out, "training")[0]
    mask, source = nib.load(item["mask"]), nib.load(item["source"])
    assert np.allclose(mask.affine, source.affine)
    np.testing.assert_array_equal(mask.get_fdata() > 0, source.get_fdata() > 0)


def test_brats_split_is_deterministic_and_output_is_protected(brats, tmp_path):
    root, out, _ = brats
    again = prepare_brats(root, tmp_path / "datalist.json", seed=7, workers=1)
    first = json.loads(out.read_text())
    for section in ("training", "validation", "test"):
        assert again["split"][section] == first["split"][section]
    other = prepare_brats(root, tmp_path / "other.json", seed=8, overwrite=True)
    assert other["split"]["training"] != first["split"]["training"] or other["split"]["test"] != first["split"]["test"]
    # the CLI function itself refuses to overwrite (run in-process: same code path as the subprocess)
    spec = importlib.util.spec_from_file_location("prepare_brats_cli", REPO / "scripts" / "prepare_brats.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(FileExistsError, match="datalist.json"):
        cli.prepare_brats(str(root), str(out))


@pytest.fixture(scope="module")
def synthrad(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthrad") / "Task1"

    def subject(sid, seed, ext, ct_offset=-1000.0, skip=(), empty_mask=False):
        folder = root / sid
        folder.mkdir(parents=True)
        mr, _, _, body = _volumes(seed)
        ct = np.where(body, 40.0, 0.0).astype(np.float32) + ct_offset * (~body)
        mask = (0 * body if empty_mask else body).astype(np.uint8)
        for name, array in (("mr", mr), ("ct", ct), ("mask", mask)):
            if name in skip:
                continue
            if ext == ".mha":
                img = sitk.GetImageFromArray(array.transpose(2, 1, 0))
                img.SetSpacing((1.0, 1.0, 1.5))
                sitk.WriteImage(img, str(folder / f"{name}.mha"))
            else:
                _nii(folder / f"{name}{ext}", array)

    for n in range(3):
        subject(f"1BA00{n}", n, ".nii.gz")
    subject("1HNA004", 4, ".mha")
    subject("1HNA005", 5, ".mha")
    subject("1BA007", 7, ".nii.gz", ct_offset=0.0)  # not in HU: a warning only
    subject("1BA006", 6, ".nii.gz", skip=("mask",))
    subject("1HNA008", 8, ".mha", empty_mask=True)
    out = root.parent / "synthrad.json"
    return root, out, _run("prepare_synthrad.py", "--root", root, "--output", out, "--fractions", "0.6,0.2,0.2")


def test_synthrad_cli(synthrad):
    root, out, result = synthrad
    assert result.returncode == 0, result.stderr
    datalist = json.loads(out.read_text())
    assert datalist["task"] == "mrct" and datalist["num_accepted"] == 6
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [4, 1, 1]
    assert "fractions 0.6/0.2/0.2" in datalist["split"]["rule"]
    rejected = {r["subject"]: r["reason"] for r in datalist["rejected"]}
    assert "missing mask file" in rejected["1BA006"] and "empty mask" in rejected["1HNA008"]
    assert [w["subject"] for w in datalist["warnings"]] == ["1BA007"]
    assert "Hounsfield" in result.stdout and "1HNA008" in result.stdout
    items = sum((load_datalist(out, s) for s in ("training", "validation", "test")), [])
    assert all("label" not in i and i["source"].endswith(("mr.nii.gz", "mr.mha")) for i in items)
    check_datalist([i for i in items if i["source"].endswith(".nii.gz")], aux_keys=("mask",))
    from monai.transforms import LoadImaged

    from custom_components.data.readers import SimpleITKReader

    mha = next(i for i in items if i["source"].endswith(".mha"))
    loaded = LoadImaged(["source", "target", "mask"], reader=SimpleITKReader(), image_only=True)(mha)
    assert tuple(loaded["source"].shape) == SHAPE and float(loaded["target"].min()) == -1000.0


def test_preprocess_cli(brats, tmp_path):
    _, out, _ = brats
    datalist = json.loads(out.read_text())
    datalist["test"].append({"subject": "broken", "source": str(tmp_path / "broken.nii.gz"),
                             "target": datalist["test"][0]["target"]})
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    modified = out.parent / "with_broken.json"
    modified.write_text(json.dumps(datalist))
    result = _run("preprocess.py", "--input_datalist", modified, "--output_dir", tmp_path / "pre", "--spacing", "2,2,3",
                  "--n4_shrink", 1, "--n4_iterations", "5,5", "--threads", 1, "--workers", 2)
    assert result.returncode == 1, result.stderr  # a failed subject is an error, the others are still written
    assert "FAILED broken (test)" in result.stdout and "preprocessed 7 subject(s)" in result.stdout
    pre = json.loads((tmp_path / "pre" / "datalist.json").read_text())
    assert [i["subject"] for i in pre["training"]] == [i["subject"] for i in datalist["training"]]
    assert pre["failed"][0]["subject"] == "broken" and pre["task"] == "t1t2"
    items = load_datalist(tmp_path / "pre" / "datalist.json", "training")
    check_datalist(items, aux_keys=("label", "mask"))
    img = nib.load(items[0]["source"])
    assert img.shape == (8, 8, 6) and np.allclose(img.header.get_zooms(), (2.0, 2.0, 3.0))
    assert set(np.unique(nib.load(items[0]["label"]).get_fdata())) <= {0, 1, 2, 4}
