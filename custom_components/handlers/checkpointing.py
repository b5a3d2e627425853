"""Checkpoints that survive kills and resumes: atomic writes, the best-metric state, choice by stored iteration.

MONAI's :class:`~monai.handlers.CheckpointSaver` is reused for *when* and *what* to save; this module changes *how*
and adds what a resume needs:

* :class:`AtomicCheckpointSaver` writes every file to a hidden temporary file and renames it into place, so a
  kill during a save never leaves a truncated ``model.pt`` or checkpoint (MONAI saves in place, and removes the old
  best model before writing the new one).
* :class:`BestMetricState` puts the evaluator's best metric and epoch, and the best-model savers' records, into the
  training checkpoint, so the first validation after a resume is compared with the real best.
* :func:`latest_checkpoint` picks the checkpoint holding the highest iteration *stored inside it* (file times change
  when a run folder is copied).
* :class:`ResumeLoader` loads it with MONAI's ``CheckpointLoader``, keeps "last N" checkpoints across resumes and, if
  asked, applies learning rates changed on the command line to the restored optimizers.
* :func:`record_run` writes each run's options beside its checkpoints and refuses a resume whose options differ.
* :func:`verify_checksums` checks a saved file against the CRC-32 checksum ``torch.save`` stores for every record
  of its zip container (PyTorch itself never checks them on load): a checkpoint whose bytes changed after it was
  written is ignored at resume, as a truncated one is, and the previous checkpoint is used.
* A save that fails (a full disk) raises :class:`CheckpointWriteError`, one plain message naming the file, the
  folder and its free space; the previous files are kept.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint
from monai.handlers import CheckpointLoader, CheckpointSaver

from ..config.hyperparameters import normalised_options
from ..utils.checks import verify_checksums

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "BestMetricState",
    "CheckpointWriteError",
    "ResumeError",
    "ResumeLoader",
    "RUN_RECORD",
    "checkpoint_iterations",
    "latest_checkpoint",
    "record_run",
    "remove_partial_files",
]

logger = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"
RUN_RECORD = "run_config.json"
#: options that may change when a run is resumed without counting as a different run
RESUMABLE_CHANGES = ("epochs", "val_interval", "log_every", "num_workers", "cache_rate", "device")


class ResumeError(ValueError):
    """A resume cannot continue the run as asked (nothing to resume, finished run, changed options)."""


class CheckpointWriteError(OSError):
    """A checkpoint or weight file could not be written (full disk, quota, lost folder); the old file is kept."""


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_error(path: Path, e: BaseException, free_at_failure: int | None = None) -> CheckpointWriteError:
    """A plain :class:`CheckpointWriteError` for a failed save of ``path`` (the cause is kept as ``__cause__``).

    ``free_at_failure``: the free bytes measured before the partial file was removed; under 1 MiB means the disk
    filled up (PyTorch's zip writer then reports only "unexpected pos ..." or "file write failed")."""
    free_now = _free_bytes(path.parent)
    free = "free space unknown" if free_now is None else f"{free_now / 2**20:.1f} MiB free"
    text = str(e).strip()
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or (
            free_at_failure is not None and free_at_failure < 2**20):
        why = "the disk is full"
    elif "write failed" in text:  # torch's zip writer: "PytorchStreamWriter failed writing file ...: file write failed"
        why = "the write failed: is the disk full?"
    else:
        why = f"{type(e).__name__}: {text.splitlines()[-1] if text else repr(e)}"
    err = CheckpointWriteError(
        f"could not write {path} ({why}; {free} in {path.parent}). Nothing was lost: the files saved before are "
        "kept and no partial file is left; free some space (or choose another folder) and continue with "
        "'--resume true'.")
    err.errno = e.errno if isinstance(e, OSError) else None
    return err


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler writing ``dirname/filename`` atomically (temporary file, ``fsync``, ``os.replace``).

    With a fixed ``filename`` (``model.pt``, ``checkpoint_final.pt``) ``remove`` does nothing: the next save
    replaces the file in one step, so the old file stays until the new one is complete.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        import ignite.distributed as idist

        if idist.get_rank() != 0:
            return
        self.dirname.mkdir(parents=True, exist_ok=True)
        path = self.dirname / (self.filename or filename)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        crc = torch.serialization.get_crc32_options()
        try:
            torch.serialization.set_crc32_options(True)  # the checksums verify_checksums checks at resume
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as e:  # a full disk, a lost folder: one plain error naming the file, old file kept
            free = _free_bytes(path.parent)
            tmp.unlink(missing_ok=True)
            raise _write_error(path, e, free) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            torch.serialization.set_crc32_options(crc)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments) whose files are written atomically by :class:`AtomicDiskSaver`."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        final, key = kwargs.get("final_filename"), kwargs.get("key_metric_filename")
        for ckpt, fixed in ((self._final_checkpoint, final), (self._key_metric_checkpoint, key),
                            (self._interval_checkpoint, None)):
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(save_dir, fixed)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Never save the state of a failed iteration as the final checkpoint: the last epoch checkpoint stays."""
        raise e


def remove_partial_files(*dirs: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in ``dirs`` by a save that was killed; return them."""
    removed = []
    for d in dirs:
        if Path(d).is_dir():
            for f in Path(d).glob(f".*{PARTIAL_SUFFIX}"):
                logger.warning("removing %s, left by an interrupted save", f)
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def checkpoint_iterations(ckpt_dir: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> list[tuple[int, int, Path]]:
    """``(iteration, epoch, path)`` of every readable checkpoint in ``ckpt_dir``, read from the files, oldest first.

    Unreadable files, and files whose bytes no longer match the checksums stored when they were saved
    (:func:`verify_checksums`), are logged and left out, so a resume falls back to the previous checkpoint.
    """
    found = []
    for f in Path(ckpt_dir).glob(pattern):
        damaged = verify_checksums(f)
        if damaged is not None:
            logger.warning("checkpoint %s is damaged and is ignored: %s", f, damaged)
            continue
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            trainer = state["trainer"]
            iteration = int(trainer["iteration"])
            epoch = int(trainer["epoch"]) if "epoch" in trainer else iteration // max(int(trainer["epoch_length"]), 1)
            found.append((iteration, epoch, f))
        except Exception as e:  # noqa: BLE001 - a damaged file is reported and skipped
            logger.warning("checkpoint %s cannot be read and is ignored (%s: %s)", f, type(e).__name__, e)
    # at equal iteration prefer the epoch checkpoint over checkpoint_final (same content)
    return sorted(found, key=lambda t: (t[0], "final" not in t[2].name))


def latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> str:
    """Path of the checkpoint with the highest iteration stored inside it; :class:`ResumeError` if there is none."""
    found = checkpoint_iterations(ckpt_dir, pattern)
    if not found:
        raise ResumeError(f"resume was requested but {str(ckpt_dir)!r} holds no readable file matching {pattern!r}.")
    return str(found[-1][2])


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def record_run(ckpt_dir: str | os.PathLike, options: Mapping[str, Any], resume: bool = False,
               apply_changes: bool = False, epochs: int | None = None) -> list[str]:
    """Write this run's ``options`` to ``ckpt_dir/run_config.json`` (one entry per run); check a resume against it.

    A resume is refused (:class:`ResumeError`) when the latest checkpoint already reached ``epochs``, or when an
    option differs from the run that wrote the checkpoints, listing every difference, unless ``apply_changes``:
    then the differences are logged and applied. Options in ``RESUMABLE_CHANGES`` may always change.
    Returns the descriptions of the applied changes.
    """
    ckpt_dir = Path(ckpt_dir)
    record = ckpt_dir / RUN_RECORD
    history: list[dict] = json.loads(record.read_text()) if record.is_file() else []
    options = _jsonable(normalised_options(options))
    entry: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "options": options}
    changes: list[str] = []
    if resume:
        latest = checkpoint_iterations(ckpt_dir)
        if not latest:
            raise ResumeError(f"resume was requested but {str(ckpt_dir)!r} holds no readable checkpoint_*.pt file.")
        iteration, epoch, path = latest[-1]
        entry["resumed_from"] = {"file": path.name, "iteration": iteration, "epoch": epoch}
        if epochs is not None and epoch >= int(epochs):
            raise ResumeError(
                f"{path} is at epoch {epoch}, and --epochs is {epochs}: the run is finished. "
                f"Pass a larger --epochs to train on from it."
            )
        if history:
            before = _jsonable(normalised_options(history[-1]["options"]))  # a record written before normalising
            changes = [f"{k}: {before.get(k)!r} in the checkpointed run, {options.get(k)!r} now"
                       for k in sorted(set(before) | set(options))
                       if k not in RESUMABLE_CHANGES and before.get(k) != options.get(k)]
        else:
            logger.warning("%s has no %s: the options of the checkpointed run are unknown", ckpt_dir, RUN_RECORD)
        if changes and not apply_changes:
            raise ResumeError(
                f"resume from {path}: {len(changes)} option(s) differ from the checkpointed run "
                f"(recorded in {record}):\n  " + "\n  ".join(changes) +
                "\nRun with the same options, or add '--apply_changes true' to continue with the new values."
            )
        for c in changes:
            logger.warning("resume: applying changed option %s", c)
        entry["changed"] = changes
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}{PARTIAL_SUFFIX}")
    tmp.write_text(json.dumps(history + [entry], indent=2))
    os.replace(tmp, record)
    return changes


