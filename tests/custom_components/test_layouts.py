from __future__ import annotations

import pytest

from custom_components.utils.layouts import find_brats_files, find_synthrad_files, subject_dirs


def test_subject_dirs_lists_visible_folders(tmp_path):
    for name in ("b", "a", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").touch()
    assert [p.name for p in subject_dirs(tmp_path)] == ["a", "b"]
    with pytest.raises(ValueError, match="is not a folder"):
        subject_dirs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no subject folder"):
        subject_dirs(tmp_path / "empty")


@pytest.mark.parametrize("sid, sep, names", [
    ("BraTS2021_00001", "_", {"t1": "t1", "t2": "t2", "flair": "flair", "seg": "seg"}),
    ("BraTS-GLI-00001-000", "-", {"t1": "t1n", "t2": "t2w", "flair": "t2f", "seg": "seg"}),
])
def test_find_brats_files_in_both_namings(tmp_path, sid, sep, names):
    folder = tmp_path / sid
    folder.mkdir()
    for name in names.values():
        (folder / f"{sid}{sep}{name}.nii.gz").touch()
    files, problems = find_brats_files(folder, "t1", "flair")
    assert not problems
    assert files == {k: str(folder / f"{sid}{sep}{names[m]}.nii.gz") for k, m in
                     (("source", "t1"), ("target", "flair"), ("label", "seg"))}
    files, problems = find_brats_files(folder, "t1ce", "t2")
    assert len(problems) == 1 and "missing t1ce" in problems[0]
    assert "label" not in find_brats_files(folder, "t1", "t2", label=False)[0]
    with pytest.raises(ValueError, match="seg"):
        find_brats_files(folder, "seg", "t2")


def test_find_synthrad_files(tmp_path):
    for name in ("mr", "ct", "mask"):
        (tmp_path / "a" / f"{name}.mha").parent.mkdir(exist_ok=True)
        (tmp_path / "a" / f"{name}.mha").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mr.nii.gz").touch()
    files, problems = find_synthrad_files(tmp_path / "a")
    assert files["target"].endswith("ct.mha") and not problems
    files, problems = find_synthrad_files(tmp_path / "b")
    assert list(files) == ["source"] and [p.split(":")[0] for p in problems] == ["missing ct file (target)",
                                                                               "missing mask file (mask)"]
    (tmp_path / "c").mkdir()
    assert "no SynthRAD image" in find_synthrad_files(tmp_path / "c")[1][0]
