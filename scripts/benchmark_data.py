"""Data, cache and inference measurements of the benchmark (:mod:`benchmark`): whole-volume inference, the
resident memory per cached subject, the data wait from RAM and from disk, the per-batch patch cost and
the time to a validation PSNR.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark_steps import EARLIER_LAYOUT, LEVERS, ROOT, _parser

BENCHMARK = Path(__file__).with_name("benchmark.py")  # the CLI the cache probe runs

#: local discriminator layouts whose confidence-map cost the inference stage reports besides the shipped one
D2_LAYOUTS: dict[str, dict[str, Any]] = {
    "paper layout (full resolution, 16-128)": {k: EARLIER_LAYOUT[k] for k in ("local_stem_stride", "local_channels")},
    "half resolution, 8-64": LEVERS["half-res D2 8-64"],
}


def _inference(overrides: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Whole-volume inference vs the bare forward of the same padded whole slices, window inferer, confidence map."""
    import torch
    import torch.nn.functional as F

    from custom_components.transforms.confidence import ConfidenceMapd

    p = _parser({**overrides, "variant": "dual_attention"})
    g = p.get_parsed_content("network").eval()
    d2 = p.get_parsed_content("local_discriminator").eval()
    volume = p.get_parsed_content("validate#dataset")[0]["source"][None].to(p.get_parsed_content("device"))
    inferer = p.get_parsed_content("validate#inferer")
    res: dict[str, Any] = {"volume_shape": list(volume.shape[2:]), "inferer": type(inferer).__name__,
                           "sw_batch_size": int(p["sw_batch_size"])}

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    with torch.no_grad():
        res["inferer_s"] = timed(lambda: inferer(volume, g))
        if int(p["spatial_dims"]) != 2:
            return res
        sw, k = res["sw_batch_size"], int(getattr(inferer, "divisor", 1))
        slices = volume[0].as_tensor().permute(3, 0, 1, 2).contiguous()  # (D, 1, H, W)
        h, w = slices.shape[-2:]
        slices = F.pad(slices, (0, -w % k, 0, -h % k))
        res["bare_forward_s"] = timed(lambda: [g(slices[i:i + sw]) for i in range(0, slices.shape[0], sw)])
        res["overhead_ratio"] = res["inferer_s"] / res["bare_forward_s"]
        res["slices_per_s"] = slices.shape[0] / res["inferer_s"]
        window = _parser({**overrides, "slice_mode": "window"}).get_parsed_content("validate#inferer")
        res["window_inferer_s"] = timed(lambda: window(volume, g))
        pred = inferer(volume, g)[0]
        conf = ConfidenceMapd("pred", d2, inferer)
        res["confidence_s"] = timed(lambda: conf({"pred": pred}))
        res["confidence_ratio"] = res["confidence_s"] / res["inferer_s"]
        # the other D2 layouts, each through the inferer the config builds for it (its padding multiple)
        shipped = (int(p["local_stem_stride"]), list(p["local_channels"]))
        res["confidence_layouts"] = {}
        for name, layout in D2_LAYOUTS.items():
            if (layout["local_stem_stride"], layout["local_channels"]) == shipped:
                continue
            q = _parser({**overrides, **layout, "variant": "dual_attention"})
            other = ConfidenceMapd("pred", q.get_parsed_content("local_discriminator").eval(),
                                   q.get_parsed_content("validate#inferer"))
            seconds = timed(lambda: other({"pred": pred}))
            res["confidence_layouts"][name] = {"confidence_s": seconds, "confidence_ratio": seconds / res["inferer_s"]}
    return res


#: subjects of the paper's training set and of BraTS 2021, for the projection of the cache memory
PROJECT_SUBJECTS = (200, 1251)


