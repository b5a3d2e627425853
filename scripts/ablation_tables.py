"""The tables of the ablation (:mod:`ablation`): per-arm metrics over subjects and seeds, run-level paired
comparisons (t-interval, hierarchical bootstrap, Wilcoxon), validation curves and training times.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TABLE_METRICS = ("psnr_volume", "ssim_volume", "mae_volume", "psnr_foreground", "psnr_tumour", "ssim_tumour",
                 "mae_tumour", "qa_auroc_worst", "qa_spearman", "qa_ause", "qa_sparsification_gain",
                 "qa_confidence_tumour", "qa_confidence_outside")

RUN_LEVEL_METRICS = ("psnr_volume", "psnr_foreground", "psnr_tumour", "ssim_volume", "mae_tumour")


def _read_metrics(path: Path) -> dict[str, dict[str, float]]:
    import csv

    with open(path, newline="") as f:
        return {r["subject"]: {k: float(v) for k, v in r.items() if k != "subject"} for r in csv.DictReader(f)}


def aggregate(output_dir: Path, arms: list[str], seeds: list[int], reference: str,
              eval_name: str = "eval") -> tuple[str, list[dict]]:
    """Build the comparison table from the runs' ``<eval_name>/metrics.csv`` files; return (markdown, csv rows)."""
    import numpy as np
    from scipy.stats import wilcoxon

    runs = {(arm, seed): _read_metrics(f) for arm in arms for seed in seeds
            if (f := output_dir / arm / f"seed_{seed}" / eval_name / "metrics.csv").exists()}
    if not runs:
        raise FileNotFoundError(f"no metrics.csv under {output_dir}")
    present = {k for run in runs.values() for row in run.values() for k in row}  # QA columns: arms with a D2 only
    metrics = [m for m in TABLE_METRICS if m in present]

    def per_subject(arm: str) -> dict[str, dict[str, float]]:  # seed-averaged value per subject
        seeds_of = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
        subjects = sorted(set().union(*seeds_of)) if seeds_of else []
        return {sub: {m: float(np.nanmean([r[sub].get(m, np.nan) for r in seeds_of if sub in r])) for m in metrics}
                for sub in subjects}

    table = {arm: per_subject(arm) for arm in arms}
    rows = []
    for arm in arms:
        subj = table[arm]
        if not subj:
            continue
        used = [s for s in seeds if (arm, s) in runs]
        row = {"arm": arm, "n_subjects": len(subj), "n_seeds": len(used)}
        for m in metrics:
            vals = np.array([v[m] for v in subj.values()])
            row[f"{m}_mean"] = float(np.nanmean(vals))
            row[f"{m}_std_subjects"] = float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else float("nan")
            seed_means = [np.nanmean([r.get(m, np.nan) for r in runs[(arm, s)].values()]) for s in used]
            row[f"{m}_std_seeds"] = float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else float("nan")
            if arm != reference and table.get(reference):
                common = [k for k in subj if k in table[reference]
                          and np.isfinite(subj[k][m]) and np.isfinite(table[reference][k][m])]
                a = np.array([subj[k][m] for k in common])
                r = np.array([table[reference][k][m] for k in common])
                row[f"{m}_diff_vs_ref"] = float((a - r).mean()) if common else float("nan")
                row[f"{m}_p_vs_ref"] = float(wilcoxon(a, r).pvalue) if len(common) > 1 and np.any(a != r) else float("nan")
        rows.append(row)
    md = [f"Test subjects per arm: {rows[0]['n_subjects']}; seeds: {seeds}. Cells: mean +/- std across test subjects "
          f"(seed-averaged); [std across seeds]; d and p: mean paired difference and two-sided Wilcoxon signed-rank "
          f"p-value against `{reference}` on the same subjects. PSNR in dB; SSIM and MAE on intensities normalised "
          "to [0, 1]; volume = whole 3D volume, foreground = brain mask, tumour = label > 0.", ""]
    md.append("| arm | " + " | ".join(metrics) + " |")
    md.append("|---" * (len(metrics) + 1) + "|")
    for r in rows:
        cells = []
        for m in metrics:
            c = f"{r[f'{m}_mean']:.3f} +/- {r[f'{m}_std_subjects']:.3f} [{r[f'{m}_std_seeds']:.3f}]"
            if f"{m}_p_vs_ref" in r:
                c += f" (d={r[f'{m}_diff_vs_ref']:+.3f}, p={r[f'{m}_p_vs_ref']:.3g})"
            cells.append(c)
        md.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n", rows


