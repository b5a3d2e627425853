"""The smaller training cache (crop to the sampling region, no label/mask/weight map, int32 table), the memory budget
and the disk cache of ``custom_components.data.caching``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, DeleteItemsd, EnsureTyped, RandFlipd, SqueezeDimd

from custom_components.data.caching import BudgetCacheDataset, MemoryBudget, cached_nbytes, default_budget_bytes
from custom_components.transforms.dictionary import (CropToSamplingRegiond, RandTableWeightedCropd, SamplingTabled,
                                          SamplingWeightd)

KEYS = ["source", "target", "label", "mask"]


def _item(shape=(40, 36, 12), seed=0, box=((9, 30), (7, 27), (2, 10))):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, *shape)
    mask[(slice(None), *[slice(a, b) for a, b in box])] = 1
    label = (torch.rand(1, *shape, generator=g) > 0.93).float() * mask
    src = MetaTensor(torch.rand(1, *shape, generator=g))
    return {"source": src, "target": src * 2 + 1, "mask": mask, "label": label}


def _chain(size, tumour_weight=0.0, crop=True, keep_weight=False, n=6):
    head = [SamplingWeightd(tumour_weight=tumour_weight)]
    if crop:
        head += [CropToSamplingRegiond(KEYS, "sampling_weight", size, allow_missing_keys=True),
                 DeleteItemsd(["label", "mask"])]
    head += [SamplingTabled(spatial_size=size, keep_weight=keep_weight or not crop),
             EnsureTyped(KEYS, track_meta=False, allow_missing_keys=True)]
    return head + [RandTableWeightedCropd(KEYS, "sampling_weight", size, num_samples=n, allow_missing_keys=True)]


def _patches(chain, item, seed, rounds=10):
    c = Compose(chain)
    c.set_random_state(seed)
    det = Compose(chain[:-1])(dict(item))
    return [chain[-1](det) for _ in range(rounds)], det


@pytest.mark.parametrize("size,tumour_weight", [((8, 8, 1), 0.0), ((8, 8, 1), 4.0), ((7, 10, 3), 0.0),
                                                ((7, 10, 3), 2.5), ((32, 30, 1), 0.0)])
def test_cropped_cache_gives_the_same_patches_for_the_same_random_state(size, tumour_weight):
    item = _item()
    ours, det = _patches(_chain(size, tumour_weight), item, seed=5)
    theirs, full = _patches(_chain(size, tumour_weight, crop=False), item, seed=5)
    assert det["source"].shape[1:] != full["source"].shape[1:]  # it did crop
    assert "label" not in det and "mask" not in det and "sampling_weight" not in det
    for a, b in zip(ours, theirs):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            for k in ("source", "target"):
                torch.testing.assert_close(torch.as_tensor(x[k]), torch.as_tensor(y[k]), rtol=0, atol=0)


def test_patch_centres_stay_inside_the_mask_after_the_crop():
    item = _item()
    shape = item["mask"].shape
    item["source"] = MetaTensor(torch.arange(item["mask"].numel(), dtype=torch.float32).reshape(shape))
    size = (5, 5, 1)
    patches, _ = _patches(_chain(size, n=50), item, seed=1, rounds=8)
    flat_mask = item["mask"].reshape(-1)
    for batch in patches:
        for p in batch:
            centre = int(p["source"][0, size[0] // 2, size[1] // 2, 0])
            assert flat_mask[centre] > 0


def test_the_crop_is_a_copy_and_a_degenerate_mask_is_left_alone():
    item = _item()
    d = CropToSamplingRegiond(KEYS, "sampling_weight", (8, 8, 1))(SamplingWeightd()(item))
    src = d["source"]
    # its own, smaller storage (a view would keep the whole volume alive)
    assert src.untyped_storage().nbytes() == src.numel() * 4 < item["source"].numel() * 4
    assert tuple(src.shape[1:]) == (21 + 8, 20 + 8, 8 + 2)  # the mask's box, ceil(half a patch) each side
    # a mask only in the border zone, where no patch centre is valid: uncropped, the draw stays uniform there
    edge = _item(box=((0, 2), (0, 36), (0, 12)))
    w = SamplingWeightd()(edge)
    out = CropToSamplingRegiond(KEYS, "sampling_weight", (8, 8, 1))(w)
    assert out["source"].shape == edge["source"].shape


def test_table_without_the_weight_map_is_int32_and_uniform_needs_no_sum():
    item = SamplingWeightd()(_item())
    t = SamplingTabled(spatial_size=(8, 8, 1), keep_weight=False)(item)
    table = t["sampling_table"]
    assert "sampling_weight" not in t and table["index"].dtype == torch.int32 and table["cdf"] is None
    weighted = SamplingTabled(spatial_size=(8, 8, 1))(SamplingWeightd(tumour_weight=3)(_item()))
    assert weighted["sampling_table"]["cdf"].dtype == torch.float64
    assert weighted["sampling_table"]["weight"] is weighted["sampling_weight"]
    crop = RandTableWeightedCropd(["source"], "sampling_weight", (8, 8, 1))
    with pytest.raises(ValueError, match="nothing to sample from"):
        crop({"source": item["source"]})


def _budget_ds(tmp_path, data, gb, **kw):
    chain = _chain((8, 8, 1))
    chain = chain[:-1] + [Compose([chain[-1], SqueezeDimd(["source", "target"], dim=3),
                                   RandFlipd(["source", "target"], prob=0.5, spatial_axis=0)])]
    return BudgetCacheDataset(data, Compose(chain), budget=gb, cache_dir=tmp_path / "cache", **kw)


def _draw(ds, seed):
    from monai.data.utils import set_rnd

    set_rnd(ds, seed)  # as MONAI's DataLoader seeds a dataset (it walks the dataset's attributes)
    return [[p["source"].clone() for p in ds[i]] for i in range(len(ds))]


def test_budget_splits_ram_and_disk_and_every_split_gives_the_same_patches(tmp_path, caplog):
    data = [_item(seed=i) for i in range(4)]
    caplog.set_level(logging.INFO, logger="custom_components.data.caching")
    full = _budget_ds(tmp_path, data, None)
    assert full.cache_num == 4 and not list((tmp_path / "cache").glob("*.pt"))
    per = cached_nbytes(full._cache[0])
    assert per < cached_nbytes(_chain((8, 8, 1), crop=False)[0](dict(data[0])))  # smaller than the map alone + images
    part = _budget_ds(tmp_path, data, 2.5 * per / 2**30)
    assert part.cache_num == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert "2 cached in RAM" in caplog.text and "2 from the disk cache" in caplog.text
    none = _budget_ds(tmp_path, data, 0)  # nothing fits: everything from disk, the two new files written
    assert none.cache_num == 0 and len(list((tmp_path / "cache").glob("*.pt"))) == 4
    ref = _draw(full, 3)
    for ds in (part, none):
        for a, b in zip(ref, _draw(ds, 3)):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_the_budget_is_shared_and_the_default_leaves_a_margin(tmp_path):
    data = [_item(seed=i) for i in range(3)]
    per = cached_nbytes(_budget_ds(tmp_path, data[:1], None)._cache[0])
    budget = MemoryBudget(3.5 * per / 2**30)
    a = _budget_ds(tmp_path, data, budget)
    b = _budget_ds(tmp_path, data, budget)  # the second set gets what the first left
    assert (a.cache_num, b.cache_num) == (3, 0) and budget.used <= budget.total
    assert default_budget_bytes(0.5, 2, available=8 * 2**30) == 2 * 2**30
    with pytest.raises(ValueError, match="cache_memory_gb"):
        MemoryBudget(-1)


def test_disk_cache_is_keyed_by_the_preprocessing_settings_and_the_files(tmp_path):
    data = [_item(seed=i) for i in range(2)]
    ds = _budget_ds(tmp_path, data, 0)
    files = set((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 2
    stamp = {f: (f.stat().st_ino, f.read_bytes()) for f in files}  # a rewrite (atomic rename) is a new inode
    again = _budget_ds(tmp_path, data, 0)  # the same settings: the same files, not rewritten
    assert set((tmp_path / "cache").glob("*.pt")) == files
    assert all((f.stat().st_ino, f.read_bytes()) == stamp[f] for f in files)
    # a changed option of a cached transform (the tumour weight) makes new files: none is reused
    chain = _chain((8, 8, 1), tumour_weight=4.0)
    other = BudgetCacheDataset(data, Compose(chain), budget=0, cache_dir=tmp_path / "cache")
    new = set((tmp_path / "cache").glob("*.pt")) - files
    assert len(new) == 2
    # and they hold the new setting's table (tumour-weighted: a cumulative sum), the old ones the uniform one
    assert all(torch.load(f, weights_only=False)["sampling_table"]["cdf"] is not None for f in new)
    assert all(torch.load(f, weights_only=False)["sampling_table"]["cdf"] is None for f in files)
    assert len(other[0]) == len(again[0]) == 6
    # a rewritten image file (same path) is a new item
    img = tmp_path / "a.txt"
    img.write_text("1")
    from custom_components.data.caching import item_fingerprint
    h1 = item_fingerprint({"source": str(img)})
    os.utime(img, ns=(1, 1))
    assert item_fingerprint({"source": str(img)}) != h1
    assert ds.cache_num == 0


def test_a_set_that_fits_nowhere_is_refused_before_any_file_is_written(tmp_path, monkeypatch):
    import shutil

    data = [_item(seed=i) for i in range(3)]
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(MemoryError, match=r"3 subjects of .* MB each cannot be cached: 0 fit in RAM") as err:
        _budget_ds(tmp_path, data, 0)
    assert "GiB free" in str(err.value) and not list((tmp_path / "cache").glob("*.pt"))
    monkeypatch.setattr(shutil, "disk_usage", real)
    with pytest.raises(MemoryError, match="hard_sampling updates"):
        _budget_ds(tmp_path, data, 0, in_memory_only="hard_sampling updates the weight maps in RAM")
    with pytest.raises(MemoryError, match="no disk cache"):
        BudgetCacheDataset(data, Compose(_chain((8, 8, 1))), budget=0, cache_dir=None)


def test_error_weighted_sampling_updates_the_kept_weight_maps(tmp_path):
    from monai.inferers import SimpleInferer

    from custom_components.handlers.training import ErrorWeightedSampling

    data = [_item(seed=i) for i in range(2)]
    ds = BudgetCacheDataset(data, Compose(_chain((8, 8, 1), keep_weight=True)), budget=None,
                            cache_dir=tmp_path / "cache")
    assert all("sampling_weight" in item for item in ds._cache)
    net = torch.nn.Conv3d(1, 1, 1)
    ErrorWeightedSampling(ds, net, SimpleInferer(), interval=1, error_weight=4.0)()
    item = ds._cache[0]
    assert item["sampling_table"]["weight"] is not item["sampling_weight"]  # replaced: the crop falls back to it
    assert not torch.equal(item["sampling_weight"], item["sampling_weight_base"])
    patches = ds[0]
    assert len(patches) == 6 and patches[0]["source"].shape == (1, 8, 8, 1)


@pytest.mark.parametrize("size", [(8, 8, 1), (7, 10, 3)])
def test_uniform_table_without_a_sum_draws_monais_centres(size):
    """Uniform weights (the default) store no cumulative sum; the draw is still MONAI's for the same random state."""
    from monai.transforms import RandWeightedCropd

    item = SamplingWeightd()(_item())
    ours = RandTableWeightedCropd(["source"], "sampling_weight", size, num_samples=7)
    theirs = RandWeightedCropd(["source"], "sampling_weight", size, num_samples=7)
    tabled = SamplingTabled(spatial_size=size, keep_weight=False)(dict(item))
    ours.set_random_state(11), theirs.set_random_state(11)
    for _ in range(10):
        for x, y in zip(ours(dict(tabled)), theirs(dict(item))):
            torch.testing.assert_close(x["source"].as_tensor(), y["source"].as_tensor(), rtol=0, atol=0)


