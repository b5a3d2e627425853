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
import sys
from pathlib import Path
from typing import Any

from benchmark_data import (_cache_memory, _cache_probe, _data_wait, _data_wait_regimes, _inference, _patch_cost,
                            _time_to_quality)
from benchmark_steps import (DESIGN_LEVERS, EARLIER_LAYOUT, LEVERS, ROOT, SPEED_ONLY, WIDTHS, _memory_probe, _parser,
                             _step_rows, _timed_row)

#: the BraTS-size phantom of ``--real_size`` (240 x 240 x 155 voxels of 1 mm; a few subjects)
REAL_SIZE_PHANTOM: dict[str, Any] = {"task": "t1t2", "n_train": 4, "n_val": 1, "n_test": 0, "seed": 0,
                                     "shape": [240, 240, 155], "spacing": [1.0, 1.0, 1.0]}
#: the measurements of :func:`main`, in order
STAGES = ("cache_memory", "data_wait", "inference", "steps", "time_to_quality")
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
