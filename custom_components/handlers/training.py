"""Ignite handlers of the synthesis bundle, and the output transforms its logging handlers read the trainer with."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..engines.events import DualAttentionKeys

__all__ = [
    "ErrorWeightedSampling",
    "LossProgressBar",
    "attach_handlers",
    "every_n_iterations",
    "image_panels",
    "loss_terms",
]


def loss_terms(output: Any) -> dict[str, float]:
    """Every plain-float entry (loss terms, gradient penalty, Wasserstein estimate, mean confidence) of the trainer's
    output, for ``StatsHandler``/``TensorBoardStatsHandler``/``MLFlowHandler``.

    Takes the trainer's per-batch dict or MONAI's decollated form of it (a list of such dicts; the first is read).
    """
    item = output[0] if isinstance(output, Sequence) and output and isinstance(output[0], Mapping) else output
    if not isinstance(item, Mapping):
        raise TypeError(f"expected the trainer output dict (or a list of them), got {type(output).__name__}.")
    return {str(k): v for k, v in item.items() if isinstance(v, float)}


def image_panels(output: Mapping) -> torch.Tensor:
    """Synthetic image and, when available, the confidence map M as channels, for ``TensorBoardImageHandler``."""
    panels = [output[DualAttentionKeys.PRED]]
    if DualAttentionKeys.CONFIDENCE in output:
        panels.append(output[DualAttentionKeys.CONFIDENCE])
    return torch.cat(panels, dim=1)


def attach_handlers(engine: Engine, handlers: Iterable[Any]) -> None:
    """Attach each handler of ``handlers`` to ``engine`` in order, skipping ``None`` (a handler a config disabled).

    For handlers that cannot be in the engine's own handler list because they are built from the engine (the
    checkpoint saver and loader save and restore the trainer itself).
    """
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)


def every_n_iterations(n: int) -> Callable[[Engine, int], bool]:
    """Event filter for MONAI ``StatsHandler(iteration_log=...)``: log every ``n``-th iteration."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}.")
    return lambda engine, event: event % n == 0


class LossProgressBar:
    """ignite ``ProgressBar`` attachable from a MONAI handler list, showing ``output_transform``'s values.

    MONAI calls ``handler.attach(engine)``; ignite's ``ProgressBar.attach`` takes the output transform as an
    argument of ``attach``, so this wrapper stores it.
    """

    def __init__(self, output_transform: Callable | None = None, persist: bool = False, **kwargs) -> None:
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=persist, **kwargs)
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self.output_transform)


class ErrorWeightedSampling:
    """Over-sample the regions the generator currently gets wrong (hard-region mining for patch/slice sampling).

    Every ``interval`` epochs the generator is run (``inferer``, no gradient) on each cached training volume of a
    MONAI ``CacheDataset``; the absolute error |G(X) - Y| is added to the volume's sampling weight map (the one
    ``RandWeightedCropd`` draws centres from) as ``error_weight * error / mean error inside the foreground``, on top
    of the base weights (foreground mask + tumour weight, see ``SamplingWeightd``). With ``error_weight = 4`` a voxel
    with average error becomes five times as likely a centre as an error-free foreground voxel.

    Args:
        dataset: the training ``CacheDataset`` whose cached items hold ``source_key``, ``target_key``, ``weight_key``.
        network: the generator.
        inferer: how to apply it to a whole volume (e.g. the validation ``SliceInferer``).
        interval: update every ``interval`` epochs.
        error_weight: weight of the normalised error, > 0.
        source_key, target_key, weight_key: keys in the cached items.
    """

    def __init__(self, dataset, network: torch.nn.Module, inferer: Callable, interval: int,
                 error_weight: float, source_key: str = "source", target_key: str = "target",
                 weight_key: str = "sampling_weight") -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval!r}.")
        if error_weight <= 0:
            raise ValueError(f"error_weight must be > 0, got {error_weight!r}.")
        if not hasattr(dataset, "_cache"):
            raise TypeError(f"dataset must be a MONAI CacheDataset, got {type(dataset).__name__}.")
        self.dataset, self.network, self.inferer = dataset, network, inferer
        self.interval, self.error_weight = interval, float(error_weight)
        self.source_key, self.target_key, self.weight_key = source_key, target_key, weight_key
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine | None = None) -> None:
        device = next(self.network.parameters()).device
        was_training = self.network.training
        self.network.eval()
        updated = 0
        with torch.no_grad():
            for item in self.dataset._cache:
                if not isinstance(item, dict) or self.weight_key not in item:
                    continue
                base = item.setdefault(f"{self.weight_key}_base", item[self.weight_key].clone())
                src = torch.as_tensor(item[self.source_key])[None].to(device)
                err = (torch.as_tensor(self.inferer(src, self.network))[0].cpu().float()
                       - torch.as_tensor(item[self.target_key]).float()).abs()
                inside = torch.as_tensor(base) > 0
                scale = err[inside].mean() if inside.any() else err.mean()
                item[self.weight_key] = base + self.error_weight * inside * err / scale.clamp(min=1e-8)
                updated += 1
        self.network.train(was_training)
        self.logger.info("error-weighted sampling: updated the sampling weights of %d cached volume(s)", updated)
