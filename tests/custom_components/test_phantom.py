"""Tests of the phantom simulation (``custom_components.apps.phantom``)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from custom_components.apps import phantom_tissues
from custom_components.apps.phantom_tissues import TISSUE_LABELS
from custom_components.apps.phantom import TUMOUR_MODES, check_tumour_mode, make_subject, subject_rng

SHAPE = (48, 48, 32)
SPACING = (2.0, 2.0, 3.0)
DEFAULT_SHAPE = (96, 96, 48)  # make_subject's default grid (2 x 2 x 3 mm)
T = TISSUE_LABELS


def _subject(task: str, index: int, seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    return make_subject(task, SHAPE, SPACING, subject_rng(seed, index), **kwargs)


@pytest.fixture(scope="module")
def t1t2_subjects() -> list[dict[str, np.ndarray]]:
    return [_subject("t1t2", i, seed=3) for i in range(4)]


@pytest.fixture(scope="module")
def irreducible_subjects() -> list[dict[str, np.ndarray]]:
    return [_subject("t1t2", i, seed=3, tumour_mode="irreducible") for i in range(4)]


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


def test_irreducible_tumour_t2_not_pointwise_function_of_t1(irreducible_subjects: list[dict[str, np.ndarray]]) -> None:
    for s in irreducible_subjects:
        tumour = s["seg"] > 0
        normal = np.isin(s["tissue"], [T["gm"], T["wm"], T["deep_gm"]]) & ~ndimage.binary_dilation(tumour, iterations=2)
        f_tumour = _unexplained_fraction(s["t1"][tumour], s["t2"][tumour])
        f_normal = _unexplained_fraction(s["t1"][normal], s["t2"][normal])
        # binned T1 explains most T2 variance in normal brain, little inside the tumour
        assert f_tumour > 0.6, f_tumour
        assert f_tumour > f_normal + 0.2, (f_tumour, f_normal)


# --------------------------------------------------------------------------- #
# tumour_mode
# --------------------------------------------------------------------------- #
def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


# sha256 (first 16 hex digits) of the arrays of PHANTOM_VERSION 1 (commit 9e5ffe8, before tumour_mode existed),
# recorded with this venv's numpy and scipy; tumour_mode="irreducible" must reproduce them bit for bit.
_VERSION_1_DIGESTS = {
    ("t1t2", 0, 0, (48, 48, 32)): {"t1": "16c0a6059ef2c2d4", "t2": "7adf6b9ed30af606", "seg": "7f56b0e94c4f8593",
                                   "brainmask": "7ef937a82e920f10", "tissue": "ade346e43bbca5d5"},
    ("t1t2", 3, 1, (48, 48, 32)): {"t1": "53974dc744270a29", "t2": "bf1f97f4b3175cfc", "seg": "163f33bb2d756aad",
                                   "brainmask": "f8e1e3de6bcf9781", "tissue": "2b5f46f89c2c079d"},
    ("t1t2", 1, 2, (40, 36, 32)): {"t1": "32dce6e0d3cfefc4", "t2": "d4f1cd6174300d69", "seg": "c905c18f093b862c",
                                   "brainmask": "faa74a770153ee19", "tissue": "31f99d806bd15ae5"},
    ("mrct", 0, 0, (48, 48, 32)): {"mr": "a549e4ebfd15d9a0", "ct": "51d41147ad6b25e5", "mask": "ccf262437f2c8b5a",
                                   "tissue": "7d9e57fefc7f88c0"},
}
_VERSION_1_VALUES = {  # t2 at voxel (24, 24, 16), sum of t1, sum of t2 (float64)
    ("t1t2", 0, 0, (48, 48, 32)): (712.9425048828125, 11253620.401871853, 10321220.62592705),
    ("t1t2", 3, 1, (48, 48, 32)): (931.4703979492188, 9135496.975925379, 11730039.660516793),
}


@pytest.mark.parametrize("case", list(_VERSION_1_DIGESTS), ids=lambda c: f"{c[0]}-seed{c[1]}-subject{c[2]}")
def test_irreducible_mode_is_version_1(case: tuple) -> None:
    task, seed, index, shape = case
    s = make_subject(task, shape, SPACING, subject_rng(seed, index), tumour_mode="irreducible")
    assert {k: _digest(v) for k, v in s.items()} == _VERSION_1_DIGESTS[case]
    if case in _VERSION_1_VALUES:
        value, t1_sum, t2_sum = _VERSION_1_VALUES[case]
        assert float(s["t2"][24, 24, 16]) == value
        assert float(s["t1"].sum(dtype=np.float64)) == pytest.approx(t1_sum, rel=1e-12)
        assert float(s["t2"].sum(dtype=np.float64)) == pytest.approx(t2_sum, rel=1e-12)


@pytest.mark.parametrize(("seed", "index"), [(0, 0), (3, 1), (5, 2)])
def test_modes_share_anatomy_and_differ_only_in_the_tumour(seed: int, index: int) -> None:
    learn = _subject("t1t2", index, seed=seed, tumour_mode="learnable")
    irr = _subject("t1t2", index, seed=seed, tumour_mode="irreducible")
    for key in ("seg", "brainmask", "tissue"):
        np.testing.assert_array_equal(learn[key], irr[key], err_msg=key)
    # same random stream: bias fields and noise agree, so the images differ only in (and next to) the tumour
    near_tumour = ndimage.binary_dilation(learn["seg"] > 0, np.ones((3, 3, 3), bool), iterations=2)
    for key in ("t1", "t2"):
        np.testing.assert_array_equal(learn[key][~near_tumour], irr[key][~near_tumour], err_msg=key)
        assert not np.array_equal(learn[key][learn["seg"] > 0], irr[key][learn["seg"] > 0]), key


def test_default_mode_is_learnable_and_mrct_ignores_it() -> None:
    default = _subject("t1t2", 0, seed=2)
    learn = _subject("t1t2", 0, seed=2, tumour_mode="learnable")
    for key in default:
        assert default[key].tobytes() == learn[key].tobytes(), key
    a, b = _subject("mrct", 0, seed=2, tumour_mode="learnable"), _subject("mrct", 0, seed=2, tumour_mode="irreducible")
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize("bad", ["Learnable", "", "none", None, 1, ("learnable",)])
@pytest.mark.parametrize("task", ["t1t2", "mrct"])
def test_bad_tumour_mode(task: str, bad: object) -> None:
    allowed = r"tumour_mode must be one of \['irreducible', 'learnable'\]"
    with pytest.raises(ValueError, match=allowed):
        make_subject(task, SHAPE, SPACING, np.random.default_rng(0), tumour_mode=bad)
    with pytest.raises(ValueError, match=allowed):
        check_tumour_mode(bad)
    assert [check_tumour_mode(m) for m in TUMOUR_MODES] == list(TUMOUR_MODES)


def _noise_sigma(s: dict[str, np.ndarray]) -> float:
    """Rician noise sigma from the air around the head (signal 0 there: E[x^2] = 2 sigma^2)."""
    air = ~ndimage.binary_dilation(s["tissue"] > 0, iterations=4)
    return float(np.sqrt(np.mean(s["t1"][air].astype(np.float64) ** 2) / 2.0))


def _residual_variance_fraction(s: dict[str, np.ndarray], trend: bool) -> float:
    """1 - R^2 of T2 regressed on local T1 features inside the tumour, one least-squares fit per tumour label.

    Features: T1 and T1 smoothed with a Gaussian of 1 voxel (and, with ``trend``, a quadratic polynomial of the voxel
    coordinates, which absorbs the smooth T2 bias field: it is drawn independently of T1's, so no image-to-image model
    can predict it, inside the tumour or out). Each label is eroded by one voxel (partial volume at its border) and
    the variance is the one around the label's mean, so the tissue class itself explains nothing.
    """
    t1, t2, seg = s["t1"].astype(np.float64), s["t2"].astype(np.float64), s["seg"]
    smooth = ndimage.gaussian_filter(t1, 1.0)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in seg.shape], indexing="ij")
    ss_res = ss_tot = 0.0
    for label in (1, 2, 4):
        m = ndimage.binary_erosion(seg == label)
        if m.sum() < 30:
            continue
        columns = [np.ones(int(m.sum())), t1[m], smooth[m]]
        if trend:
            g = [x[m] for x in grid]
            columns += g + [a * b for i, a in enumerate(g) for b in g[i:]]
        x, y = np.stack(columns, 1), t2[m]
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        ss_res += float(((y - x @ coef) ** 2).sum())
        ss_tot += float(((y - y.mean()) ** 2).sum())
    return ss_res / ss_tot


@pytest.fixture(scope="module")
def default_size_pairs() -> list[dict[str, dict[str, np.ndarray]]]:
    """Subjects 0-3 of seed 0 at the default size, in both modes."""
    rng = lambda i: subject_rng(0, i)  # noqa: E731
    return [{m: make_subject("t1t2", rng=rng(i), tumour_mode=m) for m in TUMOUR_MODES} for i in range(4)]


def test_learnable_tumour_t2_is_explained_by_t1(default_size_pairs: list) -> None:
    """Measured (seeds (0, 0..7)): R^2 with trend 0.93-0.98 learnable vs 0.16-0.43 irreducible; without the trend
    (the independent T2 bias field counts as unexplained) 0.56-0.95 vs 0.01-0.11."""
    for pair in default_size_pairs:
        r2 = {m: 1.0 - _residual_variance_fraction(pair[m], trend=True) for m in TUMOUR_MODES}
        plain = {m: 1.0 - _residual_variance_fraction(pair[m], trend=False) for m in TUMOUR_MODES}
        assert r2["learnable"] > 0.85, (r2, plain)
        assert r2["irreducible"] < 0.55, (r2, plain)
        assert r2["learnable"] > r2["irreducible"] + 0.4, (r2, plain)
        assert plain["learnable"] > plain["irreducible"] + 0.3, (r2, plain)


def test_learnable_tumour_mapping_is_inverted_and_unlike_normal_tissue(default_size_pairs: list) -> None:
    """Inside each tumour label T2 falls where T1 rises, much more steeply than across normal grey/white matter.

    Measured (a.u. T2 per a.u. smoothed T1): necrosis -3.6 to -9, enhancing rim -3 to -5.4, oedema -1.1 to -2.4;
    normal brain (grey, deep grey and white matter pooled) -0.5 to -1.1; irreducible mode: no consistent sign.
    """
    for pair in default_size_pairs:
        s = pair["learnable"]
        t1, t2, seg, tissue = (s[k].astype(np.float64) for k in ("t1", "t2", "seg", "tissue"))
        smooth = ndimage.gaussian_filter(t1, 1.0)
        tumour = seg > 0
        normal = np.isin(tissue, [T["gm"], T["wm"], T["deep_gm"]]) & ~ndimage.binary_dilation(tumour, iterations=2)
        normal_slope, normal_offset = np.polyfit(smooth[normal], t2[normal], 1)
        assert -1.5 < normal_slope < 0.0, normal_slope
        slopes = {}
        for label in (1, 2, 4):
            m = ndimage.binary_erosion(seg == label)
            if m.sum() >= 30:
                slopes[label] = float(np.polyfit(smooth[m], t2[m], 1)[0])
        assert slopes and all(v < -1.0 for v in slopes.values()), slopes
        core = [v for k, v in slopes.items() if k in (1, 4)]
        assert core and all(v < 2.0 * normal_slope for v in core), (slopes, normal_slope)
        # normal tissue's T1 -> T2 map predicts the tumour worse than its mean does
        m = ndimage.binary_erosion(tumour)
        predicted = normal_offset + normal_slope * smooth[m]
        assert ((t2[m] - predicted) ** 2).mean() > t2[m].var()


def test_learnable_t1_texture_is_well_above_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the default size the T1 texture's std inside the tumour is >= 3x the noise (measured 3.3-8, median 5.4)."""
    for index in range(4):
        s = make_subject("t1t2", rng=subject_rng(0, index))
        with monkeypatch.context() as patch:
            patch.setattr(phantom_tissues, "_LEARNABLE_T1_TEXTURE", 0.0)  # same random stream, texture left out of T1
            flat = make_subject("t1t2", rng=subject_rng(0, index))
        tumour = s["seg"] > 0
        texture_std = float((s["t1"] - flat["t1"])[tumour].std())
        ratio = texture_std / _noise_sigma(s)
        assert ratio >= 3.0, (index, ratio)
        assert texture_std < 0.2 * float(np.median(s["t1"][s["tissue"] == T["wm"]]))  # still a faint texture


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
