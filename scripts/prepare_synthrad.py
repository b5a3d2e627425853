"""Screen a SynthRAD MR -> CT folder and write a MONAI datalist (``"task": "mrct"``).

Subject folders ``<root>/<ID>/`` hold ``mr``, ``ct`` and ``mask`` as ``.nii.gz`` (SynthRAD 2023) or ``.mha``
(SynthRAD 2025); the layout is detected per folder. Rejected subjects are printed with their reason and listed
under ``"rejected"``; a CT that does not look like Hounsfield units gets a warning.

Example::

    python scripts/prepare_synthrad.py --root /data/SynthRAD2023/Task1/brain --output data/synthrad/datalist.json \
        --seed 0 --workers 4
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def prepare_synthrad(root: str, output: str, fractions: Sequence[float] = (0.56, 0.17, 0.27), seed: int = 0,
                     workers: int = 1, paper_split: bool = True, atol: float = 1e-3, hu_min: float = -900.0,
                     overwrite: bool = False) -> None:
    """Write the SynthRAD datalist ``output`` and print the screening and split report.

    Args:
        root: folder holding one folder per subject.
        output: datalist JSON to write (refused if it exists, unless ``--overwrite true``).
        fractions: training,validation,test fractions used below 354 subjects (e.g. ``--fractions 0.6,0.2,0.2``).
        seed: seed of the split.
        workers: screening processes.
        paper_split: with >= 354 subjects use the 200/60/94 split (extra subjects go to test).
        atol: tolerance when comparing the affines of a subject's files.
        hu_min: warn when a CT has no voxel below this value (no air near -1000 HU: not in Hounsfield units?).
        overwrite: replace an existing datalist.
    """
    import logging

    from custom_components.apps.prepare import format_report
    from custom_components.apps.prepare import prepare_synthrad as run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    datalist = run(root, output, fractions=fractions, seed=seed, workers=workers, paper_split=paper_split,
                   atol=atol, hu_min=hu_min, overwrite=overwrite)
    print(format_report(datalist, output))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fire

    fire.Fire(prepare_synthrad)
