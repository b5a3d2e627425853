"""Train and evaluate several variants (arms) on one datalist with one budget, over seeds, and compare them.

Every arm is trained with ``python -m monai.bundle run training`` and evaluated on the test list with
``evaluate.json``; the per-subject metrics are then aggregated into Markdown and CSV tables:

* per arm: mean +/- std across test subjects of the seed-averaged values, the std across seeds of the per-seed
  means, and the confidence map's quality as an error detector (``qa_*``, arms with a local discriminator);
* per comparison (arm vs baseline, same seeds, same subjects), with the **training run as the unit**: the per-seed
  paired differences, their mean with a t-interval over seeds, a hierarchical bootstrap interval (seeds, then
  subjects within a seed, resampled with replacement), and, beside them, the subject-level Wilcoxon signed-rank test
  of the seed-averaged values (which treats subjects as the unit and says nothing about run-to-run variation);
* validation curves per arm (``curves.csv``, ``curves.png``: validation metrics by epoch, mean over seeds) and each
  run's training wall time, to show whether the budget let the baseline plateau.

Example (the five variants of the paper, 2 seeds, a short budget)::

    python scripts/ablation.py --output_dir ablation --seeds "[0,1]" --epochs 40

Arms other than the plain variants, e.g. to tune the attention::

    python scripts/ablation.py --output_dir tune --arms "{'dual': {'variant': 'dual'}, \\
        'att_warm': {'variant': 'dual_attention', 'attention_warmup': 200}}" --reference att_warm

Finished runs (an ``eval/metrics.csv`` present) are not run again, so an interrupted ablation can be restarted.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE_METRICS = ("psnr_volume", "ssim_volume", "mae_volume", "psnr_foreground", "psnr_tumour", "ssim_tumour",
                 "mae_tumour", "qa_auroc_worst", "qa_spearman", "qa_ause", "qa_sparsification_gain",
                 "qa_confidence_tumour", "qa_confidence_outside")
RUN_LEVEL_METRICS = ("psnr_volume", "psnr_foreground", "psnr_tumour", "ssim_volume", "mae_tumour")
#: the evaluations of every run: the selected weights (``model.pt``, best validation) and the final ones
WEIGHTS = {"eval": {}, "eval_final": {"model_file": "model_final.pt", "local_discriminator_file": "local_discriminator_final.pt",
                                      "error_head_file": "error_head_final.pt"}}


def config_ids() -> set[str]:
    """The ids train.json and evaluate.json define (the keys a run's overrides may set)."""
    from custom_components.config.options import defined_ids

    return defined_ids([ROOT / "bundle" / "configs" / name for name in ("train.json", "evaluate.json")])


def check_arms(arms: dict, common: dict) -> None:
    """Refuse, before any run, an arm or a common override that names no config id or gives a training option a
    value its rule refuses (:func:`custom_components.config.hyperparameters.check_overrides`)."""
    from custom_components.config.hyperparameters import check_overrides

    ids = config_ids()
    check_overrides(common, ids, what="override")
    for name, arm in arms.items():
        check_overrides(arm, ids, what=f"arm {name!r}:")


def _arg(value) -> str:
    return repr(value) if isinstance(value, (list, dict, tuple)) else str(value)


def run_arm(name: str, overrides: dict, seed: int, output_dir: Path, common: dict, workers_threads: int,
            eval_section: str = "test") -> Path:
    """Train and evaluate one arm for one seed; return the folder holding ``eval/metrics.csv``.

    ``eval_section`` is the datalist section evaluated (``test`` for the ablation; ``validation`` when tuning, so
    the test subjects are never used to choose a configuration).
    """
    import subprocess

    run_dir = output_dir / name / f"seed_{seed}"
    metrics = run_dir / "eval" / "metrics.csv"
    if metrics.exists() and (run_dir / "eval_final" / "metrics.csv").exists():
        print(f"[ablation] {name} seed {seed}: done already ({metrics})", flush=True)
        return run_dir
    # a string option may name its seed's file, e.g. {"pretrained_generator": "pre/unet/seed_{seed}/models/model.pt"}
    overrides = {k: v.format(seed=seed) if isinstance(v, str) and "{seed}" in v else v for k, v in overrides.items()}
    settings = {**common, **overrides, "seed": seed, "model_dir": str(run_dir / "models"),
                "output_dir": str(run_dir / "train")}
    base = [sys.executable, "-m", "monai.bundle", "run"]
    args = [x for k, v in settings.items() for x in (f"--{k}", _arg(v))]
    env = {**os.environ, "OMP_NUM_THREADS": str(workers_threads), "MKL_NUM_THREADS": str(workers_threads)}
    log = run_dir / "log.txt"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        train = base + ["training", "--config_file", "bundle/configs/train.json", "--overwrite", "true"] + args
        print(f"[ablation] {name} seed {seed}: training ({log})", flush=True)
        start = time.perf_counter()
        subprocess.run(train, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
        (run_dir / "train_time.json").write_text(json.dumps({"seconds": time.perf_counter() - start,
                                                             "threads": workers_threads}))
        for eval_name, files in WEIGHTS.items():
            extra = [x for k, v in files.items() for x in (f"--{k}", v)]
            evaluate = base + ["evaluating", "--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']",
                               "--overwrite", "true", "--figures", "false", "--eval_section", eval_section,
                               "--eval_dir", str(run_dir / eval_name)] + args + extra
            print(f"[ablation] {name} seed {seed}: evaluating ({eval_name})", flush=True)
            subprocess.run(evaluate, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    return run_dir


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


def default_arms() -> dict[str, dict]:
    """The arms of an ablation run without ``--arms``: every variant of the package, ``{variant: {"variant": variant}}``."""
    from custom_components import all_variants

    return {v: {"variant": v} for v in all_variants()}


def main(output_dir: str = "ablation", arms: dict | None = None, seeds: list | tuple = (0,), epochs: int = 40,
         reference: str = "dual_attention", dataset_dir: str | None = None, phantom: dict | None = None,
         overrides: dict | None = None, workers: int = 1, aggregate_only: bool = False,
         comparisons: list | None = None) -> str:
    """Run the ablation and write ``ablation.md``, ``ablation.csv``, ``comparisons.csv``, ``curves.csv`` and
    ``curves.png`` in ``output_dir``.

    Args:
        output_dir: folder for every run and the tables.
        arms: name -> config overrides; default: the five variants ``{v: {"variant": v}}``.
        seeds: training seeds (the data set stays the same).
        epochs: training epochs of every arm (same budget for all).
        reference: arm the others are tested against.
        dataset_dir: phantom/data folder (default: ``<output_dir>/data``, a phantom with 12 test subjects).
        phantom: phantom generator options (default 16 training, 4 validation, 12 test subjects).
        overrides: config overrides applied to every arm (e.g. ``{"val_interval": 10}``).
        workers: runs in parallel (each gets cores / workers threads).
        aggregate_only: only rebuild the tables from finished runs.
        comparisons: ``[[arm, baseline], ...]`` for the run-level table; default every arm against ``reference``.
    """
    import csv
    from concurrent.futures import ThreadPoolExecutor

    out = Path(output_dir).resolve()
    arms = arms or default_arms()
    if not isinstance(arms, dict) or not arms:
        raise ValueError(f"arms must be a non-empty dict name -> overrides, got {arms!r}.")
    if reference not in arms:
        raise ValueError(f"reference {reference!r} is not one of the arms {list(arms)}.")
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}.")
    common = {"epochs": epochs, "dataset_dir": str(Path(dataset_dir).resolve()) if dataset_dir else str(out / "data"),
              "phantom": phantom or {"task": "t1t2", "n_train": 16, "n_val": 4, "n_test": 12, "seed": 0, "tumour_mode": "learnable"},
              **(overrides or {})}
    check_arms(arms, common)
    if not aggregate_only:
        threads = max(1, (os.cpu_count() or 1) // workers)
        jobs = [(name, arm, seed) for seed in seeds for name, arm in arms.items()]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda j: run_arm(j[0], j[1], j[2], out, common, threads), jobs))
    pairs = [tuple(c) for c in comparisons] if comparisons else [(a, reference) for a in arms if a != reference]
    for pair in pairs:
        if len(pair) != 2 or any(a not in arms for a in pair):
            raise ValueError(f"each comparison must be [arm, baseline] with arms from {list(arms)}, got {pair!r}.")
    md, rows = aggregate(out, list(arms), seeds, reference)
    cmp_md, cmp_rows = comparisons_table(out, pairs, seeds)
    final_present = any((out / a / f"seed_{s}" / "eval_final" / "metrics.csv").exists() for a in arms for s in seeds)
    if final_present:
        final_md, final_rows = aggregate(out, list(arms), seeds, reference, "eval_final")
        final_cmp_md, final_cmp_rows = comparisons_table(out, pairs, seeds, eval_name="eval_final")
        for r in final_rows + final_cmp_rows:
            r["weights"] = "final"
        for r in rows + cmp_rows:
            r["weights"] = "selected"
        rows, cmp_rows = rows + final_rows, cmp_rows + final_cmp_rows
    curve_rows = curves_table(out, list(arms), seeds)
    times = _train_times(out, list(arms), seeds)
    text = ["## Per arm (subjects as rows, seed-averaged)", "", md, "## Comparisons with the training run as the unit",
            "", "Per-seed differences are differences of the test-subject means of two runs with the same seed. "
            "The t-interval and t-test use the seeds as the sample; the bootstrap resamples seeds, then subjects "
            "within each seed (paired). The subject-level Wilcoxon test (seed-averaged values, subjects as the "
            "unit) is shown beside them for comparison only.", "", cmp_md]
    if final_present:
        text[0] = "## Per arm, selected weights (`model.pt`, best validation), subjects as rows, seed-averaged"
        text += ["## Final weights (`model_final.pt`, the last iteration)", "", "### Per arm", "", final_md,
                 "### Comparisons with the training run as the unit", "", final_cmp_md]
    if times:
        text += ["## Training wall time per run (seconds)", "",
                 "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
        text += [f"| {a} | " + " | ".join(f"{v:.0f}" for v in t) + f" | {sum(t) / len(t):.0f} |" for a, t in times.items()]
        text.append("")
    if curve_rows:
        text += ["Validation curves (mean over seeds): `curves.csv`, `curves.png`.", ""]
        _plot_curves(curve_rows, out / "curves.png")
    (out / "ablation.md").write_text("\n".join(text))
    for name, table in (("ablation.csv", rows), ("comparisons.csv", cmp_rows), ("curves.csv", curve_rows)):
        if not table:
            continue
        with open(out / name, "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in table for k in r))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    print("\n".join(text))
    return str(out / "ablation.md")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import fire

    fire.Fire(main)
