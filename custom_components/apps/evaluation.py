"""Per-subject, region-aware evaluation: metric tables, a summary, and a Fig. 3-style panel per subject."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics.regression import compute_ssim_and_cs

from ..losses.synthesis import attention_weight
from ..metrics.synthesis import confidence_qa, masked_mae, masked_psnr

__all__ = ["SubjectMetricsWriter", "region_metrics", "save_panel", "subject_metrics"]

logger = logging.getLogger(__name__)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # MONAI SSIMMetric defaults (Gaussian window)


def _ssim_map(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """Local SSIM map of two (C, H, W[, D]) images; its size is the input's minus the window, minus 1, per axis."""
    sd = pred.ndim - 1
    ssim, _ = compute_ssim_and_cs(pred[None].float(), target[None].float(), spatial_dims=sd,
                                  kernel_size=[SSIM_WINDOW] * sd, kernel_sigma=[SSIM_SIGMA] * sd, data_range=data_range)
    return ssim[0]


def region_metrics(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None, data_range: float,
                   ssim_map: torch.Tensor | None = None) -> dict[str, float]:
    """PSNR, SSIM and MAE of ``pred`` against ``target`` inside ``region`` (whole image if ``None``).

    PSNR = 10 log10(data_range^2 / MSE); MAE is the mean absolute difference; SSIM is the mean of the local SSIM
    map (11-voxel Gaussian window, sigma 1.5) over the region's voxels whose window lies inside the image.
    Values are NaN for an empty region.
    """
    if region is None:
        region = torch.ones_like(target)
    region = torch.as_tensor(region).to(pred.device).expand_as(pred) > 0
    out = {"psnr": masked_psnr(pred, target, region, data_range), "mae": masked_mae(pred, target, region)}
    if ssim_map is None:
        ssim_map = _ssim_map(pred, target, data_range)
    crop = (SSIM_WINDOW - 1) // 2
    inner = region[(slice(None),) + tuple(slice(crop, s - crop) for s in region.shape[1:])]
    out["ssim"] = float(ssim_map[inner].mean()) if inner.any() else math.nan
    return out


def subject_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                    label: torch.Tensor | None = None, data_range: float = 1.0,
                    hu_window: Sequence[float] | None = None) -> dict[str, float]:
    """All metrics of one subject, in the normalised intensity scale (pred clipped to [0, data_range]).

    Keys: ``{psnr, ssim, mae}_{volume, foreground, tumour}`` (foreground = ``mask > 0``, tumour = ``label > 0``; NaN
    when the mask or label is absent or empty). With ``hu_window = (lo, hi)`` (CT; the normalised range maps to
    [lo, hi] HU): ``mae_hu_volume``, ``mae_hu_foreground`` and ``psnr_hu_foreground``, the SynthRAD convention
    (HU clipped to [-1024, 3000], data range 4024, inside the body mask).
    """
    pred = torch.as_tensor(pred).float().clamp(0, data_range)
    target = torch.as_tensor(target).float().to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred ({tuple(pred.shape)}) and target ({tuple(target.shape)}) must have the same shape.")
    smap = _ssim_map(pred, target, data_range)
    out: dict[str, float] = {}
    for name, region in (("volume", None), ("foreground", mask), ("tumour", label)):
        if region is None and name != "volume":
            vals = {"psnr": math.nan, "ssim": math.nan, "mae": math.nan}
        else:
            vals = region_metrics(pred, target, region, data_range, smap)
        out.update({f"{k}_{name}": v for k, v in vals.items()})
    if hu_window is not None:
        lo, hi = float(hu_window[0]), float(hu_window[1])
        scale = (hi - lo) / data_range
        to_hu = lambda x: (x * scale + lo).clamp(-1024.0, 3000.0)  # noqa: E731
        p_hu, t_hu = to_hu(pred), to_hu(target)
        out["mae_hu_volume"] = float((p_hu - t_hu).abs().mean())
        body = torch.ones_like(t_hu) if mask is None else torch.as_tensor(mask).to(pred.device)
        out["mae_hu_foreground"] = masked_mae(p_hu, t_hu, body)
        out["psnr_hu_foreground"] = masked_psnr(p_hu, t_hu, body, 4024.0)
    return out


def _largest_tumour_slice(label: np.ndarray | None, mask: np.ndarray | None, depth: int) -> int:
    for region in (label, mask):
        if region is not None and (region > 0).any():
            return int(np.argmax((region > 0).reshape(-1, depth).sum(0)))
    return depth // 2


def attention_panel(confidence: np.ndarray, beta: float, attention_norm: str = "none",
                    attention_floor: float = 0.0) -> np.ndarray:
    """The attention weight a map M gives, as training applies it (:func:`~custom_components.losses.synthesis.attention_weight`:
    F = (1 - M)^beta, normalised by its mean with ``attention_norm="mean"``, floored by ``attention_floor``)."""
    m = torch.as_tensor(np.asarray(confidence, dtype=np.float32))[None, None]
    return attention_weight(m, beta, attention_norm, attention_floor)[0, 0].numpy()


