"""Side-by-side speed measurements of the training bundle on this machine (ratios, not absolute targets).

Every timed trainer is ``train#trainer`` of the shipped ``bundle/configs/train.json`` with the variant (and the
row's options) overridden, so the lambdas, ``p``, the attention options and the critic are what ships. Measured in
one process:

* training-step time of each variant relative to ``unet`` on the same batch, for the shipped generator, the usual
  UNet width (32-64-128-256-512) and 3D patches (``bundle/configs/3d.json``);
* the share of step time spent waiting for data with the real cached pipeline and the default loader settings
  (ignite ``BasicTimeProfiler``: dataflow vs processing);
* whole-volume inference with the bundle's inferer (``validate#inferer``) relative to the bare network forward of the
  same whole slices (padded the same way) in batches of the same size, the overlapping-window inferer for
  comparison, and the cost of the confidence map (``ConfidenceMapd``) relative to the synthesis;
* optional speed levers of the GAN step (``--levers``), each alone, against the same-run baseline: the design levers
  that are now the defaults (lazy penalty, strided critic, half-resolution D2) each added to the earlier layout, the
  others (bf16, ``channels_last``, ``torch.compile``, one thread) added to the shipped configuration;
* peak memory of each row (``--memory``): each row runs in its own subprocess, which trains a few steps at batch B
  and then 2B; the peak resident set size (``VmHWM`` of ``/proc/self/status``, CPU) or the peak CUDA
  allocation after each gives the memory per patch and the fixed part, hence the largest batch within
  ``--ram_budget_gb``;
* optional "time to quality" (``--ttq_psnr``): training wall time (validation excluded) until ``unet`` and
  ``dual_attention`` reach a validation PSNR on the phantom.

Example::

    python scripts/benchmark.py --real_size --levers --output benchmark_real.json
    python scripts/benchmark.py --steps 10 --overrides "{'gp_interval': 4}"
    python scripts/benchmark.py --widths shipped --nothree_d --nomemory --ttq_psnr 18  # fire negates with --no
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: generator widths of the rows: the shipped CPU-sized UNet and the usual UNet width
WIDTHS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "usual": {"generator_channels": [32, 64, 128, 256, 512], "network_def#strides": [2, 2, 2, 2]},
}
#: the BraTS-size phantom of ``--real_size`` (240 x 240 x 155 voxels of 1 mm; a few subjects)
REAL_SIZE_PHANTOM: dict[str, Any] = {"task": "t1t2", "n_train": 4, "n_val": 1, "n_test": 0, "seed": 0,
                                     "shape": [240, 240, 155], "spacing": [1.0, 1.0, 1.0]}
#: the measurements of :func:`main`, in order
STAGES = ("cache_memory", "data_wait", "inference", "steps", "time_to_quality")
#: the GAN-step layout shipped before the speed defaults (penalty every critic step, conv + pool critic,
#: full-resolution D2 with 16-128 filters): the baseline of the design levers
EARLIER_LAYOUT: dict[str, Any] = {"gp_interval": 1, "critic_downsample": "pool", "local_stem_stride": 1,
                                  "local_channels": [16, 32, 64, 128]}
#: speed levers of ``--levers``: overrides of train.json, or a name handled in :func:`_apply_lever`. The design
#: levers (those of :data:`DESIGN_LEVERS`) are timed each alone on :data:`EARLIER_LAYOUT`, the others on the shipped
#: configuration
LEVERS: dict[str, dict[str, Any]] = {
    "gp_interval=4": {"gp_interval": 4},
    "strided critic": {"critic_downsample": "stride"},
    "half-res D2 8-64": {"local_stem_stride": 2, "local_channels": [8, 16, 32, 64]},
    "bf16 autocast": {"precision": "bf16"},
    "channels_last": {},
    "torch.compile (G, D2)": {},
    "1 thread": {},
}
DESIGN_LEVERS = ("gp_interval=4", "strided critic", "half-res D2 8-64")
#: local discriminator layouts whose confidence-map cost the inference stage reports besides the shipped one
D2_LAYOUTS: dict[str, dict[str, Any]] = {
    "paper layout (full resolution, 16-128)": {k: EARLIER_LAYOUT[k] for k in ("local_stem_stride", "local_channels")},
    "half resolution, 8-64": LEVERS["half-res D2 8-64"],
}
#: levers that change no result (applied to the unet reference too)
SPEED_ONLY = ("channels_last", "torch.compile (G, D2)", "1 thread", "bf16 autocast")


def _parser(overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT / "bundle")})
    parser.update(overrides)
    return parser


def _config_trainer(overrides: dict[str, Any], variant: str, batches: list, **trainer_overrides: Any):
    """``train#trainer`` of the shipped config with ``variant``, no handlers, iterating over ``batches``."""
    # adversarial_warmup 0: every timed step is a step of the variant (the shipped warm-up trains G alone first)
    p = _parser({**overrides, "variant": variant, "epochs": 1, "train#trainer#adversarial_warmup": 0,
                 "train#trainer#attention_warmup": 0, "train#trainer#train_data_loader": "$[]",
                 "train#trainer#train_handlers": [], "train#trainer#epoch_length": len(batches),
                 **{f"train#trainer#{k}": v for k, v in trainer_overrides.items()}})
    trainer = p.get_parsed_content("train#trainer")
    trainer.data_loader = batches
    return trainer


