"""Search the attention's options with Optuna, using the ablation harness as the objective.

Each trial trains ``dual_attention`` with sampled options through the bundle (``scripts/ablation.py``'s
``run_arm``) and evaluates it on the **validation** list (the test subjects are never used for the choice). The
objective rewards tumour PSNR and penalises any whole-volume PSNR loss of more than ``tolerance`` dB and any SSIM
loss of more than ``ssim_tolerance`` against a plain UNet trained with the same budget and seed (the UNet and the
shipped default, ``REFERENCES``, are trained beside the trials and written as the first rows of ``trials.csv``)::

    objective = psnr_tumour + penalty * min(0, psnr_volume - (unet_psnr_volume - tolerance))
                            + ssim_penalty * min(0, ssim_volume - (unet_ssim_volume - ssim_tolerance))

The study lives in a SQLite file in ``output_dir``, so an interrupted search resumes where it stopped (finished runs
are reused, too). Configurations to try first can be queued with ``enqueue``.

Example (6 trials, two at a time, two configurations queued first)::

    python scripts/tune.py --output_dir tune --n_trials 6 --epochs 60 --n_jobs 2 \\
        --enqueue "[{'local_conditional': True}, {'local_conditional': True, 'beta': 4.0}]"

Needs the optional extra ``pip install .[tune]`` (Optuna).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Options searched, with their choices (categorical so that queued trials and the table stay readable).
SEARCH_SPACE: dict[str, list] = {
    "attention_source": ["confidence", "predicted", "gap", "error"],  # whose map F is made of
    "local_target": ["binary", "mixed"],  # how D2 is trained (mixed: per-voxel real/fake composites)
    "local_conditional": [False, True],
    "n_local": [1, 2],
    "beta": [1.0, 2.0, 4.0],
    "attention_norm": ["none", "mean"],
    "attention_floor": [0.0, 0.3, 0.5],
    "attention_smoothing": [0.0, 1.5],
    "attention_start": [0.1, 0.3],  # fraction of the run (the fine-tuning protocol starts adversarial at 0)
    "lambda_adv_local": [0.01, 0.05, 0.2],
    "local_stem_stride": [2, 1],  # 1: a full-resolution D2 with a smaller receptive field
    "lr_local_discriminator": [0.0002, 0.001],
    "local_ema": [0.0, 0.99],  # F's map M from an exponential moving average of D2's weights
}

#: runs trained beside the trials with the same budget and seed: the objective's UNet and the shipped default
REFERENCES: dict[str, dict] = {"unet": {"variant": "unet"}, "shipped": {}}


def check_space(space: dict[str, list], common: dict) -> None:
    """Refuse, before any run, a searched option that is not a training option or a choice its rule refuses, and a
    common override that names no config id (every choice is checked: a bad one would fail only when TPE samples
    it, possibly after hours)."""
    from ablation import check_arms

    from custom_components.config.hyperparameters import TrainingOptions

    not_options = sorted(set(space) - set(TrainingOptions.names()))
    if not_options:
        raise ValueError(f"the search space holds {not_options}, which are not training options.")
    check_arms({f"{k}={v!r}": {k: v} for k, choices in space.items() for v in choices}, common)


def objective_value(metrics: dict[str, float], reference: dict[str, float], tolerance: float = 0.2,
                    penalty: float = 2.0, ssim_tolerance: float = 0.005, ssim_penalty: float = 100.0) -> float:
    """Tumour PSNR, minus ``penalty`` per dB of whole-volume PSNR lost beyond ``tolerance`` and ``ssim_penalty`` per
    unit of whole-volume SSIM lost beyond ``ssim_tolerance``, both against the UNet ``reference``."""
    return (metrics["psnr_tumour"]
            + penalty * min(0.0, metrics["psnr_volume"] - (reference["psnr_volume"] - tolerance))
            + ssim_penalty * min(0.0, metrics["ssim_volume"] - (reference["ssim_volume"] - ssim_tolerance)))


#: metrics kept per trial, for the selected (``model.pt``) and the final weights
REPORTED = ("psnr_volume", "psnr_tumour", "ssim_volume", "qa_auroc_worst", "qa_spearman")


def last_logged(log: Path, key: str) -> float:
    """The last value of ``key`` in a training log (``key: value``; NaN when absent)."""
    import re

    found = re.findall(rf"\b{re.escape(key)}: ([-+0-9.eE]+|nan)", log.read_text(errors="replace")) if log.exists() else []
    return float(found[-1]) if found else float("nan")


#: options added to the space after runs were made, at the value those runs had: left out of the folder name at
#: that value, so the earlier runs keep their names and are reused
ADDED_LATER: dict[str, object] = {"local_ema": 0.0}


def trial_name(params: dict) -> str:
    """A short, stable folder name for a configuration (finished runs are reused by name)."""
    import hashlib

    from custom_components.config.hyperparameters import RENAMED

    old_name = {new: old for old, new in RENAMED.items()}  # folders keep the names the runs were made under
    named = {old_name.get(k, k): v for k, v in params.items() if not (k in ADDED_LATER and v == ADDED_LATER[k])}
    return "trial_" + hashlib.sha1(repr(sorted(named.items())).encode()).hexdigest()[:10]


def _mean_metrics(run_dir: Path, weights: str = "eval") -> dict[str, float]:
    import numpy as np
    from ablation import _read_metrics

    rows = _read_metrics(run_dir / weights / "metrics.csv")
    keys = next(iter(rows.values())).keys()
    return {k: float(np.nanmean([r[k] for r in rows.values()])) for k in keys}


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def main(output_dir: str = "tune", n_trials: int = 6, epochs: int = 60, seed: int = 0, n_jobs: int = 1,
         enqueue: list | None = None, dataset_dir: str | None = None, phantom: dict | None = None,
         overrides: dict | None = None, study_name: str = "attention", reuse_finished: bool = True,
         tolerance: float = 0.2, penalty: float = 2.0, ssim_tolerance: float = 0.005,
         ssim_penalty: float = 100.0) -> str:
    """Run (or resume) the search; write ``trials.csv`` and print the best configurations.

    Args:
        output_dir: folder of the study (``study.db``), the runs and the data.
        n_trials: distinct configurations to add in this call (a configuration the study has already is not run
            again: such a trial is pruned as a duplicate and not counted).
        epochs: training budget of every trial and of the references.
        seed: training seed of every trial.
        n_jobs: trials run in parallel (each gets cores / n_jobs threads).
        enqueue: option dicts to try first (keys from ``SEARCH_SPACE``; missing keys are sampled).
        dataset_dir: data folder (default ``<output_dir>/data``, the ablation's phantom).
        phantom: phantom options (default: the ablation's).
        overrides: config overrides for every run.
        study_name: the study in ``study.db`` (a new name starts a new study, e.g. after changing the objective).
        reuse_finished: enqueue first every configuration already trained in ``output_dir`` (``trial_*/params.json``):
            a new study or objective gets their values without training them again.
        tolerance, penalty, ssim_tolerance, ssim_penalty: see :func:`objective_value`.
    """
    import csv
    import json

    import optuna
    from ablation import run_arm

    from custom_components.config.hyperparameters import RENAMED

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"epochs": epochs, "dataset_dir": str(Path(dataset_dir).resolve()) if dataset_dir else str(out / "data"),
              "phantom": phantom or {"task": "t1t2", "n_train": 16, "n_val": 4, "n_test": 12, "seed": 0,
                                     "tumour_mode": "learnable"},
              **(overrides or {})}
    check_space(SEARCH_SPACE, common)
    threads = max(1, (os.cpu_count() or 1) // max(1, n_jobs))
    refs = {name: {w: _mean_metrics(run_arm(name, arm, seed, out, common, threads, eval_section="validation"), w)
                   for w in ("eval", "eval_final")} for name, arm in REFERENCES.items()}
    unet = refs["unet"]["eval"]

    def value(metrics: dict[str, float]) -> float:
        return objective_value(metrics, unet, tolerance, penalty, ssim_tolerance, ssim_penalty)

    study = optuna.create_study(study_name=study_name, storage=f"sqlite:///{out / 'study.db'}",
                                direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed))
    queued = list(enqueue or [])
    if reuse_finished:
        queued += [{RENAMED.get(k, k): v for k, v in json.loads(f.read_text()).items()}  # runs before a rename
                   for f in sorted(out.glob("trial_*/params.json"))]
    for params in queued:
        unknown = set(params) - set(SEARCH_SPACE)
        if unknown:
            raise ValueError(f"enqueue: unknown option(s) {sorted(unknown)}; searchable: {list(SEARCH_SPACE)}.")
        study.enqueue_trial(params, skip_if_exists=True)

    def distinct() -> set:
        return {_key(t.params) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}

    target = len(distinct()) + int(n_trials)

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in SEARCH_SPACE.items()}
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        twin = next((t.number for t in study.get_trials(deepcopy=False, states=states)
                     if t.number != trial.number and _key(t.params) == _key(params)), None)
        if twin is not None:  # the same configuration is finished or running: nothing new to learn
            raise optuna.TrialPruned(f"duplicate of trial {twin}")
        name = trial_name(params)
        run_dir = run_arm(name, {"variant": "dual_attention", **params}, seed, out, common, threads,
                          eval_section="validation")
        (out / name / "params.json").write_text(json.dumps(params))
        metrics, final = _mean_metrics(run_dir), _mean_metrics(run_dir, "eval_final")
        trial.set_user_attr("local_qa_auroc_worst", last_logged(run_dir / "log.txt", "val_local_qa_auroc_worst"))
        for k in REPORTED:
            trial.set_user_attr(k, metrics.get(k, float("nan")))
            trial.set_user_attr(f"final_{k}", final.get(k, float("nan")))
        trial.set_user_attr("final_value", value(final))
        trial.set_user_attr("run_dir", str(run_dir))
        return value(metrics)

    def enough(study: optuna.Study, _trial) -> None:
        if len(distinct()) >= target:
            study.stop()

    if n_trials > 0:
        study.optimize(objective, n_trials=20 * int(n_trials), n_jobs=n_jobs, callbacks=[enough])
    done, seen = [], set()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if _key(t.params) not in seen:
            seen.add(_key(t.params))
            done.append(t)
    with open(out / "trials.csv", "w", newline="") as f:
        attrs = [*REPORTED, *(f"final_{k}" for k in REPORTED), "final_value", "local_qa_auroc_worst"]
        writer = csv.DictWriter(f, fieldnames=["number", "value", *SEARCH_SPACE, *attrs, "run_dir"])
        writer.writeheader()
        for name, r in refs.items():
            writer.writerow({"number": name, "value": value(r["eval"]), **{k: r["eval"].get(k) for k in REPORTED},
                             **{f"final_{k}": r["eval_final"].get(k) for k in REPORTED},
                             "final_value": value(r["eval_final"]), "run_dir": str(out / name)})
        for t in done:
            writer.writerow({"number": t.number, "value": t.value, **t.params,
                             **{k: t.user_attrs.get(k) for k in attrs}, "run_dir": t.user_attrs.get("run_dir")})
    for name, r in refs.items():
        print(f"reference {name} (validation, selected weights): objective {value(r['eval']):.3f}, psnr_volume "
              f"{r['eval']['psnr_volume']:.3f}, psnr_tumour {r['eval']['psnr_tumour']:.3f}, ssim "
              f"{r['eval']['ssim_volume']:.3f}")
    print(f"{len(done)} distinct configurations")
    for t in sorted(done, key=lambda t: -t.value)[:10]:
        a = t.user_attrs
        print(f"trial {t.number}: objective {t.value:.3f} (final weights {a.get('final_value', float('nan')):.3f}), "
              f"psnr_volume {a['psnr_volume']:.3f}, psnr_tumour {a['psnr_tumour']:.3f}, ssim {a['ssim_volume']:.3f}, "
              f"QA auroc {a.get('qa_auroc_worst')}, D2 map auroc {a.get('local_qa_auroc_worst')}: {t.params}")
    return str(out / "trials.csv")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
