"""Whole-volume inference helpers: input collection and screening, the confidence-map transform, a run summary."""

from __future__ import annotations

import json
import logging
import os
import time
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

from .options import as_flag
from .runs import check_writable

__all__ = [
    "ConfidenceMapd", "InferenceError", "InferenceInputs", "collect_inputs", "common_root", "confidence_condition_key",
    "inference_inputs", "input_root", "screen_inputs",
]

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


def input_root(input_path: str | os.PathLike) -> str:
    """The folder an input names: a datalist file's folder, or the input folder itself (absolute).

    inference.json's default ``data_root_dir``: outputs mirror the inputs' sub-folders below it.
    """
    path = os.path.abspath(input_path)
    return os.path.dirname(path) if os.path.isfile(path) else path


def output_path(source: str, output_dir: str, postfix: str, data_root_dir: str = "", ext: str = ".nii.gz") -> str:
    """The file MONAI's ``SaveImaged(separate_folder=False, data_root_dir=...)`` writes for ``source``."""
    return create_file_basename(postfix, source, output_dir, data_root_dir, separate_folder=False, makedirs=False) + ext


def common_root(items: Sequence[dict], source_key: str = "source") -> str:
    """The deepest folder holding every source image of ``items`` (``""`` if there is none).

    Used as ``data_root_dir`` of ``SaveImaged``: outputs mirror the inputs' sub-folders below it, and no relative
    path can climb out of the output folder.
    """
    folders = [os.path.dirname(os.path.abspath(i[source_key])) for i in items if isinstance(i.get(source_key), str)]
    return os.path.commonpath(folders) if folders else ""


class InferenceError(RuntimeError):
    """Some inputs could not be synthesised; the message lists them (the run summary has the details)."""


