"""Datalist loading and checking, and batch preparation for the synthesis engines."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import str2bool

__all__ = ["DatalistError", "read_datalist_json", "PrepareSourceTarget", "as_flag", "main_rank_only", "check_datalist", "check_patch_size", "check_run_dirs", "check_splits", "check_writable", "latest_checkpoint", "load_datalist", "require_keys"]

logger = logging.getLogger(__name__)


class DatalistError(ValueError):
    """A datalist names a missing, unreadable or inconsistent file; the message lists every problem found."""


def read_datalist_json(path: str | os.PathLike, name: str = "datalist", hint: str = "") -> dict:
    """The parsed content of a datalist JSON file; :class:`DatalistError` if it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"{name} {str(path)!r} does not exist{hint}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatalistError(f"{name} {str(path)!r} is not valid JSON: {e}") from None


def load_datalist(datalist: str | os.PathLike, section: str, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Read ``section`` (``training``/``validation``/``test``) of a MONAI datalist JSON, with absolute paths.

    Relative paths are resolved against ``base_dir`` (default: the datalist's folder). Non-path entries
    (``subject``) are kept as they are.
    """
    path = Path(datalist)
    content = read_datalist_json(path, hint=" (generate the phantom or point 'datalist' to a file)")
    if section not in content:
        raise DatalistError(f"datalist {str(path)!r} has no {section!r} list (found: {sorted(content)}).")
    items = content[section]
    if not isinstance(items, list) or not items:
        raise DatalistError(f"datalist {str(path)!r}: the {section!r} list is empty.")
    base = Path(base_dir) if base_dir is not None else path.parent
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatalistError(f"datalist {str(path)!r}: {section}[{i}] should be a dict of paths, got {item!r}.")
        out.append({k: (str(base / v) if isinstance(v, str) and k != "subject" else v) for k, v in item.items()})
        out[-1].setdefault("subject", Path(item.get("source", f"{section}_{i}")).parent.name or f"{section}_{i}")
    return out


def check_datalist(items: Sequence[dict], image_keys: Sequence[str] = ("source", "target"),
                   aux_keys: Sequence[str] = ("label", "mask"), atol: float = 1e-3, check_values: bool = True,
                   name: str = "datalist") -> Sequence[dict]:
    """Check every subject before training; raise :class:`DatalistError` listing all problems found.

    Checks: the list is not empty; no subject id or image file appears twice; every ``image_keys`` entry is
    present; every file passes :func:`custom_components.readers.screen_image` (exists, readable, one 3D volume
    with one channel, finite values when ``check_values``); images and any ``aux_keys`` files of a subject have the
    same spatial shape and affines equal within ``atol``.

    Returns ``items`` unchanged, so the call can sit between a datalist and a dataset in a config.
    """
    from .readers import screen_image

    if len(items) == 0:
        raise DatalistError(f"{name}: the list of subjects is empty.")
    problems: list[str] = _duplicates(items, image_keys)
    for i, item in enumerate(items):
        subject = item.get("subject", f"#{i}")
        ref: tuple[str, Any] | None = None
        for key in list(image_keys) + [k for k in aux_keys if k in item]:
            if key not in item:
                problems.append(f"subject {subject}: no {key!r} entry (expected keys {list(image_keys)}).")
                continue
            path = item[key]
            img, problem = screen_image(path, what=f"{key} file", check_values=check_values)
            if problem is not None:
                problems.append(f"subject {subject}: {problem}.")
            if img is None:
                continue
            shape, affine = tuple(img.shape[:3]), np.asarray(img.affine)
            if ref is None:
                ref = (f"{key} {path}", (shape, affine))
                continue
            ref_shape, ref_affine = ref[1]
            if shape != ref_shape:
                problems.append(f"subject {subject}: {key} file {path} has shape {shape}, expected {ref_shape} like {ref[0]}.")
            elif not np.allclose(affine, ref_affine, atol=atol):
                problems.append(
                    f"subject {subject}: {key} file {path} has an affine different from {ref[0]} "
                    f"(max difference {np.abs(affine - ref_affine).max():.4g} > {atol})."
                )
    if problems:
        raise DatalistError(f"{name}: {len(problems)} problem(s) found before training:\n  " + "\n  ".join(problems))
    logger.info("%s: %d subjects checked", name, len(items))
    return items


def _duplicates(items: Sequence[dict], image_keys: Sequence[str]) -> list[str]:
    """Subject ids and image files that appear more than once in one list."""
    problems = []
    ids: dict[str, list[int]] = {}
    files: dict[str, list[str]] = {}
    for i, item in enumerate(items):
        ids.setdefault(str(item.get("subject", f"#{i}")), []).append(i)
        for key in image_keys:
            if isinstance(item.get(key), str):
                files.setdefault(os.path.realpath(item[key]), []).append(str(item.get("subject", f"#{i}")))
    for sid, where in ids.items():
        if len(where) > 1:
            problems.append(f"subject id {sid} appears {len(where)} times (entries {where}).")
    for f, subjects in files.items():
        if len(subjects) > 1:
            problems.append(f"file {f} is listed {len(subjects)} times (subjects {', '.join(subjects)}).")
    return problems


def check_splits(training: Sequence[dict], validation: Sequence[dict], image_keys: Sequence[str] = ("source", "target"),
                 name: str = "datalist") -> None:
    """Refuse a subject (same id or same image file) in both the training and the validation list: it would leak
    into the choice of the best model. :class:`DatalistError` names every such subject."""
    def index(items):
        ids = {str(i.get("subject")) for i in items if i.get("subject") is not None}
        files = {os.path.realpath(i[k]): str(i.get("subject")) for i in items for k in image_keys if isinstance(i.get(k), str)}
        return ids, files

    (train_ids, train_files), (val_ids, val_files) = index(training), index(validation)
    problems = [f"subject id {s} is in both the training and the validation list." for s in sorted(train_ids & val_ids)]
    problems += [f"file {f} is in the training list (subject {train_files[f]}) and the validation list (subject "
                 f"{val_files[f]})." for f in sorted(set(train_files) & set(val_files))]
    if problems:
        leaked = (train_ids & val_ids) | {val_files[f] for f in set(train_files) & set(val_files)}
        raise DatalistError(f"{name}: {len(leaked)} subject(s) leak from training into validation:\n  "
                            + "\n  ".join(problems))


def require_keys(items: Sequence[dict], keys: Sequence[str], name: str = "datalist", why: str = "") -> Sequence[dict]:
    """:class:`DatalistError` naming every subject of ``items`` without one of ``keys``; ``items`` otherwise."""
    missing = [f"subject {item.get('subject', f'#{i}')}: no {k!r} entry" for i, item in enumerate(items)
               for k in keys if k not in item]
    if missing:
        raise DatalistError(f"{name}: {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} missing{why}:\n  "
                            + "\n  ".join(missing))
    return items


def check_patch_size(patch_size: Sequence[int], spatial_dims: int, strides: Mapping[str, Sequence[int] | int]) -> None:
    """The patch must have ``spatial_dims`` sizes, each a multiple of every network's total stride.

    ``strides`` maps a network name to its strides (multiplied) or its total stride.
    """
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {list(patch_size)} has {len(patch_size)} sizes, expected {spatial_dims} "
                         f"(spatial_dims is {spatial_dims}).")
    for net, st in strides.items():
        total = int(np.prod(st)) if isinstance(st, (list, tuple)) else int(st)
        bad = [int(p) for p in patch_size if int(p) % total]
        if bad:
            raise ValueError(
                f"patch_size {list(patch_size)}: {bad} not a multiple of {total}, the total stride of the {net} "
                f"(each size must be divisible by {total}, e.g. {[max(total, int(p) // total * total) for p in patch_size]})."
            )
        deepest = [int(p) // total for p in patch_size]
        if int(np.prod(deepest)) < 2:  # instance/batch norm of one element per channel fails in training
            raise ValueError(
                f"patch_size {list(patch_size)}: the {net} reduces it to {' x '.join(map(str, deepest))} at its deepest "
                f"level (total stride {total}), where normalisation has a single element; make one size at least "
                f"{2 * total} (e.g. {[2 * total] + [int(p) for p in patch_size[1:]]})."
            )


class PrepareSourceTarget:
    """``prepare_batch`` for MONAI engines: ``(source, target)`` from a dict batch, moved to ``device``.

    With ``target_key=None`` (inference) the target is ``None``.
    """

    def __init__(self, source_key: str = "source", target_key: str | None = "target") -> None:
        self.source_key, self.target_key = source_key, target_key

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = [k for k in (self.source_key, self.target_key) if k is not None]
        for key in keys:
            if key not in batchdata:
                raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batchdata)}).")
        out = [torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking, **kwargs) for k in keys]
        return out[0], (out[1] if len(out) > 1 else None)


def latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> str:
    """Path of the checkpoint holding the highest training iteration (read from the files, not their times)."""
    from .checkpointing import latest_checkpoint as latest

    path = latest(ckpt_dir, pattern)
    logger.info("resuming from %s", path)
    return path


def check_writable(before: str = "training", **folders: str | os.PathLike) -> None:
    """Create each folder if needed and check a file can be written in it, before any work.

    Keyword names are the options the folders come from (``ckpt_dir=...``); an error names the option, the folder
    and the reason. ``before`` names the work that has not started (``"training"``, ``"inference"``).
    """
    import tempfile

    problems = []
    for option, folder in folders.items():
        if folder is None:
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
                pass
        except OSError as e:
            problems.append(f"--{option} {str(folder)!r} cannot be written ({type(e).__name__}: {e.strerror or e}).")
    if problems:
        raise PermissionError(f"output folder check failed before {before}:\n  " + "\n  ".join(problems))


def check_run_dirs(ckpt_dir: str | os.PathLike, model_file: str | os.PathLike, resume: bool | str = False,
                   overwrite: bool | str = False, pattern: str = "checkpoint_*.pt",
                   output_dir: str | os.PathLike | None = None, options: dict | None = None, epochs: int | None = None,
                   apply_changes: bool | str = False) -> None:
    """Refuse to overwrite an earlier run silently, and check a resume can continue it.

    Every output folder (``output_dir``, ``ckpt_dir``, the folder of ``model_file``) must be writable. A fresh run
    (``resume=False``) whose checkpoint folder already holds checkpoints, or whose best-model file exists, stops
    with an error unless ``overwrite=True``, in which case the old files are removed. A resumed run needs a
    readable checkpoint below ``epochs`` and, unless ``apply_changes``, the same ``options`` as the run that wrote
    it (see :func:`custom_components.checkpointing.record_run`). ``options`` are recorded beside the checkpoints.
    Files left by a save that was killed are removed. ``resume``, ``overwrite`` and ``apply_changes`` may be given as
    command-line text (see :func:`as_flag`).
    """
    from .checkpointing import RUN_RECORD, record_run, remove_partial_files

    resume, overwrite = as_flag(resume, "resume"), as_flag(overwrite, "overwrite")
    apply_changes = as_flag(apply_changes, "apply_changes")
    ckpt_dir, model_file = Path(ckpt_dir), Path(model_file)
    check_writable(output_dir=output_dir, ckpt_dir=ckpt_dir, model_dir=model_file.parent)
    remove_partial_files(ckpt_dir, model_file.parent)
    if resume:
        latest_checkpoint(ckpt_dir, pattern)
        if options is not None:
            record_run(ckpt_dir, options, resume=True, apply_changes=apply_changes, epochs=epochs)
        return
    old = sorted(ckpt_dir.glob(pattern)) + ([model_file] if model_file.exists() else [])
    if old and not overwrite:
        raise FileExistsError(
            f"an earlier run left {len(old)} file(s) ({', '.join(str(f) for f in old[:3])}"
            f"{', ...' if len(old) > 3 else ''}); pass '--resume true' to continue it or '--overwrite true' to "
            "start again and replace them (or choose another --ckpt_dir / --model_dir)."
        )
    for f in old + ([ckpt_dir / RUN_RECORD] if old and (ckpt_dir / RUN_RECORD).exists() else []):
        logger.warning("overwrite requested: removing %s", f)
        f.unlink()
    if options is not None:
        record_run(ckpt_dir, options)


def as_flag(value: bool | str | int | None, name: str = "flag") -> bool:
    """A boolean config option given as a bool or as the text a command line passes (``true``/``false``, ``1``/``0``).

    ``python -m monai.bundle run ... --resume true`` hands the config the string ``"true"``; a bare string would
    always be truthy, so configs read their switches through this function. The words are those of
    ``monai.utils.str2bool``, plus ``on``/``off`` and an empty or null value (false); anything else is a
    ``ValueError`` naming the option ``name``.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()  # str2bool neither strips nor takes numbers
    text = _FLAG_WORDS.get(text, text)
    try:
        return str2bool(text, raise_exc=True)
    except ValueError:  # str2bool's message does not say which option was wrong
        raise ValueError(f"{name} must be true or false, got {value!r}.") from None


#: words a switch may be given as that ``monai.utils.str2bool`` does not know (it takes yes/true/t/y/1, no/false/f/n/0):
#: on/off, and an empty or null value (a switch left unset on the command line) as false
_FLAG_WORDS = {"on": "true", "off": "false", "none": "false", "null": "false", "": "false"}


def main_rank_only(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on the main process only (rank 0) when ``torch.distributed`` is initialised, else just run it.

    Used for steps that write shared files (generating the phantom, clearing an old run). The other ranks wait;
    an error on rank 0 is re-raised on every rank so no process is left waiting.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn(*args, **kwargs)
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(e).__name__}: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RuntimeError(f"rank 0 failed: {box[0]}")
    return result
