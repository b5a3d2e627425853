from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from custom_components.phantom import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
TINY = ("{'patch_size':[32,32],'generator_channels':[8,16,32,64],'local_channels':[8,8,16,16],'batch_size':1,"
        "'samples_per_volume':2,'make_phantom':False,'adversarial_warmup':0}")


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
         "--overrides", TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(r["rows"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {("shipped", "unet"), ("shipped", "dual_attention")}
    assert rows["shipped", "unet"]["ratio_to_unet"] == pytest.approx(1.0)
    assert rows["shipped", "dual_attention"]["generator"] == [8, 16, 32, 64]
    assert rows["shipped", "unet"]["patch"] == [32, 32] and rows["shipped", "unet"]["batch"] == 2
    for r in rows.values():
        assert r["step_s"] > 0 and r["threads"] >= 1
        m = r["memory"]
        assert m["peak_mb_2x"] >= m["peak_mb"] > 0 and m["mb_per_patch"] >= 0
    assert 0 <= res["data_wait"]["data_wait_share"] < 1
    inf = res["inference"]
    assert inf["inferer"] == "WholeSliceInferer" and inf["volume_shape"] == [48, 48, 32]
    assert all(inf[k] > 0 for k in ("overhead_ratio", "window_inferer_s", "confidence_ratio"))
    ttq = res["time_to_quality"]
    assert ttq["target_psnr"] == 3 and {"unet", "dual_attention"} <= set(ttq)
    assert all(ttq[v]["reached"] or math.isfinite(ttq[v]["best_psnr"]) for v in ("unet", "dual_attention"))
    assert "x unet" in proc.stdout and "confidence map" in proc.stdout and "time to 3 dB" in proc.stdout


def test_memory_row_arithmetic(monkeypatch):
    """Memory per patch is the growth from batch B to 2B; the largest batch fills the budget."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Done:
        returncode, stderr = 0, ""
        stdout = 'noise\nMEMORY {"4": 1000.0, "8": 1400.0}\n'

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Done())
    m = bench._memory_row({}, "unet", 4, budget_mb=2000.0)
    assert m["mb_per_patch"] == pytest.approx(100.0) and m["fixed_mb"] == pytest.approx(600.0)
    assert m["largest_batch"] == 14  # 600 + 14 * 100 <= 2000 < 600 + 15 * 100
