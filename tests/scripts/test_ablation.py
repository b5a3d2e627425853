from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import ablation  # noqa: E402


def _write(path: Path, values: dict[str, float]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject"] + list(ablation.TABLE_METRICS))
        for sub, v in values.items():
            w.writerow([sub] + [v] * len(ablation.TABLE_METRICS))


def test_aggregate_statistics_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    subjects = [f"s{i}" for i in range(8)]
    ref = {0: dict(zip(subjects, rng.random(8))), 1: dict(zip(subjects, rng.random(8)))}
    other = {s: {k: v + 0.5 for k, v in ref[s].items()} for s in ref}
    for seed in (0, 1):
        _write(tmp_path / "ref" / f"seed_{seed}" / "eval" / "metrics.csv", ref[seed])
        _write(tmp_path / "other" / f"seed_{seed}" / "eval" / "metrics.csv", other[seed])
    md, rows = ablation.aggregate(tmp_path, ["other", "ref"], [0, 1], "ref")
    avg_ref = np.array([(ref[0][s] + ref[1][s]) / 2 for s in subjects])
    row = rows[0]
    assert row["arm"] == "other" and row["n_subjects"] == 8 and row["n_seeds"] == 2
    assert row["psnr_volume_mean"] == pytest.approx(avg_ref.mean() + 0.5)
    assert row["psnr_volume_std_subjects"] == pytest.approx(avg_ref.std(ddof=1))
    seed_means = [np.mean(list(other[s].values())) for s in (0, 1)]
    assert row["psnr_volume_std_seeds"] == pytest.approx(np.std(seed_means, ddof=1))
    assert row["psnr_volume_diff_vs_ref"] == pytest.approx(0.5)
    assert row["psnr_volume_p_vs_ref"] == pytest.approx(wilcoxon(avg_ref + 0.5, avg_ref).pvalue)
    assert "psnr_volume_p_vs_ref" not in rows[1]
    assert "| other |" in md and "| ref |" in md


@pytest.mark.slow
def test_ablation_cli_end_to_end_tiny(tmp_path):
    cmd = [sys.executable, "scripts/ablation.py", "--output_dir", str(tmp_path), "--epochs", "1",
           "--phantom", "{'task':'t1t2','n_train':2,'n_val':1,'n_test':3,'shape':[48,48,32],'seed':0}",
           "--overrides", "{'patch_size':[32,32],'generator_channels':[4,8,16,16],'local_channels':[4,4,8,8],"
           "'batch_size':1,'samples_per_volume':2,'val_interval':1}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "ablation.md").read_text()
    for v in ablation.VARIANTS:
        assert f"| {v} |" in md
    with open(tmp_path / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == list(ablation.VARIANTS)
    assert all(r["n_subjects"] == "3" for r in rows)
    assert all(r["psnr_tumour_p_vs_ref"] != "" for r in rows if r["arm"] != "dual_attention")
    # finished runs are reused
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 5
