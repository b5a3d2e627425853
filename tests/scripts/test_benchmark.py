from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from custom_components.apps.phantom_dataset import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
TINY_OVERRIDES = {"patch_size": [32, 32], "generator_channels": [8, 16, 32, 64], "local_channels": [8, 8, 16, 16],
                  "batch_size": 1, "samples_per_volume": 2, "make_phantom": False, "adversarial_warmup": 0,
                  "attention_warmup": 0}
TINY = repr(TINY_OVERRIDES)


@pytest.mark.slow
def test_benchmark_reports_every_measure(tmp_path):
    """The benchmark runs end to end on tiny settings and its JSON has every measure, correctly shaped (no timing
    is asserted: the figures depend on the machine)."""
    ensure_phantom(tmp_path / "ph", task="t1t2", n_train=2, n_val=1, n_test=1, shape=(48, 48, 32), seed=0)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--steps", "2", "--warmup", "1", "--dataset_dir", str(tmp_path / "ph"),
         "--output", str(out), "--data_epochs", "1", "--inference_repeats", "1", "--variants", "unet,dual_attention",
         "--widths", "shipped", "--nothree_d", "--data_workers", "0", "--ttq_psnr", "3", "--ttq_max_epochs", "1", "--ttq_dataset_dir", str(tmp_path / "ph"),
         "--levers", "['gp_interval=4','1 thread']", "--overrides", TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(r["rows"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {("shipped", "unet"), ("shipped", "dual_attention")}
    for r in rows.values():
        assert r["ratio_to_unet"] == pytest.approx(r["step_s"] / rows["shipped", "unet"]["step_s"])
    assert rows["shipped", "dual_attention"]["generator"] == [8, 16, 32, 64]
    assert rows["shipped", "unet"]["patch"] == [32, 32] and rows["shipped", "unet"]["batch"] == 2
    for r in rows.values():
        assert r["step_s"] > 0 and r["threads"] >= 1
        m = r["memory"]
        assert m["peak_mb_2x"] >= m["peak_mb"] > 0 and m["mb_per_patch"] >= 0
    dw = res["data_wait"]
    assert 0 <= dw["data_wait_share"] < 1 and dw["loader"] == "DataLoader"  # the shipped training loader
    # 2 training volumes, batch 1: 2 batches per epoch, one epoch
    assert dw["batches_per_epoch"] == 2 and dw["iterations"] == 2
    assert dw["data_per_batch_s"] == pytest.approx(dw["data_s"] / 2) and dw["step_s"] == pytest.approx(dw["processing_s"] / 2)
    regimes = {(r["regime"], r["variant"]): r for r in res["data_wait_regimes"]}
    assert set(regimes) == {(g, v) for g in ("ram", "disk") for v in ("unet", "dual_attention")}
    assert all(r["in_ram"] == 2 for k, r in regimes.items() if k[0] == "ram")
    assert all(r["in_ram"] == 0 and r["subjects"] == 2 for k, r in regimes.items() if k[0] == "disk")
    assert res["patch_cost"]["speedup"] == pytest.approx(
        res["patch_cost"]["chain_per_batch_s"] / res["patch_cost"]["fused_per_batch_s"])
    inf = res["inference"]
    assert inf["inferer"] == "WholeSliceInferer" and inf["volume_shape"] == [48, 48, 32]
    assert all(inf[k] > 0 for k in ("overhead_ratio", "window_inferer_s", "confidence_ratio"))
    # the tiny D2 (8-8-16-16) is neither reported layout, so both are timed through their own inferer
    assert set(inf["confidence_layouts"]) == set(_bench("benchmark_data").D2_LAYOUTS)
    assert all(c["confidence_ratio"] > 0 for c in inf["confidence_layouts"].values())
    # design levers are timed on the earlier layout, speed-only ones on the shipped configuration
    levers = {lv["lever"]: lv for lv in res["levers"]}
    assert set(levers) == {"earlier layout (none of the design levers)", "gp_interval=4", "1 thread"}
    assert levers["gp_interval=4"]["baseline"] == "earlier layout" and levers["1 thread"]["baseline"] == "shipped"
    earlier = levers["earlier layout (none of the design levers)"]["dual_attention_s"]
    assert levers["gp_interval=4"]["speedup"] == pytest.approx(earlier / levers["gp_interval=4"]["dual_attention_s"])
    assert levers["1 thread"]["speedup"] == pytest.approx(
        rows["shipped", "dual_attention"]["step_s"] / levers["1 thread"]["dual_attention_s"])
    ttq = res["time_to_quality"]
    assert ttq["target_psnr"] == 3 and {"unet", "dual_attention"} <= set(ttq)
    assert all(ttq[v]["reached"] or math.isfinite(ttq[v]["best_psnr"]) for v in ("unet", "dual_attention"))
    assert "x unet" in proc.stdout and "confidence map" in proc.stdout and "time to 3 dB" in proc.stdout


def _bench(name: str = "benchmark"):
    """The benchmark's script module ``name`` (``benchmark``, ``benchmark_steps``, ``benchmark_data``)."""
    import importlib

    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module(name)


def test_time_steps_averages_the_steps_after_the_warmup(monkeypatch):
    """Step times are the gaps between iteration ends (the first from the start), the first ``warmup`` left out."""
    from types import SimpleNamespace

    from ignite.engine import Engine

    bench = _bench("benchmark_steps")
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0])  # start, then the end of each of 4 iterations: steps of 1, 2, 3, 4 s
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    engine = Engine(lambda e, b: None)
    engine.data_loader = [0, 1, 2, 3]
    engine.run = lambda: Engine.run(engine, engine.data_loader, max_epochs=1)
    assert bench._time_steps(engine, warmup=1) == pytest.approx(3.0)  # (2 + 3 + 4) / 3


