"""Whole-volume inference helpers: input collection and screening, the confidence-map transform, a run summary.

Every input is synthesised in a run of its own (:meth:`InferenceInputs.run`), so one bad input fails alone with its
own error; inputs too small for the networks are set aside before any work; outputs are written under a temporary
name and renamed when complete (:class:`AtomicNibabelWriter`), and an input is skipped on a rerun only when all of
its outputs exist and can be read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.data.utils import create_file_basename

from ..data.datalist import load_datalist
from ..data.shapes import ras_shape, slice_size_problem
from ..config.options import as_flag
from ..data.readers import screen_image
from ..handlers.runs import check_writable
from .writers import IMAGE_SUFFIXES, remove_partial_outputs

__all__ = [ "InferenceError", "InferenceInputs", "collect_inputs", "common_root", "inference_inputs", "input_root", "screen_inputs",
]

logger = logging.getLogger(__name__)


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

    A file is set aside as failed (with its reason) if :func:`custom_components.data.readers.screen_image` finds a
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
    Config use: ``{"_target_": "custom_components.apps.inference.inference_inputs", "input_path": "@input", ...}``.
    """
    check_writable(before="inference", output_dir=output_dir)  # before any input is read or any model is run
    postfixes = ["synthetic", "confidence"] if as_flag(save_confidence, "save_confidence") else ["synthetic"]
    return screen_inputs(collect_inputs(input_path, section, source_key), output_dir, source_key=source_key,
                         postfixes=postfixes, data_root_dir=data_root_dir, overwrite=as_flag(overwrite, "overwrite"))


