"""Screen a BraTS folder and write a MONAI datalist for source -> target synthesis (e.g. T1 -> T2).

Subject folders ``<root>/<ID>/`` in 2018-2021 naming (``<ID>_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair``,
``_seg``) or 2023+ naming (``<ID>-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg``) are detected per folder.
Rejected subjects (among them labels outside the BraTS values {0, 1, 2, 3, 4}, or marking most of the brain as
tumour) are printed with their reason and listed under ``"rejected"`` in the datalist; brain masks are written to
``<output folder>/masks/<ID>_<a>_<b>_mask.nii.gz``, named by the two modalities they are derived from, so datalists
of other modality pairs in one folder never share a mask file.

Example::

    python scripts/prepare_brats.py --root /data/BraTS2021_Training_Data --output data/brats/datalist.json \
        --source t1 --target t2 --seed 0 --workers 4
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def prepare_brats(root: str, output: str, source: str = "t1", target: str = "t2",
                  fractions: Sequence[float] = (0.56, 0.17, 0.27), seed: int = 0, workers: int = 1,
                  paper_split: bool = True, label: bool = True, atol: float = 1e-3, overwrite: bool = False) -> None:
    """Write the BraTS datalist ``output`` and print the screening and split report.

    Args:
        root: folder holding one folder per subject.
        output: datalist JSON to write (refused if it exists, unless ``--overwrite true``).
        source: source modality: t1, t1ce, t2 or flair.
        target: target modality: t1, t1ce, t2 or flair.
        fractions: training,validation,test fractions used below 354 subjects (e.g. ``--fractions 0.6,0.2,0.2``).
        seed: seed of the split.
        workers: screening processes.
        paper_split: with >= 354 subjects use the paper's 200/60/94 split (extra subjects go to test).
        label: require and include the tumour segmentation.
        atol: tolerance when comparing the affines of a subject's files.
        overwrite: replace an existing datalist.
    """
    import logging

    from custom_components.apps.prepare import format_report
    from custom_components.apps.prepare import prepare_brats as run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    datalist = run(root, output, source=source, target=target, fractions=fractions, seed=seed, workers=workers,
                   paper_split=paper_split, label=label, atol=atol, overwrite=overwrite)
    print(format_report(datalist, output))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fire

    fire.Fire(prepare_brats)
