"""Deterministic paired phantom data set: the project's built-in data set.

Two synthetic paired head data sets are generated from one anatomy model:

* ``task="t1t2"``: brain-tumour phantom for T1 -> T2 synthesis. Each subject has
  a ``t1`` and ``t2`` image, a BraTS-style tumour segmentation ``seg`` (labels
  0 background, 1 necrotic core, 2 oedema, 4 enhancing rim) and a ``brainmask``
  (the intracranial volume: brain, CSF and tumour, without skull and scalp).
* ``task="mrct"``: MRI -> CT head phantom. Each subject has a T1-like ``mr``
  image in which bone and air are both dark, a ``ct`` image in Hounsfield units
  and a body ``mask`` (the whole head including skull and scalp).

The anatomy is built in a reference frame measured in millimetres: a head
ellipsoid with skin, subcutaneous fat and a skull (outer table, diploe, inner
table) that thickens towards the skull base, air-filled sinuses inside the
anterior skull base, a CSF layer with sulci, a folded grey-matter ribbon, white
matter, deep grey matter, lateral and third ventricles and an interhemispheric
fissure. Every subject varies in shape (radii, rotation, shift), tissue
intensities, bias field and noise.

The tumour's T2 appearance (``t1t2`` only) follows ``tumour_mode``:

* ``"learnable"`` (the default): the tumour's T2 is a deterministic function of
  what T1 shows there, but a different one from normal tissue's. One smooth
  texture field (6 mm correlation length, standardised inside the tumour) is
  added to T1 inside the tumour at low amplitude, ``0.12 x`` the subject's
  white-matter T1 (3-8 times the T1 noise at the default size), and appears in T2
  inverted and steeper: the enhancing rim's and the necrosis' T2 is multiplied by
  ``1 - s * texture`` (``s`` 0.45 and 0.40), i.e. about -4.5 and -6.7 a.u. of T2
  per a.u. of T1, against -1.05 between normal grey and white matter. Oedema's T2
  is one inverted linear map of its T1, ``T2 = T2_oedema - 2 * (T1 - T1 of oedema
  over white matter)``: it follows the tissue the oedema infiltrates, which T1
  shows at 0.88 x that tissue (over grey matter darker in T1, brighter in T2 than
  over white matter), and the texture.
* ``"irreducible"``: the generator of version 1 (bit-identical arrays): the
  tumour's T2 carries its own texture that is absent from T1, so it is
  deliberately not a function of the T1 image and its error cannot be learned away.

Both modes draw the same random numbers in the same order, so ``seg``,
``brainmask``, ``tissue``, the bias fields and the noise are the same for a seed;
only the tumour's intensities differ. ``task="mrct"`` has no tumour and ignores
``tumour_mode`` (it is still validated).

Everything is numpy + ``scipy.ndimage``; a subject of the default size
(96 x 96 x 48 voxels of 2 x 2 x 3 mm) takes a fraction of a second, one of
BraTS size (``shape=(240, 240, 155)``, ``spacing=(1, 1, 1)``) about ten seconds.
The anatomy is defined in millimetres, so the size and the voxel spacing only
change the sampling grid, not the head. The same seed gives identical
arrays: subject ``i`` draws from ``np.random.default_rng([seed, i])``.

Writing a data set to disk (and reusing it) is :mod:`custom_components.apps.phantom_dataset`'s job.

Example::

    from custom_components.apps.phantom import make_subject, subject_rng
    arrays = make_subject("t1t2", shape=(96, 96, 48), spacing=(2.0, 2.0, 3.0), rng=subject_rng(0, 3))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from .phantom_tissues import SEG_LABELS, _SKIN, _FAT, _CBONE, _DIPLOE, _SINUS, _CSF, _GM, _DGM, _WM, _NEC, _ENH, _OED, _smoothstep, _bump, _smooth_field, _mr_image, _ct_image

__all__ = [
    "TASKS",
    "TUMOUR_MODES",
    "DEFAULT_TUMOUR_MODE",
    "PHANTOM_VERSION",
    "MIN_SIZE",
    "check_shape",
    "check_spacing",
    "check_task",
    "check_tumour_mode",
    "make_subject",
    "subject_rng",
]

#: Version of the generator; stored in ``phantom.json`` so a data set made by an
#: older generator is not silently reused. Version 2 added ``tumour_mode``
#: (``"irreducible"`` reproduces version 1's arrays, ``"learnable"`` is the new default).
PHANTOM_VERSION = 2

#: Allowed values of ``tumour_mode`` (see the module docstring); the first is the default.
TUMOUR_MODES: tuple[str, ...] = ("learnable", "irreducible")
DEFAULT_TUMOUR_MODE = TUMOUR_MODES[0]

#: Image keys of a subject per task, the files a data set holds (:func:`make_subject` also returns ``tissue``).
TASKS: dict[str, tuple[str, ...]] = {
    "t1t2": ("t1", "t2", "seg", "brainmask"),
    "mrct": ("mr", "ct", "mask"),
}

#: Smallest allowed size of the volume along each axis, in voxels.
MIN_SIZE = 32


# Reference field of view (mm) the anatomy is designed for; smaller fields of view
# scale the head down so it always fits.
_REF_FOV_MM = np.array([192.0, 192.0, 144.0])
_HEAD_RADII_MM = np.array([76.0, 92.0, 63.0])


def _ellipsoid_sdf(q: Sequence[np.ndarray], radii: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid.

    Uses the gradient-normalised implicit function ``k0 * (k0 - 1) / k1``, which is
    exact on the surface and a good approximation near it.
    """
    k0 = np.sqrt(sum((qi / r) ** 2 for qi, r in zip(q, radii)))
    k1 = np.sqrt(sum((qi / (r * r)) ** 2 for qi, r in zip(q, radii)))
    safe = k1 > 1e-9
    return np.where(safe, k0 * (k0 - 1.0) / np.where(safe, k1, 1.0), -float(min(radii)))


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from Euler angles in radians (applied x, then y, then z)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


