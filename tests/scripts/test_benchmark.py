from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from custom_components.phantom import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_reports_every_measure(tmp_path):
    ensure_phantom(tmp_path / "ph", task="t1t2", n_train=2, n_val=1, n_test=1, shape=(48, 48, 32), seed=0)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--steps", "2", "--warmup", "1", "--dataset_dir", str(tmp_path / "ph"),
         "--output", str(out), "--data_epochs", "1", "--overrides",
         "{'patch_size':[32,32],'generator_channels':[8,16,32,64],'local_channels':[8,8,16,16],'batch_size':1,"
         "'samples_per_volume':2,'make_phantom':False}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"unet", "global", "local", "dual", "dual_attention"}
    assert res["variants"]["unet"]["ratio_to_unet"] == pytest.approx(1.0)
    assert all(v["step_s"] > 0 and v["slices_per_s"] > 0 and v["peak_mb"] > 0 for v in res["variants"].values())
    assert 0 <= res["data_wait_share"] < 1
    assert res["inference"]["overhead_ratio"] > 0 and res["inference"]["volume_shape"] == [48, 48, 32]
    assert "x unet" in proc.stdout