def paired_run_statistics(arm_runs: dict[int, dict[str, dict[str, float]]],
                          base_runs: dict[int, dict[str, dict[str, float]]], metric: str, n_boot: int = 10000,
                          seed: int = 0) -> dict[str, float | list]:
    """Difference ``arm - base`` of ``metric`` with the training run (seed) as the unit.

    ``arm_runs``/``base_runs``: seed -> subject -> metrics. Only seeds present in both and, within a seed, subjects
    present in both with finite values are used. Returns the per-seed differences of the subject means, their mean,
    a 95 % t-interval over seeds with the one-sample t-test p-value (NaN with fewer than 2 seeds), and a 95 %
    hierarchical bootstrap interval (resample seeds, then subjects within each drawn seed, paired).
    """
    import numpy as np
    from scipy import stats

    seeds = sorted(set(arm_runs) & set(base_runs))
    pairs = {}
    for s in seeds:
        subs = [k for k in arm_runs[s] if k in base_runs[s]
                and np.isfinite(arm_runs[s][k][metric]) and np.isfinite(base_runs[s][k][metric])]
        if subs:
            pairs[s] = np.array([arm_runs[s][k][metric] - base_runs[s][k][metric] for k in subs])
    out: dict[str, float | list] = {"n_seeds": len(pairs), "seed_diffs": [float(pairs[s].mean()) for s in pairs]}
    d = np.array(out["seed_diffs"])
    nan = float("nan")
    out["mean"] = float(d.mean()) if d.size else nan
    if d.size > 1:
        sem = d.std(ddof=1) / np.sqrt(d.size)
        half = float(stats.t.ppf(0.975, d.size - 1) * sem)
        out["t_ci"] = [out["mean"] - half, out["mean"] + half]
        out["t_p"] = float(stats.ttest_1samp(d, 0.0).pvalue) if sem > 0 else (0.0 if out["mean"] != 0 else 1.0)
    else:
        out["t_ci"], out["t_p"] = [nan, nan], nan
    if pairs:
        rng = np.random.default_rng(seed)
        groups = list(pairs.values())
        boots = np.empty(n_boot)
        for b in range(n_boot):
            drawn = rng.integers(len(groups), size=len(groups))
            boots[b] = np.mean([groups[g][rng.integers(groups[g].size, size=groups[g].size)].mean() for g in drawn])
        out["boot_ci"] = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    else:
        out["boot_ci"] = [nan, nan]
    return out


_METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)")


def read_curve(log: Path) -> dict[int, dict[str, float]]:
    """Validation metrics by epoch from a training log (the lines MONAI's ``StatsHandler`` prints).

    The evaluation of the run is appended to the same log and prints its own ``Epoch[1] Metrics`` line: reading
    stops where the epoch count goes back, so the test-set evaluation never enters the validation curve.
    """
    curve: dict[int, dict[str, float]] = {}
    if not log.exists():
        return curve
    for line in log.read_text(errors="replace").splitlines():
        m = _METRICS_LINE.search(line)
        if m and "val_" in m.group(2):
            epoch = int(m.group(1))
            if curve and epoch <= max(curve):
                break
            pairs = re.findall(r"(\w+): (-?[\d.]+(?:e-?\d+)?|nan|inf)", m.group(2))
            curve[epoch] = {k: float(v) for k, v in pairs}
    return curve


