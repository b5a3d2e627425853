"""Run folders, checked before any work: writable, never overwritten silently, resumable when a resume is asked."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from .options import as_flag

__all__ = ["check_run_dirs", "check_writable"]

logger = logging.getLogger(__name__)


def check_writable(before: str = "training", **folders: str | os.PathLike | None) -> None:
    """Create each folder if needed and check a file can be written in it, before any work.

    Keyword names are the options the folders come from (``ckpt_dir=...``); an error names the option, the folder
    and the reason. ``before`` names the work that has not started (``"training"``, ``"inference"``).
    """
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
    command-line text (see :func:`custom_components.options.as_flag`).
    """
    from .checkpointing import RUN_RECORD, latest_checkpoint, record_run, remove_partial_files

    resume, overwrite = as_flag(resume, "resume"), as_flag(overwrite, "overwrite")
    apply_changes = as_flag(apply_changes, "apply_changes")
    if resume and overwrite:
        raise ValueError("'--resume true' continues the run in place and '--overwrite true' deletes it to start "
                         "again: pass one of them, not both.")
    ckpt_dir, model_file = Path(ckpt_dir), Path(model_file)
    check_writable(output_dir=output_dir, ckpt_dir=ckpt_dir, model_dir=model_file.parent)
    remove_partial_files(ckpt_dir, model_file.parent)
    if resume:
        logger.info("resuming from %s", latest_checkpoint(ckpt_dir, pattern))
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
