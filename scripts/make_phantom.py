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
    # also a flat studies folder for MONAI Label (copies of the test subjects' source volumes)
    python scripts/make_phantom.py --output_dir data/phantom_t1t2 --studies_dir data/studies_t1t2

``--studies_dir`` copies each source volume of the ``--studies_section`` list (default ``test``; ``all`` for every
list) to ``<studies_dir>/<subject>_<key>.nii.gz`` (e.g. ``phantom_t1t2_020_t1.nii.gz``): MONAI Label's local
datastore lists only the image files directly in its folder, and writes its own ``labels/`` and
``datastore_v2.json`` there, so it gets a folder of its own, never the data set's. Identical files already there
are kept; a different file of the same name is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import sys
from pathlib import Path

SECTIONS = ("training", "validation", "test")


def _import_phantom_dataset():  # noqa: ANN202 - returns a module
    """Import ``custom_components.apps.phantom_dataset``, adding the repository root to sys.path if needed."""
    try:
        from custom_components.apps import phantom_dataset
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from custom_components.apps import phantom_dataset
    return phantom_dataset


def write_studies(datalist: str | Path, studies_dir: str | Path, section: str = "test",
                  overwrite: bool = False) -> list[Path]:
    """Copy the source volumes of the datalist's ``section`` (or ``"all"``) into the flat folder ``studies_dir``, as
    ``<subject>_<file name>``; return the files of the folder that came from the datalist.

    Refuses a ``studies_dir`` inside the data set's folder (MONAI Label would write its ``labels/`` there), keeps
    identical files, and replaces a different file of the same name only with ``overwrite``.
    """
    datalist = Path(datalist).resolve()
    root, studies = datalist.parent, Path(studies_dir).resolve()
    if studies == root or root in studies.parents:
        raise ValueError(f"--studies_dir {studies} lies inside the data set {root}: give MONAI Label a folder of its "
                         "own (it writes labels/ and datastore_v2.json into its studies folder).")
    sections = SECTIONS if section == "all" else (section,)
    if not set(sections) <= set(SECTIONS):
        raise ValueError(f"--studies_section must be one of {SECTIONS} or 'all', got {section!r}.")
    content = json.loads(datalist.read_text())
    items = [item for s in sections for item in content.get(s, [])]
    if not items:
        raise ValueError(f"{datalist} has no subject in {' or '.join(sections)}: nothing to put in --studies_dir.")
    replace = str(overwrite).strip().lower() in ("true", "1", "yes", "on")  # fire may pass text
    studies.mkdir(parents=True, exist_ok=True)
    written = []
    for item in items:
        source = root / item["source"]
        target = studies / f"{item['subject']}_{source.name}"
        written.append(target)
        if target.exists() and filecmp.cmp(source, target, shallow=False):
            continue
        if target.exists() and not replace:
            raise FileExistsError(f"{target} exists and differs from {source} (pass --overwrite true to replace it).")
        shutil.copyfile(source, target)
    return written


def main(output_dir: str, verbose: bool = True, studies_dir: str | None = None, studies_section: str = "test",
         **options) -> None:
    """Write (or reuse) a phantom data set and print its datalist path (and the studies folder, if asked for).

    Args:
        output_dir: folder to write the data set to.
        verbose: log progress to stderr.
        studies_dir: also copy the source volumes of ``studies_section`` into this flat folder, for MONAI Label's
            ``--studies`` (see the module doc).
        studies_section: ``test`` (default), ``training``, ``validation`` or ``all``.
        options: ``custom_components.apps.phantom_dataset.write_phantom_dataset`` options, with the same names and defaults:
            ``--task`` t1t2 | mrct, ``--n_train`` 16, ``--n_val`` 4, ``--n_test`` 4, ``--shape`` 96,96,48,
            ``--spacing`` 2.0,2.0,3.0, ``--seed`` 0, ``--tumour_mode`` learnable | irreducible (t1t2 only: whether the
            tumour's T2 is a function of its T1, or carries a texture absent from T1), ``--overwrite`` (regenerate and
            replace an existing data set).
    """
    import logging

    if str(verbose).strip().lower() not in ("false", "0", "no", "off"):  # fire passes 'false' as text
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    datalist = _import_phantom_dataset().write_phantom_dataset(output_dir, **options)
    print(datalist)
    if studies_dir is not None:
        files = write_studies(datalist, studies_dir, studies_section, overwrite=options.get("overwrite", False))
        print(f"{Path(studies_dir).resolve()} ({len(files)} studies)")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
