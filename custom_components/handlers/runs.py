"""Run folders, checked before any work: writable, held by one run at a time, never overwritten silently, resumable
when a resume is asked, and started clean when an overwrite is asked."""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .checkpointing import RUN_RECORD, latest_checkpoint, record_run, remove_partial_files
from ..config.options import as_flag
from ..utils.checks import check_device

__all__ = [
    "LOCK_FILE", "RunLockedError", "check_run_dirs", "check_writable", "clear_run_outputs",
    "lock_run_dir", "release_run_locks", "run_outputs",
]

logger = logging.getLogger(__name__)

#: the lock file a run keeps in each of its folders while it runs (see :func:`lock_run_dir`)
LOCK_FILE = ".run.lock"
#: what a training run writes in its output folder (TensorBoard events, per-rank weights of multi_gpu_train.json)
OUTPUT_DIR_FILES = ("events.out.tfevents.*", "generator_rank*.pt")
#: what it writes in its model folder: model.pt, local_discriminator.pt, error_head.pt and their *_final.pt twins
MODEL_DIR_FILES = ("*.pt",)


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


# ---------------------------------------------------------------------------------------------------------------
# one run per folder


class RunLockedError(RuntimeError):
    """Another live process holds the lock of a run folder."""


_held: dict[str, int] = {}  # resolved lock path -> open descriptor holding the lock, for this process


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(info: dict) -> str:
    if not info:
        return "a process that left no record"
    parts = [f"process {info.get('pid', '?')}"]
    if info.get("host") and info.get("host") != socket.gethostname():
        parts.append(f"on host {info['host']}")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    text = " ".join(parts)
    command = str(info.get("command", ""))
    return text + (f" ({command[:160]}{' ...' if len(command) > 160 else ''})" if command else "")