def save_panel(path: str | os.PathLike, source: np.ndarray, pred: np.ndarray, target: np.ndarray,
               confidence: np.ndarray | None = None, beta: float = 2.0, label: np.ndarray | None = None,
               mask: np.ndarray | None = None, title: str = "", attention_norm: str = "none",
               attention_floor: float = 0.0) -> int:
    """Save a Fig. 3-style panel of the axial slice with the largest tumour area (3D arrays, (H, W, D)).

    Columns: source | synthetic | target | absolute error | confidence map M | the attention weight F this map gives
    with the run's ``beta``, ``attention_norm`` and ``attention_floor`` (:func:`attention_panel`), each with a colour
    bar. Returns the slice index shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = _largest_tumour_slice(label, mask, source.shape[-1])
    panels = [("source", source, "gray", None), ("synthetic", pred, "gray", (0, 1)), ("target", target, "gray", (0, 1)),
              ("|error|", np.abs(pred - target), "magma", (0, 0.5))]
    if confidence is not None:
        weight = attention_panel(confidence, beta, attention_norm, attention_floor)
        panels += [("confidence M", confidence, "viridis", (0, 1)),
                   (f"attention F (beta={beta:g}, {attention_norm}, floor {attention_floor:g})", weight, "viridis",
                    (0, max(1.0, float(weight.max()))))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.4))
    for ax, (name, img, cmap, lim) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(np.rot90(img[..., z]), cmap=cmap, vmin=None if lim is None else lim[0],
                       vmax=None if lim is None else lim[1])
        if label is not None and name in ("target", "|error|"):
            ax.contour(np.rot90(label[..., z] > 0), levels=[0.5], colors="r", linewidths=0.6)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(f"{title} (slice {z}; red: tumour outline)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return z


# Not monai.handlers.MetricsSaver: it writes one "<metric>_raw.csv" per metric handler from their per-image details;
# here one subject's ~20 region, HU and confidence-QA values come from one pass (one SSIM map) and form one row of
# metrics.csv, the table scripts/ablation.py aggregates, with the figure of the same subject.
class SubjectMetricsWriter:
    """Evaluator handler: per-subject metrics to ``metrics.csv``, mean/std to ``summary.json``, optional figures.

    Reads each decollated item of ``engine.state.output`` (``pred``, ``target``, optional ``confidence``)
    and of ``engine.state.batch`` (``source``, tumour ``label``, foreground ``mask``, ``subject``). With a
    confidence map, the rows also hold its quality as an error detector (:func:`~custom_components.metrics.synthesis.confidence_qa`).

    Args:
        output_dir: where ``metrics.csv``, ``summary.json`` and ``figures/`` go.
        data_range: normalised intensity range of the images.
        hu_window: (lo, hi) HU of the normalised range for CT targets, else ``None``.
        beta, attention_norm, attention_floor: the run's attention settings, for the F panel of the figures (the
            first two are required with ``figures``; the bundle passes its options).
        figures: write one PNG per subject.
        overwrite: replace existing ``metrics.csv``/``summary.json``.
    """

    def __init__(self, output_dir: str, data_range: float = 1.0, hu_window: Sequence[float] | None = None,
                 beta: float | None = None, figures: bool = True, overwrite: bool = False, source_key: str = "source",
                 label_key: str = "label", mask_key: str = "mask", attention_norm: str | None = None,
                 attention_floor: float = 0.0) -> None:
        if figures and (beta is None or attention_norm is None):
            raise ValueError("figures need the run's beta and attention_norm (for the F panel); the bundle passes "
                             "@beta and @attention_norm.")
        self.output_dir = Path(output_dir)
        self.attention_norm, self.attention_floor = attention_norm, float(attention_floor)
        self.data_range, self.hu_window, self.beta, self.figures = data_range, hu_window, beta, figures
        self.overwrite = overwrite
        self.source_key, self.label_key, self.mask_key = source_key, label_key, mask_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _start(self, engine: Engine) -> None:
        existing = [p for p in (self.output_dir / "metrics.csv", self.output_dir / "summary.json") if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(f"{existing[0]} exists; pass '--overwrite true' or choose another --eval_dir.")
        self.rows = []

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        output = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for b, o in zip(batch, output):
            subject = b.get("subject") or Path(str(b[self.source_key].meta.get("filename_or_obj", "?"))).parent.name
            label, mask = b.get(self.label_key), b.get(self.mask_key)
            row = {"subject": subject}
            row.update(subject_metrics(o["pred"], o["target"], mask, label, self.data_range, self.hu_window))
            if o.get("confidence") is not None:  # the QA map offered at inference: does it point at the errors?
                row.update(confidence_qa(o["confidence"], o["pred"], o["target"], mask, label,
                                         data_range=self.data_range))
            self.rows.append(row)
            if self.figures:
                arr = lambda x: None if x is None else torch.as_tensor(x).detach().cpu().float().numpy()[0]  # noqa: E731
                save_panel(self.output_dir / "figures" / f"{subject}.png", arr(b[self.source_key]),
                           np.clip(arr(o["pred"]), 0, self.data_range), arr(o["target"]), arr(o.get("confidence")),
                           self.beta, arr(label), arr(mask), title=str(subject), attention_norm=self.attention_norm,
                           attention_floor=self.attention_floor)

    def summary(self) -> dict[str, dict[str, float]]:
        keys = [k for k in self.rows[0] if k != "subject"] if self.rows else []
        out = {}
        for k in keys:
            vals = np.array([r[k] for r in self.rows], dtype=float)
            vals = vals[np.isfinite(vals)]
            out[k] = {"mean": float(vals.mean()) if vals.size else math.nan,
                      "std": float(vals.std(ddof=1)) if vals.size > 1 else math.nan, "n": int(vals.size)}
        return out

    def write(self, engine: Engine | None = None) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        summary = self.summary()
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        lines = [f"{'metric':<22}{'mean':>10}{'std':>10}{'n':>5}"]
        lines += [f"{k:<22}{v['mean']:>10.4f}{v['std']:>10.4f}{v['n']:>5}" for k, v in summary.items()]
        logger.info("evaluation of %d subject(s), written to %s:\n%s", len(self.rows), self.output_dir, "\n".join(lines))
