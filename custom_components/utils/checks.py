"""Checks of what a file holds and what the machine has, shared by the weight loader and the run checks."""

from __future__ import annotations

import os

__all__ = ["check_device", "verify_checksums"]


def verify_checksums(path: str | os.PathLike) -> str | None:
    """``None`` if every record of the ``torch.save`` file ``path`` matches its stored CRC-32 checksum, else the
    problem (which record, or why the file is not a readable zip container), for a message naming the file.

    ``torch.save`` writes a zip container with a CRC-32 checksum of each record (the pickled structure, each
    tensor's bytes); ``torch.load`` does not check them, so bytes changed after the save (a bad disk, a copy gone
    wrong, a file edited by hand) load silently as wrong weights. This reads the whole file and checks every record.
    A file that is no zip container (truncated, or saved in PyTorch's legacy format) is left to ``torch.load`` to
    report; one saved without checksums is not checked.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            if all(i.CRC == 0 for i in z.infolist() if i.file_size):  # saved without checksums
                return None
            bad = z.testzip()
    except zipfile.BadZipFile:  # truncated, or not a zip container (legacy format): torch.load tells which
        return None
    except (OSError, RuntimeError, ValueError, EOFError) as e:  # e.g. a record header overwritten by chance
        return f"it cannot be read to the end ({type(e).__name__}: {e})"
    if bad is not None:
        return (f"record {bad!r} does not match the CRC-32 checksum stored when the file was saved: its bytes changed "
                "after the save")
    return None


def check_device(device: object, option: str = "device") -> "torch.device":  # noqa: F821 - torch imported lazily
    """``device`` as a ``torch.device``, after checking this machine has it; a ``ValueError`` naming ``--<option>``
    otherwise (``--device cuda`` on a machine without a GPU, ``cuda:3`` with two GPUs, a misspelt name).

    Called before any network is built or any weight file is read, so the error is about the device and not a
    traceback from deep inside PyTorch (or a weight file blamed for it).
    """
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--{option} {device!r} is not a device name; expected cpu, cuda or cuda:<index> "
                         "(leave it unset to use the GPU when there is one).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES empty)")
            raise ValueError(f"--{option} {device!s}: this machine has no usable GPU ({why}, PyTorch "
                             f"{torch.__version__}); use --{option} cpu, or leave --{option} unset to use the GPU "
                             "when there is one.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--{option} {device!s}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--{option} {device!s}: the Apple GPU (mps) is not available on this machine; use "
                         f"--{option} cpu.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--{option} {device!s}: the bundle runs on cpu or cuda, got device type {dev.type!r}.")
    return dev
