"""Whole-volume inference helpers: input collection and screening, the confidence-map transform, a run summary."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import create_file_basename
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import MapTransform

__all__ = ["ConfidenceMapd", "InferenceInputs", "collect_inputs", "screen_inputs"]

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def collect_inputs(input_path: str | os.PathLike, section: str = "test", source_key: str = "source") -> list[dict]:
    """Items to synthesise: the ``section`` list of a datalist JSON, or every image file under a folder."""
    from .data import load_datalist

    path = Path(input_path)
    if path.is_file() and path.suffix == ".json":
        return load_datalist(path, section)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(IMAGE_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"input folder {str(path)!r} holds no image file ({', '.join(IMAGE_SUFFIXES)}).")
        return [{"subject": f.name.split(".")[0], source_key: str(f)} for f in files]
    raise FileNotFoundError(f"input {str(path)!r} is neither a datalist .json file nor a folder.")


def output_path(source: str, output_dir: str, postfix: str, data_root_dir: str = "", ext: str = ".nii.gz") -> str:
    """The file MONAI's ``SaveImaged(separate_folder=False, data_root_dir=...)`` writes for ``source``."""
    return create_file_basename(postfix, source, output_dir, data_root_dir, separate_folder=False, makedirs=False) + ext


@dataclass
class InferenceInputs:
    """Items that passed screening, and those that did not (with the reason)."""

    items: list[dict]
    failed: list[dict] = field(default_factory=list)
    output_dir: str = "."
    source_key: str = "source"

    def summary(self, engine: Any = None) -> dict:
        """Log and write ``inference_summary.json``: what was synthesised and what failed, and why."""
        done = [i[self.source_key] for i in self.items]
        report = {"synthesised": done, "failed": self.failed}
        os.makedirs(self.output_dir, exist_ok=True)
        Path(self.output_dir, "inference_summary.json").write_text(json.dumps(report, indent=2))
        logger.info("inference: %d file(s) synthesised, %d failed", len(done), len(self.failed))
        for f in self.failed:
            logger.warning("failed: %s: %s", f["file"], f["reason"])
        return report


def screen_inputs(items: Sequence[dict], output_dir: str, source_key: str = "source",
                  postfixes: Sequence[str] = ("synthetic",), data_root_dir: str = "", overwrite: bool = False,
                  ext: str = ".nii.gz") -> InferenceInputs:
    """Check every source image before inference and set aside those that cannot be processed.

    A file is set aside (with its reason) if it cannot be read, is not a 3D volume (a 4D file with one channel is
    accepted), holds non-finite values, or if one of its outputs already exists and ``overwrite`` is false.
    """
    from .readers import load_image as loader

    good, failed = [], []
    for item in items:
        path = item.get(source_key)
        if path is None:
            failed.append({"file": str(item), "reason": f"no {source_key!r} entry"})
            continue
        reason = None
        try:
            img = loader(path)
        except Exception as e:  # noqa: BLE001 - every reader failure is reported for this file only
            reason = f"cannot be read ({type(e).__name__}: {e})"
        else:
            shape = tuple(img.shape)
            if len(shape) == 4 and shape[-1] == 1:
                shape = shape[:3]
            if len(shape) == 4:
                reason = f"has {shape[-1]} channels, expected one 3D volume (shape {shape})"
            elif len(shape) != 3:
                reason = f"is {len(shape)}D with shape {shape}, expected a 3D volume"
            elif not bool(torch.isfinite(torch.as_tensor(img)).all()):
                reason = f"contains {int((~torch.isfinite(torch.as_tensor(img))).sum())} non-finite values (NaN/inf)"
        if reason is None and not overwrite:
            existing = [p for p in (output_path(path, output_dir, pf, data_root_dir, ext) for pf in postfixes)
                        if os.path.exists(p)]
            if existing:
                reason = f"output {existing[0]} exists (pass --overwrite true to replace it)"
        if reason is None:
            good.append(item)
        else:
            logger.error("skipping %s: %s", path, reason)
            failed.append({"file": str(path), "reason": reason})
    return InferenceInputs(items=good, failed=failed, output_dir=output_dir, source_key=source_key)


class ConfidenceMapd(MapTransform):
    """Add the local discriminator's confidence map M = sigmoid(D2(image)) of ``keys`` under ``output_key``.

    Runs in a MONAI post-processing chain on one channel-first image (C, H, W, D) in the network's normalised
    intensity scale, through ``inferer`` (e.g. the same ``SliceInferer`` as the generator). The result keeps the
    image's metadata, so ``Invertd`` and ``SaveImaged`` treat it like the prediction.

    Args:
        keys: the synthetic image key (usually ``pred``).
        network: the local discriminator D2; ``None`` disables the transform.
        inferer: how to apply D2 to a whole volume.
        output_key: key of the confidence map.
        device: device to run D2 on.
        condition_key: for a conditional D2 (trained with ``local_conditional``), the key of the source image that
            D2 sees beside the synthetic one (``image`` in a MONAI evaluator's output); ``None`` otherwise.
    """

    def __init__(self, keys: KeysCollection, network: torch.nn.Module | None, inferer: Inferer | None = None,
                 output_key: str = "confidence", device: str | torch.device | None = None,
                 condition_key: str | None = None) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"ConfidenceMapd takes one key, got {self.keys}.")
        self.network = network
        self.inferer = inferer or SimpleInferer()
        self.output_key = output_key
        self.device = device
        self.condition_key = condition_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.network is None:
            return d
        img = d[self.keys[0]]
        device = self.device or next(self.network.parameters()).device
        x = torch.as_tensor(img).float()
        if self.condition_key is not None:
            x = torch.cat([torch.as_tensor(d[self.condition_key]).float().to(x.device), x], dim=0)
        self.network.eval()
        with torch.no_grad():
            logits = self.inferer(x[None].to(device), self.network)
        conf = torch.sigmoid(torch.as_tensor(logits)[0]).to(torch.as_tensor(img).device)
        d[self.output_key] = MetaTensor(conf, meta=img.meta, applied_operations=list(img.applied_operations)) \
            if isinstance(img, MetaTensor) else conf
        return d