def _time_steps(trainer, warmup: int) -> float:
    """Mean seconds per iteration of one ``trainer.run()``, leaving out the first ``warmup`` iterations."""
    import torch
    from ignite.engine import Events

    stamps: list[float] = []
    handle = trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    trainer.run()
    handle.remove()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = [start] + stamps
    per_step = [b - a for a, b in zip(times[:-1], times[1:])][warmup:]
    return sum(per_step) / len(per_step)


def _synthetic_batch(overrides: dict[str, Any], batch: int) -> dict:
    """A batch shaped like the config's training batch (``batch`` patches), random values."""
    import torch

    p = _parser(overrides)
    shape = (batch, 1, *[int(s) for s in p["patch_size"]])
    return {"source": torch.rand(shape), "target": torch.rand(shape)}


def _channels_last(batches: list) -> list:
    import torch

    fmt = torch.channels_last if batches[0]["source"].ndim == 4 else torch.channels_last_3d
    return [{k: torch.as_tensor(v).contiguous(memory_format=fmt) for k, v in b.items()} for b in batches]


def _apply_lever(trainer, lever: str) -> None:
    """Apply a lever that is not a config override to a built trainer (networks in place)."""
    import torch

    if lever == "channels_last":
        nets = [trainer.g_network, trainer.global_critic, trainer.local_discriminator]
        fmt = torch.channels_last if trainer.data_loader[0]["source"].ndim == 4 else torch.channels_last_3d
        for net in nets:
            if net is not None:
                net.to(memory_format=fmt)
        trainer.data_loader = _channels_last(trainer.data_loader)
    elif lever == "torch.compile (G, D2)":  # the critic needs a double backward, which compiled graphs do not support
        # dynamo does not trace MONAI's MetaTensor: the compiled networks get plain tensors
        trainer.data_loader = [{k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in b.items()}
                               for b in trainer.data_loader]
        trainer.g_network = torch.compile(trainer.g_network)
        if trainer.local_discriminator is not None:
            trainer.local_discriminator = torch.compile(trainer.local_discriminator)


def _timed_row(overrides: dict[str, Any], variant: str, batches: list, warmup: int, lever: str | None = None) -> float:
    import torch

    torch.manual_seed(0)
    trainer = _config_trainer({**overrides, **(LEVERS.get(lever, {}) if lever else {})}, variant, batches)
    if lever:
        _apply_lever(trainer, lever)
    threads = torch.get_num_threads()
    if lever == "1 thread":
        torch.set_num_threads(1)
    try:
        return _time_steps(trainer, warmup)
    finally:
        torch.set_num_threads(threads)


def _step_rows(name: str, overrides: dict[str, Any], variants: list[str], batch: dict, steps: int, warmup: int,
               memory_budget_mb: float | None = None) -> list[dict[str, Any]]:
    """One row per variant: mean step time on ``batch`` (``steps`` timed after ``warmup``) and its ratio to ``unet``.

    ``variants`` must include ``unet`` (the reference); ``memory_budget_mb`` adds each row's peak memory (subprocess).
    """
    import torch

    batches = [batch] * (steps + warmup)
    n = int(batch["source"].shape[0])
    generator = list(_parser(overrides).get_parsed_content("generator_channels"))
    rows = []
    for variant in variants:
        step = _timed_row(overrides, variant, batches, warmup)
        rows.append({"rows": name, "variant": variant, "generator": generator, "patch": list(batch["source"].shape[2:]),
                     "batch": n, "threads": torch.get_num_threads(), "step_s": step, "patches_per_s": n / step,
                     "overrides": overrides})
        if memory_budget_mb is not None:
            rows[-1]["memory"] = _memory_row(overrides, variant, n, memory_budget_mb)
    unet_s = next(r["step_s"] for r in rows if r["variant"] == "unet")
    for r in rows:
        r["ratio_to_unet"] = r["step_s"] / unet_s
    return rows