# --------------------------------------------------------------------------- #
# argument validation
# --------------------------------------------------------------------------- #
def check_task(task: Any) -> str:
    """``task`` if it is one of :data:`TASKS`; a ``ValueError`` naming it otherwise."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got task={task!r}")
    return str(task)


def check_tumour_mode(tumour_mode: Any) -> str:
    """``tumour_mode`` if it is one of :data:`TUMOUR_MODES`; a ``ValueError`` naming it otherwise."""
    if not isinstance(tumour_mode, str) or tumour_mode not in TUMOUR_MODES:
        raise ValueError(f"tumour_mode must be one of {sorted(TUMOUR_MODES)}, got tumour_mode={tumour_mode!r}")
    return str(tumour_mode)


def check_shape(shape: Any) -> tuple[int, int, int]:
    """``shape`` as 3 integers of at least :data:`MIN_SIZE` voxels; a ``ValueError`` naming it otherwise."""
    try:
        values = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of 3 integers, got shape={shape!r}") from None
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"shape must be a sequence of 3 integers, got shape={shape!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"shape must be positive, got shape={shape!r}")
    if any(v < MIN_SIZE for v in values):
        raise ValueError(f"shape must be at least {MIN_SIZE} voxels per axis, got shape={shape!r}")
    return (int(values[0]), int(values[1]), int(values[2]))


def check_spacing(spacing: Any) -> tuple[float, float, float]:
    """``spacing`` as 3 positive finite numbers (mm); a ``ValueError`` naming it otherwise."""
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a sequence of 3 positive numbers, got spacing={spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be a sequence of 3 positive numbers, got spacing={spacing!r}")
    return (values[0], values[1], values[2])


# --------------------------------------------------------------------------- #
# anatomy
# --------------------------------------------------------------------------- #
def _build_anatomy(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator, tumours: bool
) -> dict[str, np.ndarray]:
    """Label every voxel with a tissue class; returns the maps needed for synthesis.

    Returns a dict with ``tissue`` (uint8, final labels), ``anat`` (uint8, labels
    before tumours were inserted), ``head`` and ``icv`` (bool) and ``skull_pos``
    (float32, 0 at the outer and 1 at the inner surface of the skull).
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    fov = np.asarray(shape) * spacing_arr
    scale = min(1.0, float(np.min(fov / _REF_FOV_MM)))  # shrink the head to fit small FOVs
    vox = spacing_arr / scale  # voxel size in reference-frame millimetres

    # subject pose: scanner grid (centred) -> head frame
    angles = np.deg2rad([rng.uniform(-8, 8), rng.uniform(-5, 5), rng.uniform(-10, 10)])
    rot = _rotation(*angles)
    shift = rng.uniform(-1, 1, 3) * np.array([6.0, 6.0, 4.0])
    axes = [((np.arange(n) - (n - 1) / 2.0) * v - t) for n, v, t in zip(shape, vox, shift)]
    grid = np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)
    # q = R^T (p - t): coordinates in the head frame (x right, y anterior, z superior)
    qx, qy, qz = (sum(np.float32(rot[i, j]) * grid[i] for i in range(3)) for j in range(3))

    # ---- head, scalp and skull -------------------------------------------------
    radii = _HEAD_RADII_MM * rng.uniform(0.94, 1.06, 3)
    depth_head = -_ellipsoid_sdf((qx, qy, qz), radii) - 2.5 * _smooth_field(rng, shape, vox, 30.0)
    head = depth_head > 0

    t_scalp = rng.uniform(5.0, 7.0) + 1.0 * _smooth_field(rng, shape, vox, 25.0)
    t_skull = np.maximum(4.0, rng.uniform(6.0, 8.0) + 1.5 * _smooth_field(rng, shape, vox, 20.0))
    # skull base: thick bone inferiorly, thicker still anteriorly (face / sinuses)
    zr, yr = qz / radii[2], qy / radii[1]
    base = _smoothstep(-zr, 0.0, 0.6) * (0.3 + 0.7 * _smoothstep(yr, -0.3, 0.5))
    t_skull = t_skull + rng.uniform(16.0, 22.0) * base
    depth_skull = depth_head - t_scalp  # depth below the outer table
    depth_ic = depth_skull - t_skull  # depth below the inner table (>0: intracranial)
    icv = depth_ic > 0
    skull_pos = np.clip(depth_skull / t_skull, 0.0, 1.0).astype(np.float32)

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[head] = _FAT
    tissue[head & (depth_head < rng.uniform(1.6, 2.4))] = _SKIN
    in_skull = head & (depth_skull > 0) & ~icv
    outer_t = np.clip(0.3 * t_skull, 1.5, 3.0)
    inner_t = np.clip(0.25 * t_skull, 1.2, 2.5)
    cortical = (depth_skull < outer_t) | (depth_ic > -inner_t)
    tissue[in_skull] = _DIPLOE
    tissue[in_skull & cortical] = _CBONE

    # ---- air sinuses inside the anterior skull base (bone walls >= 2 mm) --------
    sinus_dirs = [(0.0, 0.93, -0.2), (-0.35, 0.72, -0.58), (0.35, 0.72, -0.58), (0.0, 0.45, -0.85)]
    sinus_sizes = [7.0, 10.0, 10.0, 8.0]
    blob = _smooth_field(rng, shape, vox, 8.0)
    sinus = np.zeros(shape, dtype=bool)
    for direction, size in zip(sinus_dirs, sinus_sizes):
        u = np.asarray(direction) / np.linalg.norm(direction)
        centre = u * radii * rng.uniform(0.8, 0.86)
        r = size * rng.uniform(0.75, 1.25)
        dist = np.sqrt((qx - centre[0]) ** 2 + (qy - centre[1]) ** 2 + (qz - centre[2]) ** 2) / r
        sinus |= dist * (1.0 + 0.2 * blob) < 1.0
    sinus &= (depth_skull > 2.0) & (depth_ic < -2.0)
    tissue[sinus] = _SINUS

    # ---- intracranial: CSF, folded cortex, white matter ------------------------
    fold = _smooth_field(rng, shape, vox, 9.0)
    t_csf = rng.uniform(2.0, 3.0)
    sulcus_depth = rng.uniform(10.0, 14.0)
    t_gm = np.maximum(3.0, rng.uniform(5.0, 6.5) + 0.8 * _smooth_field(rng, shape, vox, 15.0))
    csf_sulcal = depth_ic - sulcus_depth * _bump(fold, 0.22) < t_csf
    # interhemispheric fissure above the corpus callosum, full depth at the poles
    fissure_w = rng.uniform(0.9, 1.5)
    z_cc = 24.0 - 70.0 * _smoothstep(np.abs(qy), 32.0, 48.0)
    dist_fissure = np.sqrt(np.maximum(np.abs(qx) - fissure_w, 0.0) ** 2 + np.maximum(z_cc - qz, 0.0) ** 2)
    csf = csf_sulcal | (dist_fissure <= 0.0)
    wm_depth = np.minimum(depth_ic - t_csf - sulcus_depth * _bump(fold, 0.6), dist_fissure)
    wm = wm_depth > t_gm
    tissue[icv] = _GM
    tissue[icv & wm] = _WM
    tissue[icv & csf] = _CSF

    # deep grey matter (thalami, basal ganglia) and ventricles
    deform = _smooth_field(rng, shape, vox, 10.0)
    for cx, cy, cz, rx, ry, rz in ((13.0, -6.0, 2.0, 9.0, 13.0, 9.0), (19.0, 9.0, 4.0, 6.5, 12.0, 9.0)):
        for side in (-1.0, 1.0):
            d = _ellipsoid_sdf((qx - side * cx, qy - cy, qz - cz), (rx, ry, rz)) + 1.2 * deform
            tissue[icv & (d < 0) & (tissue == _WM)] = _DGM
    vent_scale = rng.uniform(0.75, 1.3)
    for side in (-1.0, 1.0):  # banana-shaped lateral ventricles
        zc = 12.0 - 0.012 * qy**2
        d = _ellipsoid_sdf((qx - side * 7.5, qy + 2.0, qz - zc), (7.0 * vent_scale, 26.0, 8.0 * vent_scale))
        tissue[icv & (d + 1.2 * deform < 0)] = _CSF
    d3 = _ellipsoid_sdf((qx, qy + 2.0, qz - 1.0), (1.5 * vent_scale, 10.0, 7.0))
    tissue[icv & (d3 < 0)] = _CSF

    anat = tissue.copy()
    if tumours:
        _insert_tumours(tissue, anat, icv, depth_ic, (qx, qy, qz), vox, rng)
    return {"tissue": tissue, "anat": anat, "head": head, "icv": icv, "skull_pos": skull_pos}


