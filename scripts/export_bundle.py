"""Release the bundle the model-zoo way, and promote a training run's weights to the bundle's shipped weights.

Two commands:

``export``: write ``<output_dir>/<name>/`` (configs, docs, LICENSE, ``models/*.pt`` and the runtime modules of
``custom_components`` copied inside the bundle, so ``$import custom_components`` resolves from the bundle root with no
pip install) and ``<output_dir>/<name>_v<version>.zip``, the file name ``monai.bundle download`` expects::

    python scripts/export_bundle.py export --output_dir release
    cd release/dual_attention_synthesis && python -m monai.bundle run --config_file configs/inference.json

``promote``: copy a run's best weights (``<run_dir>/models/model.pt`` and ``local_discriminator.pt``) into
``bundle/models/`` and record the run's validation metrics at the best epoch as ``eval_metrics`` in
``metadata.json``::

    python scripts/export_bundle.py promote --run_dir bundle/runs/dual_attention

Neither command overwrites anything without ``--overwrite true``. Weights are checked against the configs'
``network_def`` (and ``local_discriminator``) before anything is written; a mismatch names the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "custom_components"
WEIGHT_FILES = ("model.pt", "local_discriminator.pt", "error_head.pt")
DOC_SUFFIXES = (".md", ".csv", ".txt", ".png", ".jpg")


def _read_metadata(bundle_dir: Path) -> dict:
    path = bundle_dir / "configs" / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {bundle_dir} a bundle folder?")
    meta = json.loads(path.read_text())
    for key in ("name", "version"):
        if not meta.get(key):
            raise ValueError(f"{path} has no {key!r}: it is needed to name the release.")
    version = str(meta["version"])
    if version not in meta.get("changelog", {}):
        raise ValueError(f"{path}: version {version} has no entry in 'changelog' (entries: {sorted(meta.get('changelog', {}))}).")
    return meta


def check_weights(bundle_dir: str | Path, models_dir: str | Path | None = None) -> list[Path]:
    """Load the weight files of ``models_dir`` (default ``<bundle_dir>/models``) into the networks of the inference
    config (``configs/inference.json``, which runs alone).

    ``model.pt`` is required and must match ``network_def``; ``local_discriminator.pt`` and ``error_head.pt`` are
    optional and must match ``local_discriminator`` and ``error_predictor``. Returns the files checked; raises naming the file and what did not match.
    """
    import torch
    from monai.bundle import ConfigParser

    from custom_components.config.paths import config_files

    bundle_dir = Path(bundle_dir).resolve()
    models_dir = Path(models_dir) if models_dir is not None else bundle_dir / "models"
    model = models_dir / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"no generator weights: {model} does not exist (train, then run `promote`).")
    parser = ConfigParser()
    parser.read_config(config_files(bundle_dir, "infer"))
    head = models_dir / "error_head.pt"
    parser.update({"bundle_root": str(bundle_dir), "device": "cpu", "save_confidence": True,
                   "uses_error_head": head.is_file()})
    checked = []
    for file, net_id in ((model, "network_def"), (models_dir / "local_discriminator.pt", "local_discriminator"),
                         (head, "error_predictor")):
        if not file.is_file():
            continue
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file
            raise ValueError(f"{file} cannot be read as a state_dict ({type(e).__name__}: {e}).") from None
        if not isinstance(state, dict):
            raise ValueError(f"{file} should hold a state_dict, found {type(state).__name__}.")
        try:
            parser.get_parsed_content(net_id).load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{file} does not match the config's {net_id!r}: {e}") from None
        checked.append(file)
    return checked


def export(output_dir: str = "release", bundle_dir: str = str(ROOT / "bundle"), overwrite: bool = False,
           package_dir: str = str(ROOT / PACKAGE)) -> str:
    """Write the release folder ``<output_dir>/<name>/`` and ``<output_dir>/<name>_v<version>.zip``; return the zip path.

    Args:
        output_dir: where the release folder and zip are written.
        bundle_dir: the bundle to release (configs/, docs/, models/, LICENSE).
        overwrite: replace an existing release folder and zip of the same name and version.
        package_dir: the ``custom_components`` source, copied into the release.
    """
    bundle, package, out = Path(bundle_dir).resolve(), Path(package_dir).resolve(), Path(output_dir).resolve()
    meta = _read_metadata(bundle)
    name, version = meta["name"], meta["version"]
    weights = check_weights(bundle)
    if not meta.get("eval_metrics"):
        raise ValueError(f"{bundle / 'configs' / 'metadata.json'} has empty 'eval_metrics': record the metrics of the "
                         "run that produced the weights with `python scripts/export_bundle.py promote --run_dir ...`.")
    final_folder, archive = out / name, out / f"{name}_v{version}.zip"
    for existing in (final_folder, archive):
        if existing.exists() and not overwrite:
            raise FileExistsError(f"{existing} already exists; pass --overwrite true to replace it.")
    # everything is built under temporary names and renamed when complete: a killed export leaves no file under a
    # final name (a rerun removes the leftovers and starts again)
    staging = out / f".{name}_v{version}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    folder = staging / name
    (folder / "models").mkdir(parents=True)
    shutil.copytree(bundle / "configs", folder / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(bundle / "docs", folder / "docs",
                    ignore=lambda d, files: [f for f in files if (Path(d) / f).is_file() and not f.endswith(DOC_SUFFIXES)])
    license_file = bundle / "LICENSE" if (bundle / "LICENSE").is_file() else ROOT / "LICENSE"
    shutil.copy2(license_file, folder / "LICENSE")
    for file in weights:
        shutil.copy2(file, folder / "models" / file.name)
    # the whole package: its groups import their modules, so a release holds every group whole
    shutil.copytree(package, folder / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    partial_zip = shutil.make_archive(str(staging / archive.stem), "zip", root_dir=staging, base_dir=name)
    if final_folder.exists():
        shutil.rmtree(final_folder)
    os.replace(folder, final_folder)
    os.replace(partial_zip, archive)
    shutil.rmtree(staging)
    print(f"release folder: {final_folder}\nrelease zip: {archive}")
    return str(archive)


RUN_RECORD = "checkpoints/run_config.json"  # written by custom_components.handlers.checkpointing.record_run, one entry per run


def current_run(run_dir: str | Path) -> dict | None:
    """The current run of ``run_dir`` from its record (``checkpoints/run_config.json``): ``{"started": <unix time>,
    "options": {...}}`` of the latest run started afresh (resumes continue it), or ``None`` without a record."""
    import datetime

    record = Path(run_dir) / RUN_RECORD
    if not record.is_file():
        return None
    history = json.loads(record.read_text())
    fresh = [h for h in history if "resumed_from" not in h] or history[:1]
    if not fresh:
        return None
    started = datetime.datetime.fromisoformat(fresh[-1]["started"]).timestamp()
    return {"started": started, "options": fresh[-1].get("options", {}), "record": str(record)}


def _event_time(file: Path) -> float:
    """Creation time of a TensorBoard event file, from its name (``events.out.tfevents.<unix time>.<host>...``)."""
    parts = file.name.split(".")
    return float(parts[3]) if len(parts) > 3 and parts[3].isdigit() else file.stat().st_mtime


def best_epoch_metrics(run_dir: str | Path, key_metric: str = "val_psnr", since: float | None = None) -> dict[str, float]:
    """Validation metrics of the epoch with the best ``key_metric``, read from the run's TensorBoard event files
    (only those created at or after ``since``, a unix time: the current run's, see :func:`current_run`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(f"{run_dir} holds no TensorBoard event file (events.out.tfevents.*) to read metrics from.")
    if since is not None:
        older = [f for f in events if _event_time(f) < int(since)]
        events = [f for f in events if f not in older]
        for f in older:
            print(f"ignoring {f}: written before the current run started")
        if not events:
            raise FileNotFoundError(f"{run_dir} holds no TensorBoard event file of the current run (every one of them "
                                    "predates its start in " + RUN_RECORD + ").")
    scalars: dict[str, dict[int, float]] = {}
    for file in events:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("val_"):
                scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    if key_metric not in scalars:
        raise ValueError(f"{run_dir}: no {key_metric!r} in the event files (validation tags: {sorted(scalars)}).")
    best = max(scalars[key_metric], key=scalars[key_metric].get)
    out = {tag: round(float(values[best]), 4) for tag, values in sorted(scalars.items()) if best in values}
    out["best_epoch"] = int(best)
    return out


def promote(run_dir: str, bundle_dir: str = str(ROOT / "bundle"), overwrite: bool = False) -> dict:
    """Copy ``<run_dir>/models/*.pt`` to ``<bundle_dir>/models/`` and write the run's best-epoch metrics to metadata.

    Only the current run is read: the latest run started afresh in the run record (``checkpoints/run_config.json``,
    resumes continue it). A weight file older than that start is left over from an earlier run into the same
    folder and stops the promotion, naming it; event files older than it are ignored. A run folder without a
    record (an old run) is read whole, with a warning.

    Args:
        run_dir: a training run's ``output_dir`` (holds ``models/``, ``checkpoints/`` and the TensorBoard event files).
        bundle_dir: the bundle whose shipped weights are replaced.
        overwrite: replace weights already in ``<bundle_dir>/models``.
    """
    run, bundle = Path(run_dir).resolve(), Path(bundle_dir).resolve()
    sources = check_weights(bundle, run / "models")
    this_run = current_run(run)
    if this_run is None:
        print(f"warning: {run / RUN_RECORD} does not exist: every weight and event file in {run} is taken as this run's")
    else:
        stale = [f for f in sources if f.stat().st_mtime < this_run["started"] - 1]
        if stale:
            raise ValueError(
                f"{', '.join(map(str, stale))}: written before the current run of {run} started (recorded in "
                f"{this_run['record']}), so left by an earlier run into the same folder; delete "
                f"{'it' if len(stale) == 1 else 'them'}, or train again with --overwrite true (which clears them).")
    metrics = best_epoch_metrics(run, since=None if this_run is None else this_run["started"])
    targets = [bundle / "models" / f.name for f in sources]
    stale = [bundle / "models" / n for n in WEIGHT_FILES if (bundle / "models" / n).exists()]
    if stale and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, stale))} already exist; pass --overwrite true to replace them.")
    for file in stale:
        file.unlink()
    for src, dst in zip(sources, targets):
        shutil.copy2(src, dst)
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["eval_metrics"] = metrics
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    print(f"copied {', '.join(str(f) for f in sources)} to {bundle / 'models'}; eval_metrics: {metrics}")
    return metrics


if __name__ == "__main__":
    import fire

    fire.Fire({"export": export, "promote": promote})