def test_disk_cache_files_unused_for_max_age_days_are_deleted_and_nothing_else(tmp_path):
    import time

    cache = tmp_path / "cache"
    data = [_item(seed=i) for i in range(2)]
    _budget_ds(tmp_path, data, 0)  # every subject on disk
    ours = sorted(cache.glob("*.pt"))
    assert ours
    old = time.time() - 40 * 86400
    stale = cache / ("0" * 64 + ".pt")  # another pipeline's file, unused for 40 days
    recent = cache / ("1" * 64 + ".pt")  # another pipeline's file, used yesterday
    foreign = cache / "notes.pt"  # not of the cache's naming: never touched
    for f in (stale, recent, foreign):
        f.write_bytes(b"x" * 10)
    for f in (stale, foreign, *ours):
        os.utime(f, (old, old))
    os.utime(recent, (time.time() - 86400,) * 2)
    ds = _budget_ds(tmp_path, data, 0)  # max_age_days 30 by default
    assert not stale.exists() and recent.exists() and foreign.exists()
    assert all(f.exists() and f.stat().st_mtime > old + 86400 for f in ours)  # in use: kept and marked used
    assert (ds.plan["pruned_files"], ds.plan["pruned_bytes"]) == (1, 10)
    os.utime(recent, (old, old))
    kept = _budget_ds(tmp_path, data, 0, max_age_days=None)
    assert recent.exists() and kept.plan["pruned_files"] == 0
    with pytest.raises(ValueError, match="cache_max_age_days"):
        _budget_ds(tmp_path, data, 0, max_age_days=-1)
