"""The phantom's tissues: their codes, their smooth random fields and their appearance in T1, T2 and CT
(:mod:`custom_components.apps.phantom` builds the anatomy from them).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["SEG_LABELS", "TISSUE_LABELS"]


#: Integer codes of the ``tissue`` map returned by :func:`make_subject`.
TISSUE_LABELS: dict[str, int] = {
    "background": 0,
    "skin": 1,
    "fat": 2,
    "cortical_bone": 3,
    "diploe": 4,
    "sinus": 5,
    "csf": 6,
    "gm": 7,
    "deep_gm": 8,
    "wm": 9,
    "necrosis": 10,
    "enhancing": 11,
    "oedema": 12,
}

#: BraTS label values of the ``seg`` image.
SEG_LABELS: dict[str, int] = {"background": 0, "necrosis": 1, "oedema": 2, "enhancing": 4}

_BG, _SKIN, _FAT, _CBONE, _DIPLOE, _SINUS = 0, 1, 2, 3, 4, 5

_CSF, _GM, _DGM, _WM, _NEC, _ENH, _OED = 6, 7, 8, 9, 10, 11, 12

_N_TISSUES = 13

# Mean intensities per tissue: (T1 a.u., T2 a.u., CT HU). Bone and air are dark
# in both MR contrasts; fat is bright in T1; CSF is dark in T1, bright in T2.
_TISSUE_MEANS: dict[int, tuple[float, float, float]] = {
    _BG: (0.0, 0.0, -1000.0),
    _SKIN: (500.0, 420.0, 45.0),
    _FAT: (880.0, 640.0, -90.0),
    _CBONE: (60.0, 45.0, 1550.0),
    _DIPLOE: (200.0, 170.0, 850.0),
    _SINUS: (0.0, 0.0, -1000.0),
    _CSF: (140.0, 1400.0, 8.0),
    _GM: (440.0, 720.0, 40.0),
    _DGM: (520.0, 620.0, 38.0),
    _WM: (650.0, 500.0, 28.0),
    _NEC: (210.0, 1300.0, 15.0),
    _ENH: (480.0, 780.0, 45.0),
    _OED: (0.0, 1120.0, 22.0),  # oedema T1 is relative to the underlying tissue
}

_OEDEMA_T1_FACTOR = 0.88  # oedema is only slightly darker than its tissue in T1

# tumour_mode="learnable" (see _mr_image): T1 inside the tumour gains _LEARNABLE_T1_TEXTURE x (the subject's white
# matter T1) x texture; in T2 the enhancing rim and the necrosis are multiplied by 1 - _LEARNABLE_T2_TEXTURE[class] x
# texture (same field: inverted and steeper), and the oedema's T2 is one inverted linear map of its (noise-free) T1,
# T2 = T2(oedema) - _LEARNABLE_OEDEMA_T2_SLOPE x (T1 - T1 of oedema over white matter), which covers both the
# infiltrated tissue (grey matter: darker T1, brighter T2) and the texture.
_LEARNABLE_T1_TEXTURE = 0.12

_LEARNABLE_T2_TEXTURE: dict[int, float] = {_ENH: 0.45, _NEC: 0.40}

_LEARNABLE_OEDEMA_T2_SLOPE = 2.0


# --------------------------------------------------------------------------- #
# small numeric helpers
# --------------------------------------------------------------------------- #
def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Cubic step from 0 (``x <= lo``) to 1 (``x >= hi``)."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bump(x: np.ndarray, width: float) -> np.ndarray:
    """Tent function: 1 at ``x == 0`` falling linearly to 0 at ``|x| >= width``."""
    return np.maximum(0.0, 1.0 - np.abs(x) / width)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], voxel_mm: np.ndarray, corr_mm: float
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``corr_mm``.

    White noise is drawn on a coarse grid (about two coarse voxels per correlation
    length), smoothed there and linearly upsampled, so a smooth field costs about
    the same as a rough one.

    Args:
        rng: random generator (consumed in a fixed order).
        shape: output shape in voxels.
        voxel_mm: voxel size in millimetres, per axis.
        corr_mm: correlation length in millimetres.

    Returns:
        float32 array of ``shape``.
    """
    shape_arr = np.asarray(shape)
    step = np.maximum(1, np.floor(corr_mm / (2.0 * voxel_mm))).astype(int)
    coarse = shape_arr // step + 3
    noise = rng.standard_normal(tuple(int(c) for c in coarse), dtype=np.float32)
    field = ndimage.gaussian_filter(noise, sigma=corr_mm / (voxel_mm * step), mode="wrap")
    if np.any(step > 1):
        field = ndimage.zoom(field, shape_arr / coarse, order=1, mode="nearest", grid_mode=False)
    field = field[: shape[0], : shape[1], : shape[2]]
    if field.shape != tuple(shape):  # safety net for rounding in zoom
        field = np.pad(field, [(0, s - f) for s, f in zip(shape, field.shape)], mode="edge")
    field = field - field.mean(dtype=np.float64)
    field /= max(float(field.std(dtype=np.float64)), 1e-8)
    return field.astype(np.float32, copy=False)


def _jitter(rng: np.random.Generator, value: float, rel: float) -> float:
    """``value`` times a normal factor ``1 + rel * N(0, 1)`` clipped to ``1 +- 2 rel``."""
    return float(value * (1.0 + rel * np.clip(rng.standard_normal(), -2.0, 2.0)))