class BestMetricState:
    """The best validation metric so far, as a checkpointable object (``state_dict``/``load_state_dict``).

    Holds the evaluator's ``best_metric``/``best_metric_epoch`` and the records of the ``CheckpointSaver`` handlers
    that keep the best model (``save_key_metric=True``) among ``handlers``. Put it in the training checkpoint so a
    resumed run compares new metrics with the best of the whole run, not with nothing.
    """

    def __init__(self, evaluator: Engine, handlers: Sequence[Any] = ()) -> None:
        self.evaluator = evaluator
        self.savers = [h for h in handlers if isinstance(h, CheckpointSaver) and h._key_metric_checkpoint is not None]

    def state_dict(self) -> dict[str, Any]:
        best = self.evaluator.state.best_metric
        return {
            "best_metric": float(best) if best is not None else -1.0,
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "savers": [[[float(p), str(f)] for p, f in s._key_metric_checkpoint._saved] for s in self.savers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        for saver, saved in zip(self.savers, state["savers"]):
            saver._key_metric_checkpoint._saved = [Checkpoint.Item(float(p), str(f)) for p, f in saved]
        logger.info("best metric so far: %.6g at epoch %d", self.evaluator.state.best_metric,
                    self.evaluator.state.best_metric_epoch)


class ResumeLoader:
    """Resume training from the checkpoint in ``ckpt_dir`` with the highest stored iteration.

    Loads ``load_dict`` with MONAI's ``CheckpointLoader`` (``weights_only=True``) when the trainer starts, then tells
    ``saver`` (the interval ``CheckpointSaver``) which epoch checkpoints already exist so its ``n_saved`` limit holds
    across resumes (older ones are deleted now), and with ``apply_changes`` sets the restored optimizers'
    hyperparameters (learning rate, betas) back to the values they were built with from the current config.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, load_dict: dict, saver: CheckpointSaver | None = None,
                 apply_changes: bool = False, map_location: Any = None) -> None:
        self.ckpt_dir, self.load_dict, self.saver = Path(ckpt_dir), load_dict, saver
        self.apply_changes, self.map_location = apply_changes, map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        remove_partial_files(self.ckpt_dir)
        path = latest_checkpoint(self.ckpt_dir)
        CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location=self.map_location)(engine)
        if self.apply_changes:
            for name, opt in self.load_dict.items():
                if isinstance(opt, torch.optim.Optimizer):
                    for group in opt.param_groups:
                        group.update({k: v for k, v in opt.defaults.items() if k in group and k != "params"})
                    logger.info("%s: hyperparameters of the current config applied (lr %s)", name, opt.defaults.get("lr"))
        self._restore_interval_record()

    def _restore_interval_record(self) -> None:
        interval = getattr(self.saver, "_interval_checkpoint", None)
        if interval is None:
            return
        found = [t for t in checkpoint_iterations(self.ckpt_dir) if re.fullmatch(r"checkpoint_epoch=\d+\.pt", t[2].name)]
        keep = found[-interval.n_saved:] if interval.n_saved else found
        for _, _, f in found[: len(found) - len(keep)]:
            logger.info("keeping the last %d epoch checkpoints: removing %s", interval.n_saved, f)
            f.unlink(missing_ok=True)
        interval._saved = [Checkpoint.Item(epoch, f.name) for _, epoch, f in keep]
