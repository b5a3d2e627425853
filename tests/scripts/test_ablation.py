from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from custom_components import all_variants

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import ablation  # noqa: E402
import ablation_tables  # noqa: E402


def _write(path: Path, values: dict[str, float]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject"] + list(ablation_tables.TABLE_METRICS))
        for sub, v in values.items():
            w.writerow([sub] + [v] * len(ablation_tables.TABLE_METRICS))


def test_aggregate_statistics_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    subjects = [f"s{i}" for i in range(8)]
    ref = {0: dict(zip(subjects, rng.random(8))), 1: dict(zip(subjects, rng.random(8)))}
    other = {s: {k: v + 0.5 for k, v in ref[s].items()} for s in ref}
    for seed in (0, 1):
        _write(tmp_path / "ref" / f"seed_{seed}" / "eval" / "metrics.csv", ref[seed])
        _write(tmp_path / "other" / f"seed_{seed}" / "eval" / "metrics.csv", other[seed])
    md, rows = ablation_tables.aggregate(tmp_path, ["other", "ref"], [0, 1], "ref")
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
def test_the_default_arms_are_every_variant():
    assert ablation.default_arms() == {v: {"variant": v} for v in all_variants()}


ARMS = ["unet", "dual_attention", "error_weighted"]  # three arms keep the end-to-end test short (each is 3 bundle runs)


def test_ablation_cli_end_to_end_tiny(tmp_path):
    cmd = [sys.executable, "scripts/ablation.py", "--output_dir", str(tmp_path), "--epochs", "1",
           "--arms", "{" + ",".join(f"'{a}':{{'variant':'{a}'}}" for a in ARMS) + "}",
           "--phantom", "{'task':'t1t2','n_train':2,'n_val':1,'n_test':3,'shape':[48,48,32],'seed':0}",
           "--overrides", "{'patch_size':[32,32],'generator_channels':[4,8,16,16],'local_channels':[4,4,8,8],"
           "'batch_size':1,'samples_per_volume':2,'val_interval':1,'adversarial_warmup':0,'attention_warmup':0}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "ablation.md").read_text()
    for v in ARMS:
        assert f"| {v} |" in md
    with open(tmp_path / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    # every arm, evaluated with the selected and with the final weights
    assert [r["arm"] for r in rows if r["weights"] == "selected"] == ARMS
    assert [r["arm"] for r in rows if r["weights"] == "final"] == ARMS
    assert "## Final weights (`model_final.pt`" in md
    for v in ARMS:
        assert (tmp_path / v / "seed_0" / "eval_final" / "metrics.csv").is_file()
    assert all(r["n_subjects"] == "3" for r in rows)
    assert all(r["psnr_tumour_p_vs_ref"] != "" for r in rows if r["arm"] != "dual_attention")
    # finished runs are reused
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == len(ARMS)


def _runs(values_by_seed):
    return {s: {sub: {"psnr_tumour": v} for sub, v in subs.items()} for s, subs in values_by_seed.items()}


def test_run_level_statistics_use_seeds_as_the_unit():
    from scipy import stats

    base = _runs({0: {"a": 10.0, "b": 12.0, "c": 11.0}, 1: {"a": 9.0, "b": 13.0, "c": 10.0},
                  2: {"a": 10.5, "b": 11.0, "c": 12.0}})
    shifts = {0: 0.5, 1: 1.0, 2: -0.2}
    arm = {s: {k: {"psnr_tumour": v["psnr_tumour"] + shifts[s]} for k, v in subs.items()} for s, subs in base.items()}
    st = ablation_tables.paired_run_statistics(arm, base, "psnr_tumour", n_boot=2000)
    assert st["n_seeds"] == 3
    assert st["seed_diffs"] == pytest.approx([0.5, 1.0, -0.2])
    d = np.array([0.5, 1.0, -0.2])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert st["mean"] == pytest.approx(d.mean())
    assert st["t_ci"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert st["t_p"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    # constant shift within a seed: the bootstrap only sees seed-to-seed variation, within its range
    lo, hi = st["boot_ci"]
    assert -0.2 - 1e-9 <= lo < d.mean() < hi <= 1.0 + 1e-9
    # a subject-level test would call 9 pairs significant; the run-level interval includes 0
    assert st["t_ci"][0] < 0 < st["t_ci"][1]


def test_run_level_statistics_skip_missing_seeds_and_subjects():
    base = _runs({0: {"a": 1.0, "b": 2.0}, 1: {"a": 1.0}})
    arm = _runs({0: {"a": 2.0, "c": 5.0}, 2: {"a": 9.0}})
    st = ablation_tables.paired_run_statistics(arm, base, "psnr_tumour", n_boot=100)
    assert st["n_seeds"] == 1 and st["seed_diffs"] == [1.0]
    assert np.isnan(st["t_p"])


def test_curves_are_read_from_the_training_log(tmp_path):
    log = tmp_path / "unet" / "seed_0" / "log.txt"
    log.parent.mkdir(parents=True)
    log.write_text("2026 - INFO - Epoch[5] Metrics -- val_mae: 0.1 val_psnr: 12.5 val_psnr_tumour: 3.25e-01\n"
                   "noise line\n2026 - INFO - Epoch[10] Metrics -- val_mae: 0.05 val_psnr: 15.0 val_psnr_tumour: nan\n"
                   "[ablation] evaluating\n2026 - INFO - Epoch[1] Metrics -- val_mae: 0.2 val_psnr: 11.0\n")
    curve = ablation_tables.read_curve(log)
    assert curve[5] == {"val_mae": 0.1, "val_psnr": 12.5, "val_psnr_tumour": 0.325}
    assert curve[10]["val_psnr"] == 15.0 and np.isnan(curve[10]["val_psnr_tumour"])
    assert sorted(curve) == [5, 10]  # the appended test-set evaluation (Epoch[1]) is not a validation point
    rows = ablation_tables.curves_table(tmp_path, ["unet"], [0, 1])
    assert [(r["epoch"], r["val_psnr"], r["n_seeds"]) for r in rows] == [(5, 12.5, 1), (10, 15.0, 1)]


def test_a_mistyped_or_bad_arm_option_is_refused_before_any_run(tmp_path, monkeypatch):
    """Issue 20: the ablation checks every arm and common override with TrainingOptions' rules and the configs' ids
    before training anything (a typo used to surface as a failed subprocess, after the earlier arms had run)."""
    ran = []
    monkeypatch.setattr(ablation, "run_arm", lambda *a, **k: ran.append(a))
    with pytest.raises(ValueError, match=r"arm 'b': 'lambda_adv_locl' is not an option of the configs: did you "
                                         r"mean 'lambda_adv_local'\?"):
        ablation.main(output_dir=str(tmp_path), arms={"a": {"variant": "unet"}, "b": {"lambda_adv_locl": 0.1}},
                      reference="a")
    with pytest.raises(ValueError, match=r"arm 'a': beta must be a number >= 0, got -1"):
        ablation.main(output_dir=str(tmp_path), arms={"a": {"variant": "unet", "beta": -1}}, reference="a")
    with pytest.raises(ValueError, match=r"override variant must be one of"):
        ablation.main(output_dir=str(tmp_path), arms={"a": {}}, reference="a", overrides={"variant": "unett"})
    assert ran == []
    # a per-seed template and the configs' other ids pass
    ablation.check_arms({"a": {"pretrained_generator": "pre/seed_{seed}/model.pt", "num_workers": 0}}, {"epochs": 2})