# --------------------------------------------------------------------------- #
# image synthesis
# --------------------------------------------------------------------------- #
def _mr_image(
    anatomy: dict[str, np.ndarray],
    contrast: int,
    shape: tuple[int, int, int],
    vox: np.ndarray,
    rng: np.random.Generator,
    tumour_mode: str = "irreducible",
    shared: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Synthesise an MR image (``contrast`` 0 = T1, 1 = T2) from the tissue maps.

    Per-subject jittered tissue means, a faint smooth within-tissue variation, a
    tumour texture (``"irreducible"``: independent textures in T1 and T2;
    ``"learnable"``: one texture, faint in T1, inverted and strong in T2),
    partial-volume blur, a smooth multiplicative bias field and Rician noise.
    The random numbers drawn do not depend on ``tumour_mode``. The T1 call stores
    its tumour texture in ``shared["texture"]``; the learnable T2 call reads it there.
    """
    tissue, anat = anatomy["tissue"], anatomy["anat"]
    learnable = tumour_mode == "learnable"
    table = np.array([_jitter(rng, _TISSUE_MEANS[k][contrast], 0.05) for k in range(_N_TISSUES)], np.float32)
    image = table[tissue]
    oedema = tissue == _OED
    if contrast == 0:  # T1: oedema only slightly darker than the tissue it infiltrates
        image[oedema] = _OEDEMA_T1_FACTOR * table[anat[oedema]]
        if shared is not None:
            shared["t1_table"] = table
    elif learnable:  # T2: oedema over grey matter brighter than over white matter (inverted w.r.t. T1)
        t1_table = shared["t1_table"]
        t1_excess = _OEDEMA_T1_FACTOR * (t1_table[anat[oedema]] - t1_table[_WM])
        image[oedema] = table[_OED] - np.float32(_LEARNABLE_OEDEMA_T2_SLOPE) * t1_excess
    image *= 1.0 + 0.03 * _smooth_field(rng, shape, vox, 20.0)
    tumour = tissue >= _NEC
    if contrast == 1 and tumour.any():
        texture = _smooth_field(rng, shape, vox, 4.0)  # drawn in both modes: the same random stream
        if learnable:  # T1's texture, inverted and steeper: the tumour's T2 is a function of what T1 shows
            texture = shared["texture"]
            strength = np.zeros(_N_TISSUES, np.float32)
            for k, value in _LEARNABLE_T2_TEXTURE.items():
                strength[k] = value
            core = tumour & ~oedema
            image[core] *= np.clip(1.0 - strength[tissue[core]] * texture[core], 0.3, None)
            t1_texture = np.float32(_LEARNABLE_T1_TEXTURE) * shared["t1_table"][_WM] * texture[oedema]
            image[oedema] -= np.float32(_LEARNABLE_OEDEMA_T2_SLOPE) * t1_texture
        else:  # heterogeneous T2 texture inside the tumour, absent from T1
            strength = np.where(tissue == _ENH, 0.3, np.where(tissue == _NEC, 0.2, 0.15)).astype(np.float32)
            image[tumour] *= np.clip(1.0 + strength[tumour] * texture[tumour], 0.3, None)
    elif tumour.any():
        texture = _smooth_field(rng, shape, vox, 6.0)
        if learnable:  # faint, but >= 3x the noise (sigma <= 0.03 x white matter)
            # standardised inside the tumour, so that small tumours get the same texture contrast as large ones
            values = texture[tumour].astype(np.float64)
            texture = ((texture - values.mean()) / max(float(values.std()), 1e-6)).astype(np.float32)
            image[tumour] += np.float32(_LEARNABLE_T1_TEXTURE) * table[_WM] * texture[tumour]
            if shared is not None:
                shared["texture"] = texture
        else:
            image[tumour] *= 1.0 + 0.03 * texture[tumour]
    image = ndimage.gaussian_filter(image, sigma=0.5)  # partial volume / PSF
    image *= np.exp(rng.uniform(0.08, 0.15) * _smooth_field(rng, shape, vox, 80.0))
    sigma = rng.uniform(0.015, 0.03) * float(table[_WM] if contrast == 0 else table[_GM])
    real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def _ct_image(
    anatomy: dict[str, np.ndarray], shape: tuple[int, int, int], vox: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Synthesise a CT image in Hounsfield units from the tissue maps.

    Bone density varies in space: the outer table is densest, the inner table a
    little less, the diploe much less.
    """
    tissue = anatomy["tissue"]
    table = np.array([_TISSUE_MEANS[k][2] for k in range(_N_TISSUES)], np.float32)
    for k in (_SKIN, _FAT, _CSF, _GM, _DGM, _WM, _NEC, _ENH, _OED):
        table[k] += np.float32(rng.normal(0.0, 3.0))
    image = table[tissue]
    density = _smooth_field(rng, shape, vox, 15.0)
    cortical = tissue == _CBONE
    outer = np.clip(1.0 - anatomy["skull_pos"], 0.0, 1.0)  # 1 at the outer surface
    cortical_hu = rng.uniform(1350.0, 1500.0) + 350.0 * outer + 120.0 * density
    diploe_hu = rng.uniform(800.0, 900.0) + 90.0 * density
    image[cortical] = np.clip(cortical_hu[cortical], 1100.0, 1950.0)
    diploe = tissue == _DIPLOE
    image[diploe] = np.clip(diploe_hu[diploe], 720.0, 1100.0)
    image = ndimage.gaussian_filter(image, sigma=0.3)  # slight partial volume
    image += rng.uniform(4.0, 8.0) * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(image, -1024.0, 3071.0).astype(np.float32)