def curves_table(output_dir: Path, arms: list[str], seeds: list[int]) -> list[dict]:
    """Rows (arm, epoch, metric means over seeds) from every run's training log; also written as a figure."""
    import numpy as np

    rows = []
    for arm in arms:
        runs = [read_curve(output_dir / arm / f"seed_{s}" / "log.txt") for s in seeds]
        runs = [r for r in runs if r]
        for epoch in sorted(set().union(*runs)) if runs else []:
            vals = [r[epoch] for r in runs if epoch in r]
            keys = sorted(set().union(*vals))
            rows.append({"arm": arm, "epoch": epoch, "n_seeds": len(vals),
                         **{k: float(np.nanmean([v.get(k, np.nan) for v in vals])) for k in keys}})
    return rows


def _plot_curves(rows: list[dict], path: Path, metrics=("val_psnr", "val_psnr_tumour", "val_qa_auroc_worst")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(m in r for r in rows)]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}  # one colour per arm in every panel
    for ax, m in zip(list(getattr(axes, "flat", [axes])), metrics):
        for arm in arms:
            pts = [(r["epoch"], r[m]) for r in rows if r["arm"] == arm and m in r]
            if pts:
                ax.plot(*zip(*pts), label=arm, marker=".", color=colours[arm])
        ax.set_xlabel("epoch")
        ax.set_title(f"{m} (validation, mean over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparisons_table(output_dir: Path, comparisons: list[tuple[str, str]], seeds: list[int],
                      metrics: tuple[str, ...] = RUN_LEVEL_METRICS, eval_name: str = "eval") -> tuple[str, list[dict]]:
    """Run-level comparisons ``arm`` vs ``base`` (see :func:`paired_run_statistics`) and the subject-level test."""
    import numpy as np
    from scipy.stats import wilcoxon

    def runs_of(arm):
        return {s: _read_metrics(f) for s in seeds
                if (f := output_dir / arm / f"seed_{s}" / eval_name / "metrics.csv").exists()}

    rows, md = [], []
    md.append("| comparison | metric | per-seed differences | mean (run unit) | 95% t-CI over seeds | t-test p "
              "| 95% hierarchical bootstrap CI | subject-level Wilcoxon p |")
    md.append("|---" * 8 + "|")
    for arm, base in comparisons:
        a_runs, b_runs = runs_of(arm), runs_of(base)
        if not a_runs or not b_runs:
            continue
        for m in metrics:
            if m not in next(iter(next(iter(a_runs.values())).values())):
                continue
            st = paired_run_statistics(a_runs, b_runs, m)
            common = sorted(set(a_runs) & set(b_runs))
            subs = sorted(set.intersection(*[set(a_runs[s]) & set(b_runs[s]) for s in common])) if common else []
            a = np.array([np.nanmean([a_runs[s][k][m] for s in common]) for k in subs])
            b = np.array([np.nanmean([b_runs[s][k][m] for s in common]) for k in subs])
            ok = np.isfinite(a) & np.isfinite(b)
            p_sub = float(wilcoxon(a[ok], b[ok]).pvalue) if ok.sum() > 1 and np.any(a[ok] != b[ok]) else float("nan")
            row = {"arm": arm, "base": base, "metric": m, "n_seeds": st["n_seeds"], "n_subjects": int(ok.sum()),
                   "seed_diffs": st["seed_diffs"], "mean": st["mean"], "t_ci": st["t_ci"], "t_p": st["t_p"],
                   "boot_ci": st["boot_ci"], "subject_wilcoxon_p": p_sub}
            rows.append(row)
            fmt = lambda v: f"{v:+.3f}"  # noqa: E731
            md.append(f"| {arm} vs {base} | {m} | {', '.join(fmt(v) for v in st['seed_diffs'])} | {fmt(st['mean'])} "
                      f"| [{fmt(st['t_ci'][0])}, {fmt(st['t_ci'][1])}] | {st['t_p']:.3g} "
                      f"| [{fmt(st['boot_ci'][0])}, {fmt(st['boot_ci'][1])}] | {p_sub:.3g} |")
    return "\n".join(md) + "\n", rows


def _train_times(output_dir: Path, arms: list[str], seeds: list[int]) -> dict[str, list[float]]:
    out = {}
    for arm in arms:
        t = [json.loads(f.read_text())["seconds"] for s in seeds
             if (f := output_dir / arm / f"seed_{s}" / "train_time.json").exists()]
        if t:
            out[arm] = t
    return out
