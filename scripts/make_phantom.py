"""Generate the project's built-in paired phantom data set (T1->T2 or MR->CT).

Writes ``<output_dir>/<subject_id>/<key>.nii.gz``, ``<output_dir>/datalist.json``
(a MONAI datalist with paths relative to ``output_dir``) and
``<output_dir>/phantom.json`` (the generation parameters), then prints the
datalist path. A complete data set with the same parameters is reused; a
different one is only replaced with ``--overwrite``.

Example (from the repository root)::

    python scripts/make_phantom.py --output_dir data/phantom_t1t2 --task t1t2 --n_train 16 --seed 0
    python scripts/make_phantom.py --output_dir data/phantom_mrct --task mrct --shape 64,64,40
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def _import_phantom():  # noqa: ANN202 - returns a module
    """Import ``custom_components.phantom``, adding the repository root to sys.path if needed."""
    try:
        from custom_components import phantom
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from custom_components import phantom
    return phantom


def main(
    output_dir: str,
    task: str = "t1t2",
    n_train: int = 16,
    n_val: int = 4,
    n_test: int = 4,
    shape: Sequence[int] = (96, 96, 48),
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = True,
) -> None:
    """Write (or reuse) a phantom data set and print its datalist path.

    Args:
        output_dir: folder to write the data set to.
        task: "t1t2" (brain tumour T1 -> T2) or "mrct" (head MR -> CT).
        n_train: number of training subjects (>= 1).
        n_val: number of validation subjects (>= 0).
        n_test: number of test subjects (>= 0).
        shape: volume shape, e.g. 96,96,48 (at least 32 per axis).
        spacing: voxel size in mm, e.g. 2.0,2.0,3.0.
        seed: non-negative seed; the same seed gives identical arrays.
        overwrite: regenerate even if the data set is already there (replaces it).
        verbose: log progress to stderr.
    """
    import logging

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    phantom = _import_phantom()
    datalist = phantom.write_phantom_dataset(
        output_dir,
        task=task,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        shape=tuple(shape),
        spacing=tuple(spacing),
        seed=seed,
        overwrite=overwrite,
    )
    print(datalist)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
