"""Train and evaluate several variants (arms) on one datalist with one budget, over seeds, and compare them.

Every arm is trained with ``python -m monai.bundle run training`` and evaluated on the test list with
``evaluate.json``; the per-subject metrics are then aggregated into a Markdown and a CSV table (mean +/- std across
test subjects of the seed-averaged values, and the std across seeds of the per-seed means), with paired Wilcoxon
signed-rank tests of every arm against the reference arm on the same subjects.

Example (the five variants of the paper, 2 seeds, a short budget)::

    python scripts/ablation.py --output_dir ablation --seeds "[0,1]" --epochs 40

Arms other than the plain variants, e.g. to tune the attention::

    python scripts/ablation.py --output_dir tune --arms "{'dual': {'variant': 'dual'}, \\
        'att_warm': {'variant': 'dual_attention', 'attention_warmup': 200}}" --reference att_warm

Finished runs (an ``eval/metrics.csv`` present) are not run again, so an interrupted ablation can be restarted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("unet", "global", "local", "dual", "dual_attention")
TABLE_METRICS = ("psnr_volume", "ssim_volume", "mae_volume", "psnr_foreground", "psnr_tumour", "ssim_tumour",
                 "mae_tumour")


def _arg(value) -> str:
    return repr(value) if isinstance(value, (list, dict, tuple)) else str(value)


def run_arm(name: str, overrides: dict, seed: int, output_dir: Path, common: dict, workers_threads: int) -> Path:
    """Train and evaluate one arm for one seed; return the folder holding ``eval/metrics.csv``."""
    import subprocess

    run_dir = output_dir / name / f"seed_{seed}"
    metrics = run_dir / "eval" / "metrics.csv"
    if metrics.exists():
        print(f"[ablation] {name} seed {seed}: done already ({metrics})", flush=True)
        return run_dir
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
        subprocess.run(train, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
        evaluate = base + ["evaluating", "--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']",
                           "--overwrite", "true", "--figures", "false"] + args
        evaluate[evaluate.index("--output_dir") + 1] = str(run_dir / "eval")
        print(f"[ablation] {name} seed {seed}: evaluating", flush=True)
        subprocess.run(evaluate, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    return run_dir


def _read_metrics(path: Path) -> dict[str, dict[str, float]]:
    import csv

    with open(path, newline="") as f:
        return {r["subject"]: {k: float(v) for k, v in r.items() if k != "subject"} for r in csv.DictReader(f)}


def aggregate(output_dir: Path, arms: list[str], seeds: list[int], reference: str) -> tuple[str, list[dict]]:
    """Build the comparison table from the runs' ``metrics.csv`` files; return (markdown, csv rows)."""
    import numpy as np
    from scipy.stats import wilcoxon

    runs = {(arm, seed): _read_metrics(f) for arm in arms for seed in seeds
            if (f := output_dir / arm / f"seed_{seed}" / "eval" / "metrics.csv").exists()}
    if not runs:
        raise FileNotFoundError(f"no metrics.csv under {output_dir}")
    first = next(iter(runs.values()))
    metrics = [m for m in TABLE_METRICS if m in next(iter(first.values()))]

    def per_subject(arm: str) -> dict[str, dict[str, float]]:  # seed-averaged value per subject
        seeds_of = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
        subjects = sorted(set().union(*seeds_of)) if seeds_of else []
        return {sub: {m: float(np.nanmean([r[sub][m] for r in seeds_of if sub in r])) for m in metrics}
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
            seed_means = [np.nanmean([r[m] for r in runs[(arm, s)].values()]) for s in used]
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


def main(output_dir: str = "ablation", arms: dict | None = None, seeds: list | tuple = (0,), epochs: int = 40,
         reference: str = "dual_attention", dataset_dir: str | None = None, phantom: dict | None = None,
         overrides: dict | None = None, workers: int = 1, aggregate_only: bool = False) -> str:
    """Run the ablation and write ``ablation.md`` and ``ablation.csv`` in ``output_dir``.

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
    """
    import csv
    from concurrent.futures import ThreadPoolExecutor

    out = Path(output_dir).resolve()
    arms = arms or {v: {"variant": v} for v in VARIANTS}
    if not isinstance(arms, dict) or not arms:
        raise ValueError(f"arms must be a non-empty dict name -> overrides, got {arms!r}.")
    if reference not in arms:
        raise ValueError(f"reference {reference!r} is not one of the arms {list(arms)}.")
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}.")
    common = {"epochs": epochs, "dataset_dir": str(Path(dataset_dir).resolve()) if dataset_dir else str(out / "data"),
              "phantom": phantom or {"task": "t1t2", "n_train": 16, "n_val": 4, "n_test": 12, "seed": 0},
              **(overrides or {})}
    if not aggregate_only:
        threads = max(1, (os.cpu_count() or 1) // workers)
        jobs = [(name, arm, seed) for seed in seeds for name, arm in arms.items()]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda j: run_arm(j[0], j[1], j[2], out, common, threads), jobs))
    md, rows = aggregate(out, list(arms), seeds, reference)
    (out / "ablation.md").write_text(md)
    with open(out / "ablation.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(md)
    return str(out / "ablation.md")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
