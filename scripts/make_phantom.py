"""Generate the project's built-in paired phantom data set (T1->T2 or MR->CT).

Writes ``<output_dir>/<subject_id>/<key>.nii.gz``, ``<output_dir>/datalist.json``
(a MONAI datalist with paths relative to ``output_dir``) and
``<output_dir>/phantom.json`` (the generation parameters), then prints the
datalist path. A complete data set with the same parameters is reused; a
different one is only replaced with ``--overwrite``.

Example (from the repository root)::

    python scripts/make_phantom.py --output_dir data/phantom_t1t2 --task t1t2 --n_train 16 --seed 0
    python scripts/make_phantom.py --output_dir data/phantom_mrct --task mrct --shape 64,64,40
    # version-1 tumours: a T2 texture absent from T1 (irreducible error); the default is --tumour_mode learnable
    python scripts/make_phantom.py --output_dir data/phantom_t1t2_irreducible --tumour_mode irreducible
    # BraTS size (240 x 240 x 155 voxels of 1 mm), about 10-30 s of CPU per subject
    python scripts/make_phantom.py --output_dir data/phantom_brats_size --shape 240,240,155 --spacing 1,1,1 \
        --n_train 4 --n_val 1 --n_test 0
"""

from __future__ import annotations

import sys
from pathlib import Path


def _import_phantom_dataset():  # noqa: ANN202 - returns a module
    """Import ``custom_components.phantom_dataset``, adding the repository root to sys.path if needed."""
    try:
        from custom_components import phantom_dataset
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from custom_components import phantom_dataset
    return phantom_dataset


def main(output_dir: str, verbose: bool = True, **options) -> None:
    """Write (or reuse) a phantom data set and print its datalist path.

    Args:
        output_dir: folder to write the data set to.
        verbose: log progress to stderr.
        options: ``custom_components.phantom_dataset.write_phantom_dataset`` options, with the same names and defaults:
            ``--task`` t1t2 | mrct, ``--n_train`` 16, ``--n_val`` 4, ``--n_test`` 4, ``--shape`` 96,96,48,
            ``--spacing`` 2.0,2.0,3.0, ``--seed`` 0, ``--tumour_mode`` learnable | irreducible (t1t2 only: whether the
            tumour's T2 is a function of its T1, or carries a texture absent from T1), ``--overwrite`` (regenerate and
            replace an existing data set).
    """
    import logging

    if str(verbose).strip().lower() not in ("false", "0", "no", "off"):  # fire passes 'false' as text
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(_import_phantom_dataset().write_phantom_dataset(output_dir, **options))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
