"""Whole-volume inference helpers: input collection and screening, the confidence-map transform, a run summary.

Every input is synthesised in a run of its own (:meth:`InferenceInputs.run`), so one bad input fails alone with its
own error; inputs too small for the networks are set aside before any work; outputs are written under a temporary
name and renamed when complete (:class:`AtomicNibabelWriter`), and an input is skipped on a rerun only when all of
its outputs exist and can be read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.data.utils import create_file_basename
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import MapTransform

from .checkpointing import verify_checksums
from .data import load_datalist, ras_shape, slice_size_problem
from .options import as_flag
from .readers import screen_image
from .runs import check_writable

__all__ = [
    "AtomicNibabelWriter", "ConfidenceMapd", "InferenceError", "InferenceInputs", "collect_inputs", "common_root",
    "confidence_condition_key", "inference_inputs", "input_root", "screen_inputs",
]

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
PARTIAL_TAG = ".partial-"  # temporary outputs: ".<name>.partial-<pid><ext>" beside the final file


def _split_ext(name: str) -> tuple[str, str]:
    for ext in (".nii.gz", *IMAGE_SUFFIXES):
        if name.endswith(ext):
            return name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, ext


def partial_name(path: str | os.PathLike, pid: int | None = None) -> Path:
    """The temporary name :class:`AtomicNibabelWriter` writes ``path`` under (same folder and extension, so the
    writer picks the same format and compression)."""
    path = Path(path)
    stem, ext = _split_ext(path.name)
    return path.with_name(f".{stem}{PARTIAL_TAG}{os.getpid() if pid is None else pid}{ext}")


def remove_partial_outputs(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of output ``path`` left by runs that were killed (their process is gone)."""
    path = Path(path)
    stem, ext = _split_ext(path.name)
    removed = []
    if path.parent.is_dir():
        for f in path.parent.glob(f".{stem}{PARTIAL_TAG}*{ext}"):
            pid = f.name[len(f".{stem}{PARTIAL_TAG}"): len(f.name) - len(ext)]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another live run is writing it
            logger.warning("removing %s, left by an interrupted inference", f)
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing each file under a temporary name in its folder, renamed when complete, and
    keeping every spatial axis of a single-channel image.

    A run killed while writing leaves only a hidden ``.<name>.partial-<pid>.nii.gz`` (removed by the next run's
    screening), never a truncated file under the output's name. ``NibabelWriter`` (through ``SaveImaged``'s
    ``squeeze_end_dims``) removes all trailing axes of size 1 after moving the channel last, so a 48 x 48 x 1 input
    would be written as a 2D image that has lost its third spacing (and without squeezing, every output would gain
    a fourth axis): this writer removes the channel axis only. For ``SaveImaged``:
    ``"writer": "custom_components.inference.AtomicNibabelWriter"``.
    """

    def set_data_array(self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True,
                       **kwargs: Any) -> None:
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if channel_dim is not None and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        path = Path(filename)
        tmp = partial_name(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            super().write(str(tmp), verbose=False, **obj_kwargs)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if verbose:
            logger.info("written: %s", path)


def collect_inputs(input_path: str | os.PathLike, section: str = "test", source_key: str = "source") -> list[dict]:
    """Items to synthesise: the ``section`` list of a datalist JSON, or every image file under a folder."""

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
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def screen_sizes(self, inferer: Any) -> dict[str, str]:
        """Set aside (as failed) every item too small for the networks run by ``inferer``
        (:func:`slice_size_problem`); return their reasons. Called by :meth:`run` before any input is synthesised."""
        if inferer is None:
            return {}
        reasons = {}
        for item in self.items:
            src = str(item[self.source_key])
            problem = slice_size_problem(self.shapes[src], inferer) if src in self.shapes else None
            if problem is not None:
                logger.error("skipping %s: %s", src, problem)
                reasons[src] = problem
        return reasons

    def _item_loaders(self, evaluator: Any) -> list[Any] | None:
        """One data loader per item over the evaluator's own data set (same transforms), or ``None`` when that data
        set is not this object's ``items`` (then everything runs in one pass)."""
        from torch.utils.data import DataLoader, Subset

        loader = getattr(evaluator, "data_loader", None)
        dataset = getattr(loader, "dataset", None)
        data = getattr(dataset, "data", None)
        if loader is None or data is None or len(data) != len(self.items) or any(
                a.get(self.source_key) != b.get(self.source_key) for a, b in zip(data, self.items)):
            return None
        return [DataLoader(Subset(dataset, [i]), batch_size=1, shuffle=False, num_workers=0,
                           collate_fn=loader.collate_fn) for i in range(len(self.items))]

    @staticmethod
    def _run_evaluator(evaluator: Any, loader: Any = None) -> str | None:
        """Run ``evaluator`` (on ``loader`` if given); the error it stopped with, described, or ``None``."""
        from ignite.engine import Events

        caught: list[BaseException] = []

        def keep(engine: Any, e: BaseException) -> None:
            caught.append(e)
            raise e

        if loader is not None:
            evaluator.data_loader = loader
            evaluator.state.epoch_length = len(loader)
        evaluator.interrupt_resume_enabled = False  # no half-finished run is carried from one input to the next
        evaluator.add_event_handler(Events.EXCEPTION_RAISED, keep)
        try:
            evaluator.run()
        except Exception as e:  # noqa: BLE001 - reported for this input only
            caught.append(e)
        finally:
            evaluator.remove_event_handler(keep, Events.EXCEPTION_RAISED)
        return describe_error(caught[-1]) if caught else None

    def run(self, evaluator: Any = None) -> dict:
        """Run ``evaluator`` on each screened item on its own, then write the summary; :class:`InferenceError` if
        any failed.

        Items too small for the networks are set aside first (:meth:`screen_sizes`). Each item then runs alone, so
        an error fails that item only, with that error; the others go on. An item counts as synthesised only if all
        its output files were written by this run. The summary is always written.
        """
        start = time.time() - 1.0
        reasons: dict[str, str] = {}
        shared_error = None
        if evaluator is not None and self.items:
            reasons.update(self.screen_sizes(getattr(evaluator, "inferer", None)))
            loaders = self._item_loaders(evaluator)
            if loaders is None:
                shared_error = self._run_evaluator(evaluator)
                if shared_error:
                    logger.error("inference stopped: %s", shared_error)
            else:
                original = evaluator.data_loader
                todo = [(i, it) for i, it in enumerate(self.items) if str(it[self.source_key]) not in reasons]
                for n, (i, item) in enumerate(todo, 1):
                    src = str(item[self.source_key])
                    logger.info("inference %d/%d: %s", n, len(todo), src)
                    error = self._run_evaluator(evaluator, loaders[i])
                    if error is not None:
                        logger.error("failed: %s: %s", src, error)
                        reasons[src] = error
                evaluator.data_loader = original
        done, failed = [], list(self.failed)
        for item in self.items:
            src = item[self.source_key]
            planned = self.outputs.get(src, [])
            if str(src) in reasons:
                failed.append({"file": src, "reason": reasons[str(src)]})
            elif planned and all(os.path.exists(p) and os.path.getmtime(p) >= start for p in planned):
                done.append(src)
            else:
                missing = [p for p in planned if not (os.path.exists(p) and os.path.getmtime(p) >= start)]
                failed.append({"file": src, "reason": f"output {missing[0] if missing else '?'} not written "
                                                      f"({shared_error or 'unknown reason'})"})
        return self.summary(done=done, failed=failed, error=shared_error)

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