def lock_run_dir(folder: str | os.PathLike, option: str = "output_dir") -> Path:
    """Take the exclusive lock of run folder ``folder`` for this process until it exits; return the lock file.

    The lock is ``<folder>/.run.lock``, holding this process's PID, host, start time and command line, and locked
    with ``fcntl.flock``: the kernel grants it to one process at a time, atomically, and releases it when the
    process ends however it ends (SIGKILL included), so a lock left by a dead process is recognised as stale and
    taken over (with a warning naming that process). A folder another live process holds raises
    :class:`RunLockedError` naming the folder and that process. Taking a lock this process already holds does
    nothing. The file is removed when this process exits normally.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = str(path.resolve())
    if key in _held:
        return path
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(os.read(fd, 65536).decode(errors="replace"))
            os.close(fd)
            raise RunLockedError(
                f"run folder {str(folder)!r} (--{option}) is in use by {_describe(info)}: two runs into one "
                f"folder would replace each other's checkpoints and mix their logs. Wait for that run to end "
                f"(or stop it), or choose another --{option}.") from None
        except OSError as e:  # a file system without locks: fall back to the PID in the file
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            info = _holder(os.read(fd, 65536).decode(errors="replace"))
            if info.get("pid") not in (None, os.getpid()) and info.get("host") == socket.gethostname() \
                    and _pid_alive(int(info["pid"])):
                os.close(fd)
                raise RunLockedError(f"run folder {str(folder)!r} (--{option}) is in use by {_describe(info)}; "
                                     f"wait for it to end, or choose another --{option}.") from None
        try:  # the file may have been removed (by its holder exiting) between open and flock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        stale = _holder(os.pread(fd, 65536, 0).decode(errors="replace"))
        if stale and stale.get("pid") != os.getpid():
            logger.warning("run folder %s: taking over the lock left by %s, which is no longer running", folder,
                           _describe(stale))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _held[key] = fd
        return path
    raise RunLockedError(f"run folder {str(folder)!r} (--{option}): its lock file keeps changing; is another run "
                         "starting there?")


def release_run_locks(folders: Iterable[str | os.PathLike] | None = None) -> None:
    """Remove and release the locks this process holds (those in ``folders``, or all); done at exit."""
    wanted = None if folders is None else {str((Path(f) / LOCK_FILE).resolve()) for f in folders}
    for key in list(_held):
        if wanted is None or key in wanted:
            fd = _held.pop(key)
            try:
                os.unlink(key)  # before closing: a process waiting on this file then sees it gone and retries
            except FileNotFoundError:
                pass
            os.close(fd)


atexit.register(release_run_locks)


def _run_folders(folders: dict[str, Path | None]) -> dict[Path, str]:
    """The folders to lock among ``folders`` (option -> folder): each one not inside another of them."""
    resolved = {Path(f).resolve(): option for option, f in folders.items() if f is not None}
    return {f: o for f, o in sorted(resolved.items()) if not any(p != f and p in f.parents for p in resolved)}


# ---------------------------------------------------------------------------------------------------------------
# what an earlier run left


def run_outputs(ckpt_dir: str | os.PathLike, model_file: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                pattern: str = "checkpoint_*.pt") -> list[Path]:
    """Every file a training run writes that is present in its folders: checkpoints and the run record
    (``ckpt_dir``), every ``.pt`` weight file of the model folder (``model.pt``, ``local_discriminator.pt``,
    ``error_head.pt``, ``*_final.pt``), TensorBoard event files and per-rank weights (``output_dir``)."""

    ckpt_dir, model_file = Path(ckpt_dir), Path(model_file)
    found: list[Path] = []
    where = [(ckpt_dir, (pattern, RUN_RECORD)), (model_file.parent, (model_file.name, *MODEL_DIR_FILES))]
    if output_dir is not None:
        where.append((Path(output_dir), OUTPUT_DIR_FILES))
    for folder, patterns in where:
        if folder.is_dir():
            for p in patterns:
                found += [f for f in sorted(folder.glob(p)) if f.is_file() and f not in found]
    return found


def clear_run_outputs(files: Iterable[Path]) -> list[Path]:
    """Delete ``files`` (from :func:`run_outputs`), logging each; return them."""
    removed = []
    for f in files:
        logger.warning("overwrite requested: removing %s, written by the earlier run", f)
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def check_run_dirs(ckpt_dir: str | os.PathLike, model_file: str | os.PathLike, resume: bool | str = False,
                   overwrite: bool | str = False, pattern: str = "checkpoint_*.pt",
                   output_dir: str | os.PathLike | None = None, options: dict | None = None, epochs: int | None = None,
                   apply_changes: bool | str = False, device: object = None, lock: bool = True) -> None:
    """Refuse to overwrite an earlier run silently, keep other runs out, and check a resume can continue it.

    ``device`` (when given) is checked first (:func:`check_device`). Every output folder (``output_dir``,
    ``ckpt_dir``, the folder of ``model_file``) must be writable, and is locked for this process
    (:func:`lock_run_dir`, unless ``lock=False``): a second run into a folder a live run holds stops here, naming the
    folder and the other process. A fresh run (``resume=False``) into folders that hold files of an earlier run
    (:func:`run_outputs`: checkpoints, run record, weight files, event files) stops with an error unless
    ``overwrite=True``; then all of them are removed, so the new run starts from clean folders (no discriminator,
    error head, final weights or event files of the old run are left to be mistaken for the new run's). A resumed
    run needs a readable checkpoint below ``epochs`` and, unless ``apply_changes``, the same ``options`` as the run
    that wrote it (see :func:`custom_components.handlers.checkpointing.record_run`). ``options`` are recorded beside the
    checkpoints. Files left by a save that was killed are removed. ``resume``, ``overwrite`` and ``apply_changes``
    may be given as command-line text (see :func:`custom_components.config.options.as_flag`).
    """

    if device is not None:
        check_device(device)
    resume, overwrite = as_flag(resume, "resume"), as_flag(overwrite, "overwrite")
    apply_changes = as_flag(apply_changes, "apply_changes")
    if resume and overwrite:
        raise ValueError("'--resume true' continues the run in place and '--overwrite true' deletes it to start "
                         "again: pass one of them, not both.")
    ckpt_dir, model_file = Path(ckpt_dir), Path(model_file)
    check_writable(output_dir=output_dir, ckpt_dir=ckpt_dir, model_dir=model_file.parent)
    if lock:  # before the first write, and before anything an earlier run left is judged
        for folder, option in _run_folders({"output_dir": output_dir, "ckpt_dir": ckpt_dir,
                                            "model_dir": model_file.parent}).items():
            lock_run_dir(folder, option)
    remove_partial_files(ckpt_dir, model_file.parent)
    if resume:
        logger.info("resuming from %s", latest_checkpoint(ckpt_dir, pattern))
        if options is not None:
            record_run(ckpt_dir, options, resume=True, apply_changes=apply_changes, epochs=epochs)
        return
    old = run_outputs(ckpt_dir, model_file, output_dir, pattern)
    inputs = [(options or {}).get("pretrained_generator")]  # weights this run starts from are never removed
    keep = {Path(f).resolve() for f in inputs if isinstance(f, (str, os.PathLike)) and str(f) not in ("", "none", "None")}
    old = [f for f in old if f.resolve() not in keep]
    if old and not overwrite:
        raise FileExistsError(
            f"an earlier run left {len(old)} file(s) ({', '.join(str(f) for f in old[:3])}"
            f"{', ...' if len(old) > 3 else ''}); pass '--resume true' to continue it or '--overwrite true' to "
            "start again and replace them (or choose another --output_dir / --ckpt_dir / --model_dir)."
        )
    clear_run_outputs(old)
    if options is not None:
        record_run(ckpt_dir, options)
