"""Training in several processes (``torchrun``): the process group, rank-0-only work and per-rank files.

``multi_gpu_train.json`` declares these functions instead of spelling out ``torch.distributed`` calls; in a single
process (no process group) each of them does what a single process needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config.options import as_flag

__all__ = [
    "destroy_process_group",
    "init_process_group",
    "is_main_process",
    "local_device",
    "main_rank_only",
    "save_rank_weights",
    "wrap_ddp",
]


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, and in a single process (no process group initialised)."""
    import torch.distributed as dist

    return not _initialized() or dist.get_rank() == 0


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (one GPU per process, numbered by ``torchrun``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    return torch.device("cpu")


def init_process_group(device: str | torch.device, backend: str | None = None) -> None:
    """Join the process group ``torchrun`` describes, pin this process to its GPU, and wait for every rank.

    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` on the CPU; an existing process group is kept.
    """
    import ignite.distributed as idist
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    idist.sync()


def wrap_ddp(network: torch.nn.Module | None, device: str | torch.device) -> torch.nn.Module | None:
    """``network`` moved to ``device`` and wrapped in ``DistributedDataParallel`` (on this process's GPU with CUDA);
    ``None`` (a network the variant does not use) stays ``None``."""
    if network is None:
        return None
    device_ids = [device] if torch.cuda.is_available() else None
    return torch.nn.parallel.DistributedDataParallel(network.to(device), device_ids=device_ids)


def destroy_process_group() -> None:
    """Leave the process group, if one is initialised (ignite's distributed helpers then see a single process)."""
    import ignite.distributed as idist
    import torch.distributed as dist

    if _initialized():
        dist.destroy_process_group()
        idist.sync()


def main_rank_only(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on the main process only (rank 0) when ``torch.distributed`` is initialised, else just run it.

    Used for steps that write shared files (generating the phantom, clearing an old run). The other ranks wait;
    an error on rank 0 is re-raised on every rank so no process is left waiting.
    """
    # not ignite.distributed.one_rank_only: its other ranks never learn that rank 0 failed (they go on, or wait)
    import torch.distributed as dist

    if not _initialized():
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


def save_rank_weights(network: torch.nn.Module, output_dir: str | os.PathLike, enabled: bool | str = True,
                      prefix: str = "generator") -> str | None:
    """Save ``network``'s weights as ``<output_dir>/<prefix>_rank<rank>.pt``; return the path (``None`` if not
    ``enabled``, which may be command-line text).

    Every rank writes its own file, so a test can check that DDP kept the ranks' weights identical.
    """
    import torch.distributed as dist

    if not as_flag(enabled, "save_rank_weights"):
        return None
    rank = dist.get_rank() if _initialized() else 0
    path = Path(output_dir) / f"{prefix}_rank{rank}.pt"
    torch.save(network.state_dict(), path)
    return str(path)