def describe_error(e: BaseException) -> str:
    """One line for an error stopped inside MONAI's transform chain: the innermost error with its type, and the
    transform it came from (instead of ``applying transform <Compose object at 0x...>``)."""
    chain, seen, x = [], set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        chain.append(x)
        x = x.__cause__ or x.__context__
    names = [n.rsplit(".", 1)[-1] for c in chain for n in re.findall(r"applying transform <([\w.]+)", str(c))]
    names = [n for n in names if n != "Compose"]
    root = next((c for c in reversed(chain) if not str(c).startswith("applying transform")), chain[-1])
    text = str(root).strip().splitlines()[0][:400] if str(root).strip() else repr(root)
    return f"{type(root).__name__}{f' in {names[-1]}' if names else ''}: {text}"


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
    It is skipped (not failed) if all its outputs already exist and can be read and ``overwrite`` is false; an
    input with a missing or unreadable output (a run killed while writing it) is synthesised again, and temporary
    files of killed runs (:class:`AtomicNibabelWriter`) are removed. Each accepted input's RAS shape is kept for
    :meth:`InferenceInputs.screen_sizes`. ``data_root_dir`` is the
    part of the input paths not repeated below ``output_dir``; when some input lies outside it (or it is not given)
    the deepest folder holding all inputs is used instead (:func:`common_root`), so no output path climbs out of
    ``output_dir``.
    """

    root = common_root(items, source_key)
    if data_root_dir and all(_under(i[source_key], data_root_dir) for i in items if isinstance(i.get(source_key), str)):
        root = data_root_dir
    elif data_root_dir:
        logger.info("inputs lie outside %s: outputs mirror their folders below %s instead", data_root_dir, root)
    good, failed, skipped, outputs, shapes = [], [], [], {}, {}
    for item in items:
        path = item.get(source_key)
        if path is None:
            failed.append({"file": str(item), "reason": f"no {source_key!r} entry"})
            continue
        planned = [output_path(path, output_dir, pf, root, ext) for pf in postfixes]
        image, reason = screen_image(path, what=f"{source_key} file")
        if reason is None and not all(_under(p, output_dir) for p in planned):
            reason = f"its output {planned[0]} would be written outside --output_dir {output_dir}"
        if reason is None:
            for p in planned:
                remove_partial_outputs(p)
        if reason is None and not overwrite and all(os.path.exists(p) for p in planned):
            unreadable = [(p, pr) for p in planned if (pr := screen_image(p, what="output").problem) is not None]
            if not unreadable:
                logger.info("skipping %s: output %s exists", path, planned[0])
                others = f" (and {', '.join(planned[1:])})" if len(planned) > 1 else ""
                skipped.append({"file": str(path), "reason": f"output {planned[0]}{others} exists and can be read "
                                                             "(pass --overwrite true to replace it)"})
                continue
            logger.warning("synthesising %s again: %s (a run stopped while writing it?)", path, unreadable[0][1])
        elif reason is None and not overwrite and any(os.path.exists(p) for p in planned):
            missing = [p for p in planned if not os.path.exists(p)]
            logger.warning("synthesising %s again: output %s is missing", path, missing[0])
        if reason is None:
            good.append(item)
            outputs[str(path)] = planned
            shapes[str(path)] = ras_shape(image.shape, getattr(image, "affine", None))
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
                           data_root_dir=root, outputs=outputs, shapes=shapes)


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
            try:
                logits = self.inferer(x[None].to(device), self.network)
            except (RuntimeError, ValueError) as e:
                if "spatial element" not in str(e):
                    raise
                name = img.meta.get("filename_or_obj", "the image") if isinstance(img, MetaTensor) else "the image"
                raise ValueError(f"{name} of spatial size {tuple(x.shape[1:])} is too small for the "
                                 f"{type(self.network).__name__} of the confidence map ({e}).") from None
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
    from .runs import check_device

    if device is not None:
        device = check_device(device)  # before the file is read: a missing GPU is not a damaged file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} weights {str(path)!r} do not exist (set --{option} to the training run's "
                                "model folder).")
    if path.stat().st_size == 0:
        raise ValueError(f"{role} weights {str(path)!r} are an empty file (0 bytes); expected a state dict saved "
                         "by the training run.")
    damaged = verify_checksums(path)
    if damaged is not None:
        raise ValueError(f"{role} weights {str(path)!r} ({path.stat().st_size} bytes) are damaged: {damaged}. "
                         "Use another copy of the file.")
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
