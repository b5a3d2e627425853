"""A memory budget for the cached training and validation volumes, and a disk cache for what does not fit.

``BudgetCacheDataset`` is MONAI's ``CacheDataset`` whose RAM part is bounded by a :class:`MemoryBudget`: the
subjects are preprocessed (the deterministic transforms, up to the first random one) in order and held in RAM
while the budget allows; the others are written once to a disk cache of preprocessed volumes (MONAI's
``PersistentDataset`` format) and read back from it on every use. The disk cache is keyed by the data item (its
paths and each file's size and modification time) and by a fingerprint of the deterministic transforms (their
classes, settings and the source code of ours), so a changed preprocessing option or a rewritten image never
reuses stale files. A data set that fits neither in the budget nor on the disk is refused before any volume is
written, with the numbers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import convert_to_tensor

__all__ = ["MemoryBudget", "BudgetCacheDataset", "available_memory_bytes", "default_budget_bytes",
           "transform_fingerprint", "item_fingerprint", "cached_nbytes"]

logger = logging.getLogger(__name__)
#: bump when the layout of a cached item changes in a way the transform fingerprint does not see
CACHE_FORMAT = 1
GB = 2**30
#: the disk cache's file names: md5 of the item, md5 of the pipeline (item_fingerprint, transform_fingerprint)
_CACHE_FILE = re.compile(r"[0-9a-f]{64}\.pt")


def available_memory_bytes() -> int:
    """Memory available to new allocations without swapping (psutil, else ``MemAvailable`` of /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of the venv
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise OSError("cannot tell the available memory: no psutil and no MemAvailable in /proc/meminfo")


def default_budget_bytes(fraction: float = 0.5, world_size: int = 1, available: int | None = None) -> int:
    """The default cache budget: ``fraction`` of the available memory, shared by the ``world_size`` processes.

    The other half is the safety margin: the training itself (networks, optimiser states, batches, activations:
    ``scripts/benchmark.py``'s peak-memory rows) and the rest of the machine.
    """
    available = available_memory_bytes() if available is None else int(available)
    return max(0, int(available * fraction)) // max(1, int(world_size))


class MemoryBudget:
    """Bytes of RAM the dataset caches may hold, shared by the datasets given the same instance.

    Args:
        gb: the budget in GiB (``cache_memory_gb``); ``None`` for :func:`default_budget_bytes`.
        fraction: share of the available memory of the default budget.
        world_size: processes on this machine sharing it (each gets an equal part of the default).
    """

    def __init__(self, gb: float | None = None, fraction: float = 0.5, world_size: int = 1) -> None:
        if gb is not None and not float(gb) >= 0:
            raise ValueError(f"cache_memory_gb must be >= 0 (GiB), got {gb!r}.")
        self.derived = gb is None
        self.total = default_budget_bytes(fraction, world_size) if gb is None else int(float(gb) * GB)
        self.used = 0

    @property
    def left(self) -> int:
        return max(0, self.total - self.used)

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit in what is left; whether they did."""
        if nbytes > self.left:
            return False
        self.used += int(nbytes)
        return True

    def describe(self) -> str:
        how = "derived: half the available memory" if self.derived else "cache_memory_gb"
        return f"{self.total / GB:.2f} GiB ({how})"


def cached_nbytes(obj: Any, seen: set | None = None) -> int:
    """Bytes held by the tensors and arrays in ``obj`` (nested dicts, lists), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = ("t", storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return int(storage.nbytes())
    if isinstance(obj, np.ndarray):
        base = obj if obj.base is None else obj.base
        if ("a", id(base)) in seen:
            return 0
        seen.add(("a", id(base)))
        return int(getattr(base, "nbytes", obj.nbytes))
    if isinstance(obj, dict):
        return sum(cached_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(cached_nbytes(v, seen) for v in obj)
    return 0


def _describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's settings (class, attributes, nested objects), stable across runs."""
    if depth > 8:
        return "..."
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (torch.dtype, np.dtype, torch.device)) or (isinstance(obj, type) and issubclass(obj, np.generic)):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(json.dumps(_describe(v, depth + 1), sort_keys=True) for v in obj)
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        arr = np.ascontiguousarray(torch.as_tensor(obj).detach().cpu().numpy())
        return {"shape": list(arr.shape), "dtype": str(arr.dtype), "md5": hashlib.md5(arr.tobytes()).hexdigest()}
    if isinstance(obj, (np.random.RandomState, np.random.Generator)):
        return type(obj).__name__  # random state: not a setting of the deterministic part
    if inspect.isroutine(obj) or inspect.isclass(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    cls = type(obj)
    out: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if cls.__module__.split(".")[0] == "custom_components":  # our code may change without a version number
        try:
            out["source"] = hashlib.md5(inspect.getsource(cls).encode()).hexdigest()
        except (OSError, TypeError):
            pass
    if hasattr(obj, "__dict__"):
        out["attributes"] = _describe({k: v for k, v in vars(obj).items() if k != "R"}, depth + 1)
    else:
        out["repr"] = repr(obj) if " at 0x" not in repr(obj) else cls.__qualname__
    return out


def transform_fingerprint(transforms: Sequence[Any]) -> bytes:
    """Hash (hex, bytes) of the deterministic transforms' settings; PersistentDataset's ``hash_transform``."""
    import monai

    text = json.dumps({"format": CACHE_FORMAT, "monai": monai.__version__, "torch": torch.__version__.split("+")[0],
                       "transforms": [_describe(t) for t in transforms]}, sort_keys=True, default=str)
    return hashlib.md5(text.encode()).hexdigest().encode()


def item_fingerprint(item: Any) -> bytes:
    """Hash (hex, bytes) of a data item with the size and modification time of every file it names."""
    def files(v: Any) -> Any:
        if isinstance(v, str) and os.path.isfile(v):
            st = os.stat(v)
            return [v, st.st_size, st.st_mtime_ns]
        if isinstance(v, dict):
            return {str(k): files(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [files(x) for x in v]
        return v if isinstance(v, (bool, int, float, type(None))) else str(v)

    return hashlib.md5(json.dumps(files(item), sort_keys=True).encode()).hexdigest().encode()


def _first_random(transform: Compose) -> int | None:
    return transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))


class BudgetCacheDataset(CacheDataset):
    """``CacheDataset`` holding in RAM only the subjects that fit a :class:`MemoryBudget`; the rest on disk.

    The first subjects (in datalist order; the loader shuffles) are cached in RAM while their preprocessed size fits
    what is left of ``budget`` (and ``cache_rate`` of the data set); each other subject is preprocessed once into
    ``cache_dir`` and loaded from there each time it is drawn (MONAI ``PersistentDataset``, keyed by
    :func:`item_fingerprint` and :func:`transform_fingerprint`). Before anything is cached, the first subject is
    preprocessed and its size times the number of subjects is compared with the budget and the free disk space; a
    data set that fits neither is refused with the numbers. The start-up log says what is cached where.

    The random transforms run on both kinds of items alike (same ``transform`` object, same random state), so the
    place a subject is cached changes nothing in training.

    Args:
        data: the datalist.
        transform: the whole pipeline (a ``Compose``); its deterministic head is cached.
        budget: the shared memory budget; a number is GiB (a budget of its own), ``None`` the default budget.
        cache_dir: folder of the disk cache (a subfolder per pipeline fingerprint is not needed: the fingerprint is
            part of each file name); ``None`` allows no disk cache.
        cache_rate: at most this share of the subjects in RAM.
        num_workers: threads preprocessing the subjects.
        copy_cache: deep-copy a cached item before the random transforms (``CacheDataset``'s option).
        track_meta: keep MONAI metadata in the disk cache (validation items need it; the training items have none).
        in_memory_only: refuse unless every subject fits in RAM (``ErrorWeightedSampling`` updates only items in
            RAM); the value says why.
        name: the data set's name in the log and the messages.
        disk_margin: share of the free disk space left free.
        max_age_days: at start, files of the disk cache's own naming (``<md5 of the item><md5 of the pipeline>.pt``)
            that this data set does not use and that no run has used for this many days are deleted (logged with
            their number and size); the files it uses are marked used (their modification time). ``None`` keeps
            everything. Nothing else in ``cache_dir`` is ever touched.
        progress: unused (a ``CacheDataset`` option kept for config compatibility).
    """

    def __init__(self, data: Sequence, transform: Compose, budget: MemoryBudget | float | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_rate: float = 1.0, num_workers: int | None = 1,
                 copy_cache: bool = False, track_meta: bool = False, in_memory_only: bool | str = False,
                 name: str = "training", disk_margin: float = 0.1, max_age_days: float | None = 30.0,
                 progress: bool = False) -> None:
        if not isinstance(transform, Compose):
            transform = Compose(transform)
        self.budget = budget if isinstance(budget, MemoryBudget) else MemoryBudget(budget)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.track_meta, self.in_memory_only, self.name = track_meta, in_memory_only, name
        self.disk_margin = float(disk_margin)
        if max_age_days is not None and (isinstance(max_age_days, bool) or not max_age_days >= 0):
            raise ValueError(f"cache_max_age_days must be a number of days >= 0 or null (keep all), got {max_age_days!r}.")
        self.max_age_days = max_age_days
        # in a dict: MONAI's loaders seed a dataset's transforms by walking its attributes (monai.data.utils.set_rnd),
        # and a PersistentDataset attribute holding the same transform would be seeded too, shifting the seeds
        self._persistent: dict[str, PersistentDataset] = {}
        self.plan: dict[str, Any] = {}
        super().__init__(data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers,
                         progress=False, copy_cache=copy_cache, hash_as_key=False, runtime_cache=False)

    # ---------------------------------------------------------------- caching
    def _disk_dataset(self) -> PersistentDataset:
        if "disk" not in self._persistent:
            if self.cache_dir is None:
                raise RuntimeError("no disk cache (cache_dir is None)")
            self._persistent["disk"] = PersistentDataset(
                self.data, self.transform, cache_dir=self.cache_dir, hash_func=item_fingerprint,
                hash_transform=transform_fingerprint, track_meta=self.track_meta, weights_only=False)
        return self._persistent["disk"]

    def _disk_file(self, index: int) -> Path:
        disk = self._disk_dataset()
        return disk.cache_dir / f"{item_fingerprint(self.data[index]).decode()}{disk.transform_hash}.pt"

    def _write_disk_item(self, index: int, item: dict | None = None) -> int:
        """Write subject ``index`` preprocessed to the disk cache unless there; the file's size."""
        path = self._disk_file(index)
        if path.is_file():
            return path.stat().st_size
        if item is None:
            item = CacheDataset._load_cache_item(self, index)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # same file system: an atomic rename
            part = Path(tmp) / path.name
            torch.save(convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta), part)
            os.replace(part, path)
        return path.stat().st_size

    def _fill_cache(self, indices=None) -> list:  # CacheDataset.set_data calls it with the first cache_num indices
        n = len(self.data)
        ram_cap = min(n, int(n * self.set_rate), int(self.set_num))
        if n == 0:
            self.cache_num = 0
            return []
        first = CacheDataset._load_cache_item(self, 0)
        per_item = cached_nbytes(first)
        # the plan: the first subjects while they fit (same size as the first), the rest on disk
        fit = min(ram_cap, self.budget.left // per_item if per_item else ram_cap)
        on_disk = n - fit
        need_disk = on_disk * per_item
        self.plan = {"subjects": n, "bytes_per_subject": per_item, "budget_bytes": self.budget.total,
                     "budget_left_bytes": self.budget.left, "planned_in_ram": int(fit),
                     "planned_on_disk": int(on_disk), "disk_bytes": int(need_disk), "cache_dir": str(self.cache_dir)}
        if on_disk and self.in_memory_only:
            why = self.in_memory_only if isinstance(self.in_memory_only, str) else "this data set must be in RAM"
            raise MemoryError(
                f"{self.name} data: {n} subjects of {per_item / 2**20:.1f} MB each need {n * per_item / GB:.2f} GiB "
                f"of RAM, the cache budget has {self.budget.left / GB:.2f} GiB left of {self.budget.describe()}; "
                f"{why}. Raise cache_memory_gb (if the machine has the memory) or use fewer subjects.")
        if on_disk:
            if self.cache_dir is None:
                raise MemoryError(
                    f"{self.name} data: {n} subjects of {per_item / 2**20:.1f} MB each need {n * per_item / GB:.2f} "
                    f"GiB; {fit} fit in the cache budget ({self.budget.left / GB:.2f} GiB left of "
                    f"{self.budget.describe()}) and there is no disk cache (cache_dir) for the other {on_disk}.")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.cache_dir).free
            there = sum(1 for i in range(fit, n) if self._disk_file(i).is_file())
            missing = (on_disk - there) * per_item
            if missing > free * (1 - self.disk_margin):
                raise MemoryError(
                    f"{self.name} data: {n} subjects of {per_item / 2**20:.1f} MB each cannot be cached: {fit} fit in "
                    f"RAM ({self.budget.left / GB:.2f} GiB left of {self.budget.describe()}), the other {on_disk} "
                    f"need {missing / GB:.2f} GiB more in the disk cache {self.cache_dir}, which has "
                    f"{free / GB:.2f} GiB free ({100 * self.disk_margin:.0f}% kept free). Free disk space, "
                    f"point cache_dir elsewhere, raise cache_memory_gb or use fewer subjects.")
        logger.info(
            "%s data: %d subjects, %.1f MB each preprocessed; %d cached in RAM (%.2f GiB expected, cache budget %s, "
            "%.2f GiB of it left before), %d from the disk cache %s (%.2f GiB)", self.name, n, per_item / 2**20,
            fit, fit * per_item / GB, self.budget.describe(), self.budget.left / GB, on_disk,
            self.cache_dir if on_disk else "-", need_disk / GB)
        cache: list = []
        item: dict | None = first
        workers = max(1, int(self.num_workers or 1))
        index = 0
        # RAM: in order, while each subject fits what is left (sizes vary with the crop)
        while index < min(fit, n):
            if item is None:
                item = CacheDataset._load_cache_item(self, index)
            size = cached_nbytes(item)
            if not self.budget.take(size):
                break
            cache.append(item)
            item, index = None, index + 1
        self.cache_num = len(cache)
        rest = list(range(index, n))
        if rest:
            if self.cache_dir is None:
                raise MemoryError(f"{self.name} data: subject {index} does not fit the cache budget "
                                  f"({self.budget.left / GB:.2f} GiB left) and there is no disk cache (cache_dir).")
            if item is not None:  # preprocessed already
                self._write_disk_item(rest.pop(0), item)
            with ThreadPool(workers) as pool:
                list(pool.imap(self._write_disk_item, rest))
        self.plan.update(in_ram=self.cache_num, on_disk=n - self.cache_num, ram_bytes=sum(map(cached_nbytes, cache)))
        self.plan["pruned_files"], self.plan["pruned_bytes"] = self.prune_disk_cache(range(self.cache_num, n))
        if self.cache_num != fit:
            logger.info("%s data: %d subjects cached in RAM (%.2f GiB), %d from the disk cache", self.name,
                        self.cache_num, self.plan["ram_bytes"] / GB, n - self.cache_num)
        return cache

    def prune_disk_cache(self, used: Sequence[int] = ()) -> tuple[int, int]:
        """Mark the disk files of subjects ``used`` as used now and delete the cache's files unused for longer than
        ``max_age_days``; returns (files deleted, bytes freed)."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return 0, 0
        keep = {self._disk_file(i) for i in used}
        for path in keep:
            if path.is_file():
                os.utime(path)
        if self.max_age_days is None:
            return 0, 0
        limit = time.time() - float(self.max_age_days) * 86400
        removed, freed = 0, 0
        for path in self.cache_dir.iterdir():
            if path in keep or not _CACHE_FILE.fullmatch(path.name) or not path.is_file():
                continue
            stat = path.stat()
            if stat.st_mtime < limit:
                path.unlink(missing_ok=True)
                removed, freed = removed + 1, freed + stat.st_size
        if removed:
            logger.info("%s data: deleted %d disk-cache files unused for over %g days from %s (%.2f GiB)", self.name,
                        removed, self.max_age_days, self.cache_dir, freed / GB)
        return removed, freed

    def _transform(self, index: int):
        if index % len(self) < self.cache_num:
            return super()._transform(index)
        disk = self._disk_dataset()
        return disk._post_transform(disk._cachecheck(self.data[index]))