def _rss_mb() -> float:
    """Current resident set size of this process (``VmRSS``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status (Linux only)")


def _cache_probe(spec: str | dict) -> None:
    """Subprocess entry: resident memory grown by building ``train#dataset`` (the cache); prints one JSON line."""
    import gc

    args = spec if isinstance(spec, dict) else json.loads(spec)
    p = _parser(args["overrides"])
    n = len(p.get_parsed_content("train_datalist"))  # the datalist check reads the volumes: before the baseline
    gc.collect()
    before = _rss_mb()
    t0 = time.perf_counter()
    dataset = p.get_parsed_content("train#dataset")
    seconds = time.perf_counter() - t0
    gc.collect()
    after = _rss_mb()
    ram = int(getattr(dataset, "cache_num", n))
    print("CACHE " + json.dumps({"subjects": n, "in_ram": ram, "rss_before_mb": before, "rss_after_mb": after,
                                 "build_s": seconds, "dataset": type(dataset).__name__}))


def _cache_memory(overrides: dict[str, Any]) -> dict[str, Any]:
    """Resident memory per training subject cached in RAM (a fresh subprocess) and its projection.

    The growth of the resident set while ``train#dataset`` is built, divided by the subjects held in RAM, times
    :data:`PROJECT_SUBJECTS`.
    """
    spec = json.dumps({"overrides": overrides})
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--cache_probe", spec], capture_output=True, text=True,
                          cwd=ROOT, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CACHE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"cache probe {overrides} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("CACHE "):])
    grown = res["rss_after_mb"] - res["rss_before_mb"]
    res["mb_per_subject"] = grown / res["in_ram"] if res["in_ram"] else float("nan")
    res["projected_gb"] = {str(k): res["mb_per_subject"] * k / 1024 for k in PROJECT_SUBJECTS}
    return res


def _data_wait(overrides: dict[str, Any], epochs: int, variant: str = "dual_attention") -> dict[str, float]:
    """Share of step time waiting for data: real cached pipeline, default loader, ``variant``'s step."""
    from ignite.handlers import BasicTimeProfiler

    p = _parser({**overrides, "variant": variant, "epochs": epochs, "train#trainer#train_handlers": [],
                 "train#trainer#adversarial_warmup": 0, "train#trainer#attention_warmup": 0})
    dataset = p.get_parsed_content("train#dataset")
    trainer = p.get_parsed_content("train#trainer")
    profiler = BasicTimeProfiler()
    profiler.attach(trainer)
    trainer.run()
    prof = profiler.get_results()
    data_s, proc_s = float(prof["dataflow_stats"]["total"]), float(prof["processing_stats"]["total"])
    n = trainer.state.iteration
    return {"data_wait_share": data_s / (data_s + proc_s), "data_s": data_s, "processing_s": proc_s,
            "iterations": n, "num_workers": int(p["num_workers"]), "loader": type(trainer.data_loader).__name__,
            "batches_per_epoch": int(trainer.state.epoch_length), "data_per_batch_s": data_s / n,
            "step_s": proc_s / n, "variant": variant, "subjects": len(dataset),
            "in_ram": int(getattr(dataset, "cache_num", len(dataset))), "cache_memory_gb": p["cache_memory_gb"]}


def _data_wait_regimes(overrides: dict[str, Any], epochs: int, disk_budget_gb: float | None = None) -> list[dict]:
    """:func:`_data_wait` for the plain-L1 and the GAN step, from RAM (the default budget) and from the disk cache
    (``cache_memory_gb`` = ``disk_budget_gb``, default 0: every subject from disk)."""
    rows = []
    regimes = {"ram": {}, "disk": {"cache_memory_gb": 0 if disk_budget_gb is None else disk_budget_gb}}
    for regime, extra in regimes.items():
        for variant in ("unet", "dual_attention"):
            rows.append({"regime": regime, **_data_wait({**overrides, **extra}, epochs, variant)})
            print(f"[benchmark] data wait {regime} {variant}: {rows[-1]['data_wait_share']:.1%}", file=sys.stderr,
                  flush=True)
    return rows