@dataclass
class InferenceInputs:
    """Items that passed screening, those that did not (with the reason), and those whose outputs already exist."""

    items: list[dict]
    failed: list[dict] = field(default_factory=list)
    output_dir: str = "."
    source_key: str = "source"
    skipped: list[dict] = field(default_factory=list)
    data_root_dir: str = ""
    outputs: dict[str, list[str]] = field(default_factory=dict)

    def run(self, evaluator: Any = None) -> dict:
        """Run ``evaluator`` on the screened items, then write the summary; :class:`InferenceError` if any failed.

        An item counts as synthesised only if all its output files were written by this run; an error during the
        run is reported for every item left unwritten, and the summary is still written.
        """
        start, error = time.time() - 1.0, None
        if evaluator is not None and self.items:
            try:
                evaluator.run()
            except Exception as e:  # noqa: BLE001 - reported in the summary and re-raised as InferenceError
                error = f"{type(e).__name__}: {e}"
                logger.error("inference stopped: %s", error)
        done, failed = [], list(self.failed)
        for item in self.items:
            src = item[self.source_key]
            planned = self.outputs.get(src, [])
            if planned and all(os.path.exists(p) and os.path.getmtime(p) >= start for p in planned):
                done.append(src)
            else:
                failed.append({"file": src, "reason": f"output not written ({error or 'unknown reason'})"})
        return self.summary(done=done, failed=failed, error=error)

    def summary(self, engine: Any = None, done: list[str] | None = None, failed: list[dict] | None = None,
                error: str | None = None) -> dict:
        """Log and write ``inference_summary.json`` (an earlier one is kept under a dated name); raise
        :class:`InferenceError` naming every failed input."""
        done = [i[self.source_key] for i in self.items] if done is None else done
        failed = self.failed if failed is None else failed
        report = {"synthesised": done, "skipped": self.skipped, "failed": failed}
        os.makedirs(self.output_dir, exist_ok=True)
        path = Path(self.output_dir, "inference_summary.json")
        if path.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            kept, n = path.with_name(f"inference_summary_{stamp}.json"), 1
            while kept.exists():
                kept, n = path.with_name(f"inference_summary_{stamp}_{n}.json"), n + 1
            os.replace(path, kept)
            logger.info("earlier summary kept as %s", kept)
        path.write_text(json.dumps(report, indent=2))
        logger.info("inference: %d file(s) synthesised, %d skipped (outputs exist), %d failed; summary: %s",
                    len(done), len(self.skipped), len(failed), path)
        for f in self.skipped:
            logger.info("skipped: %s: %s", f["file"], f["reason"])
        for f in failed:
            logger.warning("failed: %s: %s", f["file"], f["reason"])
        if failed:
            raise InferenceError(
                f"{len(failed)} of {len(done) + len(failed) + len(self.skipped)} input(s) could not be synthesised "
                f"(details in {path}):\n  " + "\n  ".join(f"{f['file']}: {f['reason']}" for f in failed)
            )
        return report


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def screen_inputs(items: Sequence[dict], output_dir: str, source_key: str = "source",
                  postfixes: Sequence[str] = ("synthetic",), data_root_dir: str | None = None, overwrite: bool = False,
                  ext: str = ".nii.gz") -> InferenceInputs:
    """Check every source image before inference and set aside those that cannot be processed.

    A file is set aside as failed (with its reason) if :func:`custom_components.readers.screen_image` finds a
    problem (missing, unreadable, not one 3D single-channel volume, non-finite values), if its output would land
    outside ``output_dir``, or if two inputs would write the same output file (``scan.nii`` and ``scan.nii.gz``).
    It is skipped (not failed) if its outputs already exist and ``overwrite`` is false. ``data_root_dir`` is the
    part of the input paths not repeated below ``output_dir``; when some input lies outside it (or it is not given)
    the deepest folder holding all inputs is used instead (:func:`common_root`), so no output path climbs out of
    ``output_dir``.
    """
    from .readers import screen_image

    root = common_root(items, source_key)
    if data_root_dir and all(_under(i[source_key], data_root_dir) for i in items if isinstance(i.get(source_key), str)):
        root = data_root_dir
    elif data_root_dir:
        logger.info("inputs lie outside %s: outputs mirror their folders below %s instead", data_root_dir, root)
    good, failed, skipped, outputs = [], [], [], {}
    for item in items:
        path = item.get(source_key)
        if path is None:
            failed.append({"file": str(item), "reason": f"no {source_key!r} entry"})
            continue
        planned = [output_path(path, output_dir, pf, root, ext) for pf in postfixes]
        reason = screen_image(path, what=f"{source_key} file").problem
        if reason is None and not all(_under(p, output_dir) for p in planned):
            reason = f"its output {planned[0]} would be written outside --output_dir {output_dir}"
        if reason is None and not overwrite:
            existing = [p for p in planned if os.path.exists(p)]
            if existing:
                logger.info("skipping %s: output %s exists", path, existing[0])
                skipped.append({"file": str(path), "reason": f"output {existing[0]} exists (pass --overwrite true to "
                                                             "replace it)"})
                continue
        if reason is None:
            good.append(item)
            outputs[str(path)] = planned
        else:
            logger.error("skipping %s: %s", path, reason)
            failed.append({"file": str(path), "reason": reason})
    claims: dict[str, list[str]] = {}
    for src, planned in outputs.items():
        for p in planned:
            claims.setdefault(p, []).append(src)
    clashing = {src for srcs in claims.values() if len(srcs) > 1 for src in srcs}
    for src in sorted(clashing):
        out = next(p for p in outputs[src] if len(claims[p]) > 1)
        others = [o for o in claims[out] if o != src]
        reason = f"its output {out} would also be written for {', '.join(others)}; rename one of them"
        logger.error("skipping %s: %s", src, reason)
        failed.append({"file": src, "reason": reason})
    good = [i for i in good if str(i[source_key]) not in clashing]
    outputs = {k: v for k, v in outputs.items() if k not in clashing}
    return InferenceInputs(items=good, failed=failed, output_dir=output_dir, source_key=source_key, skipped=skipped,
                           data_root_dir=root, outputs=outputs)


def inference_inputs(input_path: str | os.PathLike, output_dir: str, section: str = "test", source_key: str = "source",
                     save_confidence: bool | str = False, data_root_dir: str | None = None,
                     overwrite: bool | str = False) -> InferenceInputs:
    """The screened inputs of ``inference.json``: :func:`collect_inputs` then :func:`screen_inputs`.

    ``save_confidence`` and ``overwrite`` may be given as command-line text (``"true"``/``"false"``); with
    ``save_confidence`` every input plans a ``confidence`` output beside the ``synthetic`` one.
    Config use: ``{"_target_": "custom_components.inference.inference_inputs", "input_path": "@input", ...}``.
    """
    check_writable(before="inference", output_dir=output_dir)  # before any input is read or any model is run
    postfixes = ["synthetic", "confidence"] if as_flag(save_confidence, "save_confidence") else ["synthetic"]
    return screen_inputs(collect_inputs(input_path, section, source_key), output_dir, source_key=source_key,
                         postfixes=postfixes, data_root_dir=data_root_dir, overwrite=as_flag(overwrite, "overwrite"))