def _peak_mb() -> float:
    """Peak memory of this process so far: CUDA's peak allocation, else the resident set's high-water mark.

    ``VmHWM`` (Linux) belongs to this program's address space; ``getrusage``'s ``ru_maxrss`` is not used first
    because Linux carries it across ``exec``, so a probe started by a parent holding the cached BraTS-size volumes
    would report the parent's peak.
    """
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_probe(spec: str | dict) -> None:
    """Subprocess entry: peak memory after a few steps at batch B, then 2B; prints one JSON line."""
    args = spec if isinstance(spec, dict) else json.loads(spec)  # fire parses the JSON text itself
    out = {}
    for batch in (args["batch"], 2 * args["batch"]):
        batches = [_synthetic_batch(args["overrides"], batch)] * 3
        _time_steps(_config_trainer(args["overrides"], args["variant"], batches), 0)
        out[str(batch)] = _peak_mb()
    print("MEMORY " + json.dumps(out))


def _memory_row(overrides: dict[str, Any], variant: str, batch: int, budget_mb: float) -> dict[str, float]:
    spec = json.dumps({"overrides": overrides, "variant": variant, "batch": batch})
    proc = subprocess.run([sys.executable, __file__, "--probe", spec], capture_output=True, text=True, cwd=ROOT,
                          timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe of {variant} {overrides} failed:\n{proc.stderr[-3000:]}")
    peaks = json.loads(lines[-1][len("MEMORY "):])
    m1, m2 = peaks[str(batch)], peaks[str(2 * batch)]
    per_patch = max(m2 - m1, 0.0) / batch
    fixed = m1 - per_patch * batch
    largest = int((budget_mb - fixed) // per_patch) if per_patch > 0 else None
    return {"peak_mb": m1, "peak_mb_2x": m2, "mb_per_patch": per_patch, "fixed_mb": fixed, "largest_batch": largest}


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
    proc = subprocess.run([sys.executable, __file__, "--cache_probe", spec], capture_output=True, text=True,
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


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'rows':<9}{'variant':<16}{'generator':<22}{'patch':<12}{'batch':>6}{'thr':>4}{'step s':>9}"
            f"{'x unet':>8}{'patch/s':>9}{'peak MB':>9}{'MB/patch':>9}{'max batch':>10}")
    lines = [head]
    for r in rows:
        m = r.get("memory") or {}
        lines.append(
            f"{r['rows']:<9}{r['variant']:<16}{'-'.join(map(str, r['generator'])):<22}"
            f"{'x'.join(map(str, r['patch'])):<12}{r['batch']:>6}{r['threads']:>4}{r['step_s']:>9.3f}"
            f"{r['ratio_to_unet']:>8.2f}{r['patches_per_s']:>9.1f}"
            f"{m.get('peak_mb', float('nan')):>9.0f}{m.get('mb_per_patch', float('nan')):>9.1f}"
            f"{str(m.get('largest_batch', '-')):>10}")
    return "\n".join(lines)


def main(steps: int = 6, warmup: int = 2, variants: list | tuple | None = None, overrides: dict | None = None,
         dataset_dir: str | None = None, output: str = "benchmark.json", real_size: bool = False,
         widths: list | tuple | str = ("shipped", "usual"), three_d: bool = True, levers: bool | list | tuple = False,
         memory: bool = True, ram_budget_gb: float = 8.0, data_epochs: int = 3, inference_repeats: int = 2,
         data_workers: list | tuple | int = (1,), ttq_psnr: float | None = None, ttq_max_epochs: int = 30,
         ttq_dataset_dir: str | None = None,
         cache_subjects: int | None = None, stages: list | tuple | str | None = None,
         disk_budget_gb: float | None = None, probe: str | dict | None = None,
         cache_probe: str | dict | None = None) -> str | None:
    """Run the measurements, print the tables and write ``output`` (JSON).

    Args:
        steps: timed iterations per row (after ``warmup`` more).
        warmup: iterations left out of each timing.
        variants: variants to time, default all of :func:`custom_components.all_variants` (``unet`` is always
            included: it is the reference).
        overrides: train.json overrides applied to every row (e.g. ``{"gp_interval": 4}``).
        dataset_dir: data set folder (default: the config's phantom, or the BraTS-size phantom with ``real_size``).
        output: JSON file for the results.
        real_size: use a BraTS-size phantom (240 x 240 x 155 voxels of 1 mm, 4 training + 1 validation subjects),
            generated in ``data/phantom_t1t2_brats_size`` unless ``dataset_dir`` is given.
        widths: generator widths to time, from ``shipped`` (the config's) and ``usual`` (32-64-128-256-512).
        three_d: add ``unet``/``dual_attention`` rows with 3D patches (``bundle/configs/3d.json``).
        levers: time each speed lever of the GAN step alone (``dual_attention`` at each width) against the baseline;
            ``True`` for all of :data:`LEVERS` or a list of their names.
        memory: measure peak memory per row in a subprocess each (slow: one interpreter per row).
        ram_budget_gb: memory budget for the largest batch that fits.
        data_epochs: epochs of the real data pipeline for the data-wait share.
        data_workers: loader worker counts to measure the data wait with, besides the config's ``num_workers``.
        inference_repeats: timed repeats of each whole-volume inference.
        ttq_psnr: if given, time ``unet`` and ``dual_attention`` to this validation PSNR (dB) on the phantom.
        ttq_max_epochs: epoch limit of each time-to-quality run.
        ttq_dataset_dir: data of the time-to-quality runs (default: the config's phantom, 96 x 96 x 48).
        cache_subjects: with ``real_size``, the training subjects of the BraTS-size phantom (default 4); the
            resident memory per cached subject is measured on them and projected to 200 and 1251 subjects.
        stages: run only these of :data:`STAGES` (default all).
        disk_budget_gb: ``cache_memory_gb`` of the data-wait stage's disk regime (default 0: all from disk).
        probe, cache_probe: internal (memory subprocesses).
    """
    if probe is not None:
        _memory_probe(probe)
        return None
    if cache_probe is not None:
        _cache_probe(cache_probe)
        return None
    import torch

    from ablation import config_ids

    from custom_components import all_variants
    from custom_components.config.hyperparameters import check_overrides

    chosen_stages = set(STAGES if stages is None else ([stages] if isinstance(stages, str) else stages))
    if chosen_stages - set(STAGES):
        raise ValueError(f"stages must be among {list(STAGES)}, got {sorted(chosen_stages - set(STAGES))}.")
    widths = [widths] if isinstance(widths, str) else list(widths)
    if isinstance(levers, str):
        levers = [levers]
    unknown = [w for w in widths if w not in WIDTHS]
    if unknown:
        raise ValueError(f"widths must be among {sorted(WIDTHS)}, got {unknown!r}.")
    base = check_overrides(dict(overrides or {}), config_ids())  # before any measurement: a typo fails at once
    if real_size:
        n_train = int(cache_subjects or REAL_SIZE_PHANTOM["n_train"])
        base["phantom"] = {**REAL_SIZE_PHANTOM, "n_train": n_train}
        suffix = "" if n_train == REAL_SIZE_PHANTOM["n_train"] else str(n_train)
        base.setdefault("dataset_dir", dataset_dir or str(ROOT / "data" / f"phantom_t1t2_brats_size{suffix}"))
    elif dataset_dir:
        base["dataset_dir"] = dataset_dir
    parser = _parser(base)
    parser.get_parsed_content("prepare_data")  # the config's own step: the phantom, if make_phantom

    results: dict[str, Any] = {"device": str(parser.get_parsed_content("device")), "torch_threads": torch.get_num_threads(),
                               "config_overrides": base, "steps": steps, "warmup": warmup, "rows": []}
    variants = ["unet"] + [v for v in (all_variants() if variants is None else variants) if v != "unet"]
    row_sets: list[tuple[str, dict[str, Any], list[str]]] = [(w, {**base, **WIDTHS[w]}, variants) for w in widths]
    if three_d:
        three = json.loads((ROOT / "bundle" / "configs" / "3d.json").read_text())
        row_sets.append(("3d", {**base, **three}, [v for v in ("unet", "dual_attention") if v in variants]))

    # 0. resident memory per cached training subject, projected to the paper's and BraTS 2021's training sets
    if "cache_memory" in chosen_stages:
        results["cache_memory"] = _cache_memory(base)
        print(f"[benchmark] stage done: {sorted(results)}", file=sys.stderr, flush=True)
    # 1. data wait (real pipeline, default loader settings): plain-L1 and GAN steps, from RAM and from disk
    if "data_wait" in chosen_stages:
        results["patch_cost"] = _patch_cost(base)
        results["data_wait_regimes"] = _data_wait_regimes(base, data_epochs, disk_budget_gb)
        results["data_wait"] = next(r for r in results["data_wait_regimes"]
                                    if r["regime"] == "ram" and r["variant"] == "dual_attention")
        extra = [data_workers] if isinstance(data_workers, int) else list(data_workers)
        results["data_wait_other_workers"] = [_data_wait({**base, "num_workers": int(w)}, data_epochs)
                                              for w in extra if int(w) != results["data_wait"]["num_workers"]]
        Path(output).write_text(json.dumps(results, indent=2, default=str))  # partial results after each stage
        print(f"[benchmark] stage done: {sorted(results)}", file=sys.stderr, flush=True)
    # 2. whole-volume inference
    if "inference" in chosen_stages:
        results["inference"] = _inference(base, inference_repeats)
        Path(output).write_text(json.dumps(results, indent=2, default=str))  # partial results after each stage
        print(f"[benchmark] stage done: {sorted(results)}", file=sys.stderr, flush=True)
    # 3. training step per variant: one real batch of each row set, the same for every variant of the set
    for name, ov, names in (row_sets if "steps" in chosen_stages else []):
        batch = next(iter(_parser(ov).get_parsed_content("train#dataloader")))
        batch = {k: batch[k] for k in ("source", "target")}
        batches = [batch] * (steps + warmup)
        set_rows = _step_rows(name, ov, names, batch, steps, warmup, ram_budget_gb * 1024 if memory else None)
        results["rows"] += set_rows
        print(_fmt_table(set_rows), file=sys.stderr, flush=True)
        Path(output).write_text(json.dumps(results, indent=2, default=str))
        # 4. levers of the GAN step, one at a time, against this run's baseline
        if levers and name in WIDTHS and "dual_attention" in names:
            ref_unet, ref_gan = set_rows[0]["step_s"], set_rows[-1]["step_s"]
            table = results.setdefault("levers", [])
            chosen = list(LEVERS if levers is True else levers)
            unknown = [lv for lv in chosen if lv not in LEVERS]
            if unknown:
                raise ValueError(f"levers must be among {list(LEVERS)}, got {unknown!r}.")
            earlier = {**ov, **EARLIER_LAYOUT}
            if any(lv in DESIGN_LEVERS for lv in chosen):
                ref_earlier = _timed_row(earlier, "dual_attention", batches, warmup)
                table.append({"rows": name, "lever": "earlier layout (none of the design levers)",
                              "baseline": "shipped", "dual_attention_s": ref_earlier, "unet_s": ref_unet,
                              "speedup": ref_gan / ref_earlier, "ratio_to_unet": ref_earlier / ref_unet,
                              "baseline_ratio": ref_gan / ref_unet})
            for lever in chosen:
                design = lever in DESIGN_LEVERS
                try:
                    gan = _timed_row(earlier if design else ov, "dual_attention", batches, warmup, lever)
                    unet = _timed_row(ov, "unet", batches, warmup, lever) if lever in SPEED_ONLY else ref_unet
                    base_gan = ref_earlier if design else ref_gan
                    table.append({"rows": name, "lever": lever, "baseline": "earlier layout" if design else "shipped",
                                  "dual_attention_s": gan, "unet_s": unet, "speedup": base_gan / gan,
                                  "ratio_to_unet": gan / unet, "baseline_ratio": base_gan / ref_unet})
                except Exception as err:  # a lever unsupported here (e.g. no C++ compiler for torch.compile)
                    table.append({"rows": name, "lever": lever, "error": f"{type(err).__name__}: {err}"[:300]})

    Path(output).write_text(json.dumps(results, indent=2, default=str))  # partial results after each stage
    print(f"[benchmark] stage done: {sorted(results)}", file=sys.stderr, flush=True)
    # 5. time to quality (optional: it trains)
    if ttq_psnr is not None and "time_to_quality" in chosen_stages:
        ttq = {k: v for k, v in (overrides or {}).items()}
        if ttq_dataset_dir:
            ttq["dataset_dir"] = ttq_dataset_dir
        results["time_to_quality"] = _time_to_quality(ttq, float(ttq_psnr), ttq_max_epochs)

    lines = [f"device {results['device']}, {results['torch_threads']} threads, {steps} timed steps per row; "
             f"batch = patches per step", _fmt_table(results["rows"])]
    if memory:
        lines.append(f"peak MB: peak resident set size of a subprocess training that row (CUDA: peak allocation); "
                     f"max batch: largest batch within {ram_budget_gb:g} GB by the growth from batch B to 2B")
    for lv in results.get("levers", []):
        if "error" in lv:
            lines.append(f"lever {lv['rows']:<8} {lv['lever']:<24} not measured: {lv['error']}")
        else:
            lines.append(f"lever {lv['rows']:<8} {lv['lever']:<24} dual_attention {lv['dual_attention_s']:.3f}s "
                         f"({lv['speedup']:.2f}x faster than the {lv['baseline']}), unet {lv['unet_s']:.3f}s, "
                         f"GAN/UNet {lv['ratio_to_unet']:.2f}x ({lv['baseline']}: {lv['baseline_ratio']:.2f}x)")
    cm = results.get("cache_memory")
    if cm:
        lines.append(f"training cache: {cm['subjects']} subjects ({cm['in_ram']} in RAM), resident memory "
                     f"+{cm['mb_per_subject']:.1f} MB per subject in RAM; projected "
                     + ", ".join(f"{k} subjects {v:.1f} GB" for k, v in cm["projected_gb"].items()))
    if "patch_cost" in results:
        pc = results["patch_cost"]
        lines.append(f"patch crop/squeeze/flip per batch: fused {1000 * pc['fused_per_batch_s']:.2f} ms, the chain it "
                     f"replaced {1000 * pc['chain_per_batch_s']:.2f} ms ({pc['speedup']:.1f}x)")
    for dw in results.get("data_wait_regimes", []) + results.get("data_wait_other_workers", []):
        lines.append(f"data wait share of step time ({dw['variant']}, {dw.get('regime', 'ram')}: {dw['in_ram']} of "
                     f"{dw['subjects']} subjects in RAM, {dw['loader']}, num_workers={dw['num_workers']}, "
                     f"{dw['iterations']} iterations): {100 * dw['data_wait_share']:.1f}% "
                     f"({1000 * dw['data_per_batch_s']:.1f} ms per batch, step {1000 * dw['step_s']:.0f} ms)")
    inf = results.get("inference", {})
    if "overhead_ratio" in inf:
        lines.append(f"whole-volume inference {inf['volume_shape']} ({inf['inferer']}, {inf['sw_batch_size']} slices per "
                     f"call): {inf['inferer_s']:.2f}s vs bare forward {inf['bare_forward_s']:.2f}s = "
                     f"{inf['overhead_ratio']:.2f}x; overlapping windows {inf['window_inferer_s']:.2f}s; "
                     f"confidence map +{100 * inf['confidence_ratio']:.0f}%")
        for name, c in inf.get("confidence_layouts", {}).items():
            lines.append(f"confidence map with the {name} D2: +{100 * c['confidence_ratio']:.0f}%")
    elif inf:
        lines.append(f"whole-volume inference {inf['volume_shape']}: {inf['inferer_s']:.2f}s")
    if "time_to_quality" in results:
        t = results["time_to_quality"]
        for v in ("unet", "dual_attention"):
            r = t[v]
            lines.append(f"time to {t['target_psnr']:g} dB validation PSNR, {v}: "
                         + (f"{r['seconds']:.0f}s (epoch {r['epoch']})" if r["reached"]
                            else f"not reached in {t['max_epochs']} epochs ({r['seconds_run']:.0f}s, best "
                                 f"{r['best_psnr']:.2f} dB)"))
    print("\n".join(lines))
    Path(output).write_text(json.dumps(results, indent=2, default=str))
    return str(output)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import fire

    fire.Fire(main)
