"""Where the files of a BraTS or SynthRAD subject live, in each release's folder layout.

* BraTS: one folder per subject, ``<root>/<ID>/<ID>_<t1|t1ce|t2|flair|seg>.nii.gz`` (2018-2021 naming) or
  ``<root>/<ID>/<ID>-<t1n|t1c|t2w|t2f|seg>.nii.gz`` (2023+ naming), detected per folder (:func:`find_brats_files`).
* SynthRAD: ``<root>/<ID>/{mr,ct,mask}.nii.gz`` (2023) or ``.mha`` (2025) (:func:`find_synthrad_files`).

The finders only look at file names; reading and screening the files is :mod:`custom_components.apps.prepare`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BRATS_MODALITIES", "find_brats_files", "find_synthrad_files", "subject_dirs"]

#: Modality option -> (file suffix in BraTS 2018-2021 naming, file suffix in BraTS 2023+ naming).
BRATS_MODALITIES: dict[str, tuple[str, str]] = {
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f"),
    "seg": ("seg", "seg"),
}

#: BraTS naming: layout name -> (separator after the subject id, index into the BRATS_MODALITIES tuples).
_BRATS_LAYOUTS: dict[str, tuple[str, int]] = {"2018-2021": ("_", 0), "2023+": ("-", 1)}

_NIFTI_EXTS = (".nii.gz", ".nii")
_SYNTHRAD_EXTS = (".nii.gz", ".nii", ".mha")


def subject_dirs(root: str | os.PathLike) -> list[Path]:
    """The subject folders of ``root`` (sorted, hidden folders left out); raises if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root {str(root)!r} is not a folder (it should hold one folder per subject).")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"root {str(root)!r} holds no subject folder.")
    return dirs


def _find_with_ext(folder: Path, stem: str, exts: Sequence[str]) -> Path | None:
    for ext in exts:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def find_brats_files(subject_dir: str | os.PathLike, source: str = "t1", target: str = "t2",
                     label: bool = True) -> tuple[dict[str, str], list[str]]:
    """Files of one BraTS subject folder ``<root>/<ID>/``, in 2018-2021 or 2023+ naming (detected per folder).

    Returns ``({"source": path, "target": path, "label": path}, problems)``; ``label`` is left out when
    ``label=False``, and every missing file is a problem naming the expected path.
    """
    folder = Path(subject_dir)
    sid = folder.name
    for name in (source, target):
        if name not in BRATS_MODALITIES or name == "seg":
            raise ValueError(f"BraTS modality must be one of t1, t1ce, t2, flair, got {name!r}.")
    found = {
        layout: sum(_find_with_ext(folder, f"{sid}{sep}{names[i]}", _NIFTI_EXTS) is not None
                    for names in BRATS_MODALITIES.values())
        for layout, (sep, i) in _BRATS_LAYOUTS.items()
    }
    layout = max(found, key=lambda k: found[k])
    if found[layout] == 0:
        return {}, [f"no BraTS image found in {folder} (expected {sid}_<t1|t1ce|t2|flair|seg>.nii.gz, 2018-2021 "
                    f"naming, or {sid}-<t1n|t1c|t2w|t2f|seg>.nii.gz, 2023+ naming)"]
    sep, i = _BRATS_LAYOUTS[layout]
    wanted = {"source": source, "target": target, **({"label": "seg"} if label else {})}
    files, problems = {}, []
    for key, modality in wanted.items():
        stem = f"{sid}{sep}{BRATS_MODALITIES[modality][i]}"
        path = _find_with_ext(folder, stem, _NIFTI_EXTS)
        if path is None:
            expected = folder / f"{stem}.nii.gz"
            problems.append(f"missing {modality} file ({key}): expected {expected} ({layout} naming)")
        else:
            files[key] = str(path)
    return files, problems


def find_synthrad_files(subject_dir: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """Files ``mr``, ``ct`` and ``mask`` of one SynthRAD subject folder (``.nii.gz`` 2023 or ``.mha`` 2025 layout).

    Returns ``({"source": mr, "target": ct, "mask": mask}, problems)``, a problem per missing file.
    """
    folder = Path(subject_dir)
    names = {"source": "mr", "target": "ct", "mask": "mask"}
    counts = {ext: sum((folder / f"{n}{ext}").is_file() for n in names.values()) for ext in _SYNTHRAD_EXTS}
    ext = max(counts, key=lambda e: counts[e])
    if counts[ext] == 0:
        return {}, [f"no SynthRAD image found in {folder} (expected mr, ct and mask as .nii.gz or .mha)"]
    files, problems = {}, []
    for key, name in names.items():
        path = folder / f"{name}{ext}"
        if path.is_file():
            files[key] = str(path)
        else:
            problems.append(f"missing {name} file ({key}): expected {path}")
    return files, problems