def test_step_rows_report_their_config_and_ratios_of_their_own_step_times(monkeypatch):
    """Each row carries the generator, patch and batch it was timed with, and its ratio is its step time over the
    unet row's, whatever the order of the variants."""
    bench = _bench("benchmark_steps")
    times = {"global": 0.3, "unet": 0.2, "dual_attention": 0.5}
    monkeypatch.setattr(bench, "_timed_row", lambda ov, variant, batches, warmup: times[variant])
    overrides = {**TINY_OVERRIDES, **bench.WIDTHS["usual"]}
    batch = bench._synthetic_batch(overrides, 3)
    rows = bench._step_rows("usual", overrides, list(times), batch, steps=2, warmup=1)
    assert [r["variant"] for r in rows] == list(times)
    for r in rows:
        assert r["rows"] == "usual" and r["generator"] == [32, 64, 128, 256, 512]
        assert r["patch"] == [32, 32] and r["batch"] == 3
        assert r["step_s"] == times[r["variant"]]
        assert r["ratio_to_unet"] == pytest.approx(times[r["variant"]] / times["unet"])
        assert r["patches_per_s"] == pytest.approx(3 / times[r["variant"]])


#: sub-steps of one timed iteration of each variant: the benchmark times the variant's adversarial step, not the
#: shipped warm-up (which trains G alone) and not another variant
SUB_STEPS = {
    "unet": ["generator_step"],
    "global": ["critic_step", "generator_step"],
    "local": ["local_step", "generator_step"],
    "dual": ["critic_step", "local_step", "generator_step"],
    "dual_attention": ["critic_step", "local_step", "generator_step"],
}


@pytest.mark.parametrize("variant", list(SUB_STEPS))
def test_timed_trainer_runs_the_sub_steps_of_its_variant(variant):
    bench = _bench("benchmark_steps")
    overrides = {k: v for k, v in TINY_OVERRIDES.items() if k not in ("adversarial_warmup", "attention_warmup")}
    batch = bench._synthetic_batch(overrides, 1)
    trainer = bench._config_trainer(overrides, variant, [batch])
    calls = []
    for step in ("critic_step", "local_step", "generator_step"):
        method = getattr(trainer, step)
        setattr(trainer, step, lambda *a, _m=method, _s=step, **k: (calls.append(_s), _m(*a, **k))[1])
    trainer.run()
    assert calls == SUB_STEPS[variant]
    assert trainer.variant == variant


def test_memory_row_arithmetic(monkeypatch):
    """Memory per patch is the growth from batch B to 2B; the largest batch fills the budget."""
    bench = _bench("benchmark_steps")

    class Done:
        returncode, stderr = 0, ""
        stdout = 'noise\nMEMORY {"4": 1000.0, "8": 1400.0}\n'

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Done())
    m = bench._memory_row({}, "unet", 4, budget_mb=2000.0)
    assert m["mb_per_patch"] == pytest.approx(100.0) and m["fixed_mb"] == pytest.approx(600.0)
    assert m["largest_batch"] == 14  # 600 + 14 * 100 <= 2000 < 600 + 15 * 100


def test_memory_probe_reports_its_own_peak_not_its_parents():
    """Linux keeps getrusage's ru_maxrss across exec: a probe started from a parent holding 2 GB (the cached
    BraTS-size volumes in a real run) must still report its own, smaller, peak."""
    import numpy as np

    held = np.ones(2 * 2**30 // 8)  # 2 GiB, touched
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); print(b._peak_mb())")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "benchmark_steps.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child_mb = float(proc.stdout.split()[-1])
    assert held.sum() > 0 and 0 < child_mb < 1500, child_mb


def test_cache_memory_is_the_resident_growth_per_subject_in_ram_projected(monkeypatch):
    """MB per cached subject: the resident set's growth while the training set is built, over the subjects in RAM
    (not those on disk); the projection multiplies it by the paper's and BraTS 2021's training subjects."""
    bench = _bench("benchmark_data")

    class Done:
        returncode, stderr = 0, ""
        stdout = ('CACHE {"subjects": 16, "in_ram": 10, "rss_before_mb": 500.0, "rss_after_mb": 1000.0, '
                  '"build_s": 1.0, "dataset": "BudgetCacheDataset"}\n')

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Done())
    m = bench._cache_memory({})
    assert m["mb_per_subject"] == pytest.approx(50.0)
    assert m["projected_gb"] == {"200": pytest.approx(50 * 200 / 1024), "1251": pytest.approx(50 * 1251 / 1024)}


def test_cache_probe_measures_the_built_training_set(tmp_path, capsys):
    """The probe builds the config's train#dataset (all in RAM by default) and reports its resident growth."""
    ensure_phantom(tmp_path / "ph", task="t1t2", n_train=2, n_val=1, n_test=0, shape=(48, 48, 32), seed=0)
    bench = _bench("benchmark_data")
    bench._cache_probe({"overrides": {**TINY_OVERRIDES, "dataset_dir": str(tmp_path / "ph"),
                                      "cache_dir": str(tmp_path / "cache")}})
    out = json.loads(capsys.readouterr().out.split("CACHE ", 1)[1])
    assert out["subjects"] == 2 and out["in_ram"] == 2 and out["dataset"] == "BudgetCacheDataset"
    assert out["rss_after_mb"] >= out["rss_before_mb"] > 0


def test_a_mistyped_override_is_refused_before_any_measurement(tmp_path):
    """Issue 20: the benchmark checks its overrides (TrainingOptions' rules, the configs' ids) before measuring."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--overrides", "{'gp_intervl': 4}",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "'gp_intervl' is not an option of the configs: did you mean 'gp_interval'?" in proc.stderr
    assert not out.exists()
