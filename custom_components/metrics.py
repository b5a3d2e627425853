"""Region-restricted regression metrics (PSNR / MAE inside a mask, e.g. the tumour label)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import ignite.distributed as idist
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.utils import StrEnum

__all__ = ["MaskedRegressionMetric", "batch_items", "masked_mae", "masked_psnr"]


class MaskedMetricType(StrEnum):
    PSNR = "psnr"
    MAE = "mae"
    MSE = "mse"


def _masked_values(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"pred ({tuple(pred.shape)}) and target ({tuple(target.shape)}) must have the same shape.")
    m = torch.as_tensor(mask).to(pred.device) > 0
    if m.shape != pred.shape:
        m = m.expand_as(pred)
    return (pred - target)[m]


def masked_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute error over the voxels where ``mask > 0``; NaN if the mask is empty."""
    d = _masked_values(pred, target, mask)
    return float(d.abs().mean()) if d.numel() else math.nan


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float) -> float:
    """PSNR = 10 log10(data_range^2 / MSE) over the voxels where ``mask > 0``; NaN if the mask is empty."""
    d = _masked_values(pred, target, mask)
    if not d.numel():
        return math.nan
    mse = float((d.float() ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


class MaskedRegressionMetric(Metric):
    """Per-volume PSNR, MAE or MSE inside a mask, averaged over the volumes whose mask is not empty.

    Prediction and target come from ``engine.state.output`` via ``output_transform``; the mask from
    ``engine.state.batch`` via ``batch_transform`` (as in MONAI's ``TensorBoardImageHandler``), because MONAI
    evaluators put the target under ``label`` in their output. Items may be batched tensors or decollated lists.

    Args:
        metric: ``"psnr"``, ``"mae"`` or ``"mse"``.
        data_range: intensity range for PSNR.
        output_transform: engine output -> (pred, target).
        batch_transform: engine batch -> mask (voxels > 0 are inside).
    """

    def __init__(self, metric: str = "psnr", data_range: float = 1.0,
                 output_transform: Callable = lambda x: x, batch_transform: Callable = lambda x: x) -> None:
        self.metric = MaskedMetricType(metric)
        if data_range <= 0:
            raise ValueError(f"data_range must be > 0, got {data_range!r}.")
        self.data_range = float(data_range)
        self.batch_transform = batch_transform
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._values: list[float] = []
        self._empty = 0

    def update(self, output: tuple) -> None:
        pred, target, mask = output
        for p, t, m in zip(pred, target, mask):
            if m is None:
                self._empty += 1
                continue
            p, t = torch.as_tensor(p).float(), torch.as_tensor(t).float().to(torch.as_tensor(p).device)
            if self.metric == MaskedMetricType.PSNR:
                v = masked_psnr(p, t, m, self.data_range)
            else:
                v = masked_mae(p, t, m)
                if self.metric == MaskedMetricType.MSE:
                    d = _masked_values(p, t, m)
                    v = float((d.float() ** 2).mean()) if d.numel() else math.nan
            if math.isnan(v):
                self._empty += 1
            else:
                self._values.append(v)

    def compute(self) -> float:
        total, count = float(sum(self._values)), float(len(self._values))
        if idist.get_world_size() > 1:  # volumes are split across ranks: average over all of them
            total, count = idist.all_reduce(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / count if count else math.nan

    def iteration_completed(self, engine: Engine) -> None:
        pred, target = self._output_transform(engine.state.output)
        self.update((pred, target, self.batch_transform(engine.state.batch)))


def batch_items(key: str) -> Callable:
    """``batch_transform`` returning ``key`` of each batch item, ``None`` where it is absent (e.g. no tumour label)."""

    def _get(batch):
        if isinstance(batch, dict):
            return batch.get(key)
        return [item.get(key) for item in batch]

    return _get
