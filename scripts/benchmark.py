"""Side-by-side speed measurements of the training bundle on this machine (ratios, not absolute targets).

Measured in one process, on the same batch and the same generator:

* training-step time of each variant relative to ``unet`` (plain L1 on the same generator), and throughput;
* the share of step time spent waiting for data, with the bundle's real cached data pipeline (ignite
  ``BasicTimeProfiler``: dataflow vs processing);
* whole-volume inference time (the bundle's ``SliceInferer``/``SlidingWindowInferer``) relative to the bare
  network forward over the same slices/patches in batches of the same size;
* peak memory (CUDA: peak allocated; CPU: peak resident set size of the process so far).

Example::

    python scripts/benchmark.py --steps 10 --output benchmark.json
    python scripts/benchmark.py --steps 10 --overrides "{'gp_interval': 4}"
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("unet", "global", "local", "dual", "dual_attention")


def _peak_mb(device) -> float:
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _parser(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT / "bundle"), **overrides})
    return parser


def _time_steps(trainer, steps: int, warmup: int) -> float:
    """Mean seconds per iteration of ``trainer`` over ``steps`` iterations after ``warmup`` ones."""
    import torch
    from ignite.engine import Events

    stamps = []
    handle = trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    trainer.run()
    handle.remove()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = [start] + stamps
    per_step = [b - a for a, b in zip(times[:-1], times[1:])][warmup:]
    return sum(per_step) / len(per_step)


def main(steps: int = 10, warmup: int = 2, variants: list | tuple = VARIANTS, overrides: dict | None = None,
         dataset_dir: str | None = None, output: str = "benchmark.json", data_epochs: int = 2) -> str:
    """Run the measurements, print a table and write ``output`` (JSON).

    Args:
        steps: timed iterations per variant.
        warmup: iterations excluded from the timing.
        variants: variants to time (``unet`` is always included, as the reference).
        overrides: train.json overrides (e.g. ``{"gp_interval": 4, "patch_size": [96, 96]}``).
        dataset_dir: phantom folder (default: the bundle's ``data/phantom_t1t2``, generated if absent).
        output: JSON file for the results.
        data_epochs: epochs of the real data pipeline used for the data-wait measurement.
    """
    import torch
    from ignite.handlers import BasicTimeProfiler

    import custom_components as cc
    from custom_components.data import as_flag
    from custom_components.phantom import ensure_phantom

    overrides = dict(overrides or {})
    if dataset_dir:
        overrides["dataset_dir"] = dataset_dir
    parser = _parser(overrides)
    if as_flag(parser.get_parsed_content("make_phantom"), "make_phantom"):
        ensure_phantom(parser.get_parsed_content("dataset_dir"), **parser.get_parsed_content("phantom"))
    device = parser.get_parsed_content("device")
    prepare = parser.get_parsed_content("prepare_batch")
    loader = parser.get_parsed_content("train#dataloader")
    batch = next(iter(loader))
    source, target = prepare(batch, device)
    fixed = [{"image": source, "label": target}] * (steps + warmup)
    n_slices = int(source.shape[0])
    results: dict = {"device": str(device), "torch_threads": torch.get_num_threads(), "batch_shape": list(source.shape),
                     "config_overrides": overrides, "steps": steps, "variants": {}}

    # 1. training-step time per variant, same batch, same generator architecture
    variants = ["unet"] + [v for v in variants if v != "unet"]
    for variant in variants:
        p = _parser({**overrides, "variant": variant})
        torch.manual_seed(0)
        g = p.get_parsed_content("network")
        d1, d2 = p.get_parsed_content("global_critic"), p.get_parsed_content("local_discriminator")
        opt_d = p.get_parsed_content("optimizer_d")
        trainer = cc.DualAttentionTrainer(
            device, 1, fixed, g, p.get_parsed_content("optimizer_g"), variant, d1, opt_d, d2, opt_d,
            beta=p["beta"], lambda_gp=p["lambda_gp"], n_critic=p["n_critic"], gp_interval=p["gp_interval"],
            precision=p["precision"],
        )
        step = _time_steps(trainer, steps, warmup)
        results["variants"][variant] = {"step_s": step, "slices_per_s": n_slices / step, "peak_mb": _peak_mb(device)}
    ref = results["variants"]["unet"]["step_s"]
    for v in results["variants"].values():
        v["ratio_to_unet"] = v["step_s"] / ref

    # 2. data wait with the real cached pipeline, full method
    p = _parser({**overrides, "variant": "dual_attention", "epochs": data_epochs})
    g = p.get_parsed_content("network")
    opt_d = p.get_parsed_content("optimizer_d")
    trainer = cc.DualAttentionTrainer(device, data_epochs, p.get_parsed_content("train#dataloader"), g,
                                      p.get_parsed_content("optimizer_g"), "dual_attention",
                                      p.get_parsed_content("global_critic"), opt_d,
                                      p.get_parsed_content("local_discriminator"), opt_d,
                                      prepare_batch=p.get_parsed_content("prepare_batch"))
    profiler = BasicTimeProfiler()
    profiler.attach(trainer)
    trainer.run()
    prof = profiler.get_results()
    data_s, proc_s = float(prof["dataflow_stats"]["total"]), float(prof["processing_stats"]["total"])
    results["data_wait_share"] = data_s / (data_s + proc_s)

    # 3. whole-volume inference vs bare forward over the same slices
    p = _parser(overrides)
    g = p.get_parsed_content("network").eval()
    inferer = p.get_parsed_content("validate#inferer")
    volume = p.get_parsed_content("validate#dataset")[0]["source"][None].to(device)
    sw = int(p["val_sw_batch_size"])
    with torch.no_grad():
        inferer(volume, g)  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            inferer(volume, g)
        t_infer = (time.perf_counter() - t0) / 3
        if int(p["spatial_dims"]) == 2:
            ps = list(p["patch_size"])
            slices = volume[0].permute(3, 0, 1, 2)  # (D, 1, H, W)
            pad = [0, max(0, ps[1] - slices.shape[-1]), 0, max(0, ps[0] - slices.shape[-2])]
            slices = torch.nn.functional.pad(slices, pad)[..., : ps[0], : ps[1]] \
                if slices.shape[-2:] != tuple(ps) else slices
            t0 = time.perf_counter()
            for _ in range(3):
                for i in range(0, slices.shape[0], sw):
                    g(slices[i:i + sw])
            t_bare = (time.perf_counter() - t0) / 3
            results["inference"] = {"volume_shape": list(volume.shape[2:]), "inferer_s": t_infer, "bare_forward_s": t_bare,
                                    "overhead_ratio": t_infer / t_bare,
                                    "slices_per_s": slices.shape[0] / t_infer}
        else:
            results["inference"] = {"volume_shape": list(volume.shape[2:]), "inferer_s": t_infer}

    lines = [f"{'variant':<16}{'step (s)':>10}{'x unet':>8}{'slices/s':>10}{'peak MB':>9}"]
    for name, v in results["variants"].items():
        lines.append(f"{name:<16}{v['step_s']:>10.3f}{v['ratio_to_unet']:>8.2f}{v['slices_per_s']:>10.1f}{v['peak_mb']:>9.0f}")
    lines.append(f"data wait share of step time (dual_attention, real pipeline): {100 * results['data_wait_share']:.1f}%")
    inf = results["inference"]
    if "overhead_ratio" in inf:
        lines.append(f"whole-volume inference {inf['inferer_s']:.3f}s vs bare forward {inf['bare_forward_s']:.3f}s: "
                     f"{inf['overhead_ratio']:.2f}x ({inf['slices_per_s']:.0f} slices/s)")
    print("\n".join(lines))
    Path(output).write_text(json.dumps(results, indent=2))
    return str(output)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import fire

    fire.Fire(main)