def confidence_condition_key(local_conditional: bool | str) -> str | None:
    """The ``condition_key`` of :class:`ConfidenceMapd` for a D2 trained with or without ``local_conditional`` (which
    may be command-line text): the evaluator output's ``image`` (the source) for a conditional D2, else ``None``."""
    return "image" if as_flag(local_conditional, "local_conditional") else None


class ConfidenceMapd(MapTransform):
    """Add a confidence map M of ``keys`` under ``output_key``: the QA map, high where the synthesis is trusted.

    With ``activation="sigmoid"`` the network is the local discriminator and M = sigmoid(D2(image)) (the paper's
    map); with ``activation="error"`` it is the error-prediction head (:class:`custom_components.networks.ErrorPredictor`)
    and M = 1 - clip(predicted |Y - G(X)|, 0, 1): one minus the expected absolute error as a fraction of the
    normalised intensity range.

    Runs in a MONAI post-processing chain on one channel-first image (C, H, W, D) in the network's normalised
    intensity scale, through ``inferer`` (e.g. the same ``SliceInferer`` as the generator). The result keeps the
    image's metadata, so ``Invertd`` and ``SaveImaged`` treat it like the prediction.

    Args:
        keys: the synthetic image key (usually ``pred``).
        network: the local discriminator D2; ``None`` disables the transform.
        inferer: how to apply D2 to a whole volume.
        output_key: key of the confidence map.
        device: device to run D2 on.
        condition_key: for a conditional D2 (trained with ``local_conditional``) or the error-prediction head, the
            key of the source image the network sees beside the synthetic one (``image`` in a MONAI evaluator's
            output); ``None`` otherwise.
        activation: ``"sigmoid"`` (D2's logits) or ``"error"`` (a predicted absolute error).
    """

    def __init__(self, keys: KeysCollection, network: torch.nn.Module | None, inferer: Inferer | None = None,
                 output_key: str = "confidence", device: str | torch.device | None = None,
                 condition_key: str | None = None, activation: str = "sigmoid") -> None:
        super().__init__(keys)
        if activation not in ("sigmoid", "error"):
            raise ValueError(f"activation must be 'sigmoid' or 'error', got {activation!r}.")
        self.activation = activation
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
        out = torch.as_tensor(logits)[0]
        conf = torch.sigmoid(out) if self.activation == "sigmoid" else 1.0 - out.clamp(0.0, 1.0)
        conf = conf.to(torch.as_tensor(img).device)
        d[self.output_key] = MetaTensor(conf, meta=img.meta, applied_operations=list(img.applied_operations)) \
            if isinstance(img, MetaTensor) else conf
        return d


def load_weights(network: torch.nn.Module, path: str | os.PathLike, device: str | torch.device | None = None,
                 role: str = "generator", option: str = "model_dir") -> torch.nn.Module:
    """Load a state dict saved by the training run into ``network`` (``weights_only=True``), with errors that name
    the file and what was expected: a missing, empty or truncated file, a 3D model in a 2D config (or the other way
    round), or a model of another size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} weights {str(path)!r} do not exist (set --{option} to the training run's "
                                "model folder).")
    if path.stat().st_size == 0:
        raise ValueError(f"{role} weights {str(path)!r} are an empty file (0 bytes); expected a state dict saved "
                         "by the training run.")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a complete checkpoint
        raise ValueError(f"{role} weights {str(path)!r} ({path.stat().st_size} bytes) cannot be loaded, the file is "
                         f"truncated or not a PyTorch state dict ({type(e).__name__}: {e}).") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{role} weights {str(path)!r} hold a {type(state).__name__}, expected a state dict.")
    own = network.state_dict()
    conv_dims = {v.ndim for k, v in state.items() if k.endswith("weight") and v.ndim >= 4} if state else set()
    own_dims = {v.ndim for k, v in own.items() if k.endswith("weight") and v.ndim >= 4}
    if conv_dims and own_dims and conv_dims.isdisjoint(own_dims):
        saved, built = max(conv_dims) - 2, max(own_dims) - 2
        raise ValueError(f"{role} weights {str(path)!r} hold a {saved}D model, but the config builds a {built}D "
                         f"network: use --spatial_dims {saved}.")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)}, network {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = ([f"{len(shapes)} tensor(s) of another shape (first: {shapes[0]})"] if shapes else []) + \
            ([f"{len(missing)} missing (first: {missing[0]})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else [])
        raise ValueError(f"{role} weights {str(path)!r} do not fit the network built by the config: "
                         f"{'; '.join(parts)}. Use the options of the training run (--generator_channels, "
                         "--local_channels, --local_stem_stride, --spatial_dims, --network_def).")
    network.load_state_dict(state)
    return network
