"""Tests of the phantom simulation (``custom_components.phantom``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from custom_components.phantom import TISSUE_LABELS, make_subject, subject_rng

SHAPE = (48, 48, 32)
SPACING = (2.0, 2.0, 3.0)
T = TISSUE_LABELS


def _subject(task: str, index: int, seed: int = 0) -> dict[str, np.ndarray]:
    return make_subject(task, SHAPE, SPACING, subject_rng(seed, index))


@pytest.fixture(scope="module")
def t1t2_subjects() -> list[dict[str, np.ndarray]]:
    return [_subject("t1t2", i, seed=3) for i in range(4)]


@pytest.fixture(scope="module")
def mrct_subjects() -> list[dict[str, np.ndarray]]:
    return [_subject("mrct", i, seed=3) for i in range(3)]


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


def test_make_subject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="task"):
        make_subject("pet", SHAPE, SPACING, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        make_subject("t1t2", (31, 48, 48), SPACING, np.random.default_rng(0))


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