def _insert_tumours(
    tissue: np.ndarray,
    anat: np.ndarray,
    icv: np.ndarray,
    depth_ic: np.ndarray,
    q: tuple[np.ndarray, np.ndarray, np.ndarray],
    vox: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Insert 1-3 irregular tumours (necrosis, enhancing rim, oedema) in place."""
    shape = tissue.shape
    qx, qy, qz = q
    shape_noise = _smooth_field(rng, shape, vox, 10.0)
    oedema_noise = _smooth_field(rng, shape, vox, 12.0)
    parenchyma = (anat == _WM) | (anat == _GM) | (anat == _DGM)
    level = np.zeros(shape, dtype=np.uint8)  # 0 none, 1 oedema, 2 enhancing, 3 necrosis
    n_tumours = int(rng.integers(1, 4))
    for _ in range(n_tumours):
        radius = rng.uniform(8.0, 16.0)
        candidates = np.flatnonzero((anat == _WM) & (depth_ic > 1.4 * radius + 4.0))
        if candidates.size == 0:  # tiny brain: fall back to the deepest voxel
            candidates = np.array([int(np.argmax(np.where(icv, depth_ic, -np.inf)))])
        centre_idx = np.unravel_index(int(candidates[rng.integers(candidates.size)]), shape)
        cx, cy, cz = (float(np.broadcast_to(a, shape)[centre_idx]) for a in (qx, qy, qz))
        dist = np.sqrt((qx - cx) ** 2 + (qy - cy) ** 2 + (qz - cz) ** 2) / radius
        dist = dist * (1.0 + 0.22 * shape_noise)
        core_frac = rng.uniform(0.45, 0.7)
        oedema_extent = rng.uniform(1.5, 2.3) * (1.0 + 0.25 * oedema_noise)
        # make sure the centre voxel itself is tumour, so every subject has a tumour
        dist[centre_idx] = 0.0
        level = np.maximum(level, np.where(dist < oedema_extent, 1, 0).astype(np.uint8) * parenchyma)
        level = np.maximum(level, np.where(dist < 1.0, 2, 0).astype(np.uint8) * icv)
        level = np.maximum(level, np.where(dist < core_frac, 3, 0).astype(np.uint8) * icv)
    tissue[level == 1] = _OED
    tissue[level == 2] = _ENH
    tissue[level == 3] = _NEC


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """Random generator of subject ``index`` for data set ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def make_subject(
    task: str,
    shape: tuple[int, int, int] = (96, 96, 48),
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    rng: np.random.Generator | None = None,
    tumour_mode: str = DEFAULT_TUMOUR_MODE,
) -> dict[str, np.ndarray]:
    """Generate the arrays of one phantom subject.

    Args:
        task: ``"t1t2"`` or ``"mrct"``.
        shape: volume shape in voxels, at least 32 per axis.
        spacing: voxel size in millimetres.
        rng: random generator; the arrays are a deterministic function of its state.
        tumour_mode: ``"learnable"`` (default) or ``"irreducible"`` (the version-1
            generator), see the module docstring. Same ``seg``, ``brainmask`` and
            ``tissue`` in both modes. Ignored by ``"mrct"`` (no tumour), but validated.

    Returns:
        ``t1t2``: ``t1``, ``t2`` (float32), ``seg`` (uint8, labels {0, 1, 2, 4}),
        ``brainmask`` (uint8) and ``tissue`` (uint8, see :data:`TISSUE_LABELS`).
        ``mrct``: ``mr`` (float32), ``ct`` (float32, HU), ``mask`` (uint8) and
        ``tissue``. ``tissue`` is meant for tests and analysis, not written to disk.
    """
    task = check_task(task)
    tumour_mode = check_tumour_mode(tumour_mode)
    shape = check_shape(shape)
    spacing = check_spacing(spacing)
    if rng is None:
        rng = np.random.default_rng(0)
    anatomy = _build_anatomy(shape, spacing, rng, tumours=(task == "t1t2"))
    fov = np.asarray(shape) * np.asarray(spacing)
    vox = np.asarray(spacing) / min(1.0, float(np.min(fov / _REF_FOV_MM)))
    tissue = anatomy["tissue"]
    if task == "t1t2":
        seg = np.zeros(shape, dtype=np.uint8)
        seg[tissue == _NEC] = SEG_LABELS["necrosis"]
        seg[tissue == _OED] = SEG_LABELS["oedema"]
        seg[tissue == _ENH] = SEG_LABELS["enhancing"]
        shared: dict[str, np.ndarray] = {}
        return {
            "t1": _mr_image(anatomy, 0, shape, vox, rng, tumour_mode, shared),
            "t2": _mr_image(anatomy, 1, shape, vox, rng, tumour_mode, shared),
            "seg": seg,
            "brainmask": anatomy["icv"].astype(np.uint8),
            "tissue": tissue,
        }
    return {
        "mr": _mr_image(anatomy, 0, shape, vox, rng),
        "ct": _ct_image(anatomy, shape, vox, rng),
        "mask": anatomy["head"].astype(np.uint8),
        "tissue": tissue,
    }
