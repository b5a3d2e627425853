"""Preprocess the subjects of a datalist with SimpleITK: N4, optional rigid registration, resampling.

Per subject: N4 bias-field correction of the source (and of the target unless it is a CT: ``--target_is_ct``,
by default read from the datalist's ``"task": "mrct"``), rigid registration of the source onto the target when
``--register true`` (label and mask stay on the target grid), and resampling of all images onto the target grid at
``--spacing``. Writes ``<output_dir>/<subject>/{source,target,label,mask}.nii.gz``, ``<output_dir>/datalist.json``
and ``<output_dir>/preprocess_log.json``; subjects already done are skipped. Exits with status 1 if any subject
failed (the others are still written).

Example::

    python scripts/preprocess.py --input_datalist data/brats/datalist.json --output_dir data/brats_pre \
        --spacing 1,1,1 --register true --workers 2
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def preprocess(input_datalist: str, output_dir: str, n4: bool = True, spacing: Sequence[float] | float | None = None,
               register: bool = False, target_is_ct: bool | None = None, workers: int = 1, overwrite: bool = False,
               n4_shrink: int = 4, n4_iterations: Sequence[int] = (50, 50, 50, 50),
               reg_shrink_factors: Sequence[int] = (4, 2, 1), reg_smoothing_sigmas: Sequence[float] = (2.0, 1.0, 0.0),
               reg_iterations: int = 200, reg_bins: int = 50, reg_sampling: float = 0.2,
               reg_learning_rate: float = 1.0, seed: int = 0, threads: int | None = None) -> None:
    """Preprocess every subject of ``input_datalist`` into ``output_dir`` and print a summary.

    Args:
        input_datalist: MONAI datalist JSON (sections training/validation/test).
        output_dir: output folder (datalist.json, preprocess_log.json, one folder per subject).
        n4: N4 bias-field correction of the MR images.
        spacing: output spacing in mm (``--spacing 1,1,1`` or ``--spacing 1``); default: the target's.
        register: rigidly register the source onto the target (Euler3D, Mattes MI, multi-resolution).
        target_is_ct: the target is a CT (no N4); default: the datalist's task is "mrct".
        workers: processes.
        overwrite: redo every subject, also when the log was written with other parameters.
        n4_shrink: shrink factor of the image the N4 field is fitted on.
        n4_iterations: N4 iterations per fitting level (one entry per level).
        reg_shrink_factors: registration pyramid shrink factors.
        reg_smoothing_sigmas: registration pyramid smoothing sigmas (mm).
        reg_iterations: maximum optimizer iterations per level.
        reg_bins: Mattes mutual information histogram bins.
        reg_sampling: fraction of voxels sampled for the metric.
        reg_learning_rate: initial step of the regular-step gradient descent (mm).
        seed: seed of the metric sampling.
        threads: SimpleITK threads per process (default: all cores divided by ``workers``).
    """
    import logging
    import os

    from custom_components.apps.preprocess import preprocess as run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, int(workers)))
    summary = run(input_datalist, output_dir, n4=n4, spacing=spacing, register=register, target_is_ct=target_is_ct,
                  workers=workers, overwrite=overwrite, n4_shrink=n4_shrink, n4_iterations=n4_iterations,
                  reg_shrink_factors=reg_shrink_factors, reg_smoothing_sigmas=reg_smoothing_sigmas,
                  reg_iterations=reg_iterations, reg_bins=reg_bins, reg_sampling=reg_sampling,
                  reg_learning_rate=reg_learning_rate, seed=seed, threads=threads)
    print(f"preprocessed {len(summary['done'])} subject(s), skipped {len(summary['skipped'])} already done, "
          f"{len(summary['failed'])} failed -> {summary['datalist']} (log: {summary['log']})")
    for item in summary["failed"]:
        print(f"  FAILED {item['subject']} ({item['section']}): {item['error']}")
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fire

    fire.Fire(preprocess)
