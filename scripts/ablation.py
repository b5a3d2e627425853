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
import sys
import time
from pathlib import Path

from ablation_tables import _plot_curves, _train_times, aggregate, comparisons_table, curves_table

ROOT = Path(__file__).resolve().parents[1]
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