def _patch_cost(overrides: dict[str, Any], batches: int = 40) -> dict[str, float]:
    """Per-batch cost of the random part of the training pipeline, the fused crop against the chain it replaced
    (``RandTableWeightedCropd`` -> ``SqueezeDimd`` -> ``RandFlipd``), side by side on the same cached volumes."""
    from monai.transforms import RandFlipd, SqueezeDimd

    from custom_components.transforms.patches import FusedPatchd
    from custom_components.transforms.dictionary import RandTableWeightedCropd, UntrackedCompose

    p = _parser(overrides)
    dataset = p.get_parsed_content("train#dataset")
    keys, size, n = p.get_parsed_content("all_keys"), p.get_parsed_content("train#sample_size"), p["samples_per_volume"]
    squeeze = 3 if p["spatial_dims"] == 2 else None
    chain = [RandTableWeightedCropd(keys, "sampling_weight", size, n, allow_missing_keys=True)]
    chain += [SqueezeDimd(keys, dim=3, allow_missing_keys=True)] if squeeze else []
    chain += [RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True)]
    pipelines = {"chain": UntrackedCompose(chain),
                 "fused": FusedPatchd(keys, "sampling_weight", size, n, squeeze_dim=squeeze, allow_missing_keys=True)}
    cached = [dataset._cache[i] for i in range(min(len(dataset._cache), int(p["batch_size"])))]
    out: dict[str, float] = {}
    for _ in range(2):  # two alternating rounds; the second is reported
        for name, pipeline in pipelines.items():
            pipeline.set_random_state(seed=0)
            t0 = time.perf_counter()
            for _ in range(batches):
                for item in cached:
                    pipeline(dict(item))
            out[f"{name}_per_batch_s"] = (time.perf_counter() - t0) / batches
    out["speedup"] = out["chain_per_batch_s"] / out["fused_per_batch_s"]
    return out


def _time_to_quality(overrides: dict[str, Any], psnr: float, max_epochs: int) -> dict[str, Any]:
    """Training wall time (validation excluded) of unet and dual_attention until validation PSNR >= ``psnr``."""
    from ignite.engine import Events

    out: dict[str, Any] = {"target_psnr": psnr, "max_epochs": max_epochs}
    _parser(overrides).get_parsed_content("prepare_data")  # the config's own step: the phantom, if make_phantom
    for variant in ("unet", "dual_attention"):
        with tempfile.TemporaryDirectory() as tmp:
            p = _parser({"adversarial_warmup": 0, "attention_warmup": 0, **overrides, "variant": variant, "epochs": max_epochs, "val_interval": 1,
                         "output_dir": tmp, "model_dir": tmp,
                         "train#trainer#train_handlers": "$[@train#handlers[0]]"})  # the validation handler only
            trainer, evaluator = p.get_parsed_content("train#trainer"), p.get_parsed_content("validate#evaluator")
            clock = {"start": 0.0, "val": 0.0, "val_start": 0.0}
            row: dict[str, Any] = {"reached": False, "best_psnr": float("-inf")}

            @trainer.on(Events.STARTED)
            def _start(_):
                clock["start"] = time.perf_counter()

            @evaluator.on(Events.STARTED)
            def _val_start(_):
                clock["val_start"] = time.perf_counter()

            @evaluator.on(Events.COMPLETED)
            def _val_done(engine):
                now = time.perf_counter()
                clock["val"] += now - clock["val_start"]
                value = float(engine.state.metrics["val_psnr"])
                row["best_psnr"] = max(row["best_psnr"], value)
                if value >= psnr and not row["reached"]:
                    row.update(reached=True, epoch=trainer.state.epoch, seconds=now - clock["start"] - clock["val"])
                    trainer.terminate()

            trainer.run()
            if not row["reached"]:
                row["seconds_run"] = time.perf_counter() - clock["start"] - clock["val"]
            out[variant] = row
    return out
