"""Run folders: writable before any work, never overwritten silently, resumable only from a readable checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch

from custom_components.checkpointing import ResumeError
from custom_components.runs import check_run_dirs, check_writable


def test_run_dirs_never_overwrite_silently(tmp_path, caplog):
    ckpt, model = tmp_path / "ckpt", tmp_path / "model.pt"
    ckpt.mkdir()
    check_run_dirs(ckpt, model)  # fresh: fine
    with pytest.raises(ResumeError, match="resume was requested"):
        check_run_dirs(ckpt, model, resume=True)
    (ckpt / "checkpoint_epoch=1.pt").write_bytes(b"x")
    with pytest.raises(ResumeError, match="no readable file"):  # a damaged checkpoint cannot be resumed from
        check_run_dirs(ckpt, model, resume=True)
    torch.save({"trainer": {"iteration": 2, "epoch_length": 2}}, ckpt / "checkpoint_epoch=1.pt")
    with pytest.raises(FileExistsError, match="--resume true"):
        check_run_dirs(ckpt, model)
    with caplog.at_level(logging.INFO, logger="custom_components.runs"):
        check_run_dirs(ckpt, model, resume=True)
    assert f"resuming from {ckpt / 'checkpoint_epoch=1.pt'}" in caplog.text
    with pytest.raises(FileExistsError, match="--resume true"):
        check_run_dirs(ckpt, model, resume="false", overwrite="false")  # command-line text, as the config passes it
    check_run_dirs(ckpt, model, resume="true")
    with pytest.raises(ValueError, match="overwrite"):
        check_run_dirs(ckpt, model, overwrite="maybe")
    check_run_dirs(ckpt, model, overwrite=True)
    assert not list(ckpt.iterdir())


@pytest.mark.parametrize("resume, overwrite", [(True, True), ("true", "true")])
def test_resume_and_overwrite_together_are_refused(tmp_path, resume, overwrite):
    """Issue 17, item 15: '--resume true --overwrite true' silently ignored --overwrite."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"trainer": {"iteration": 2, "epoch_length": 2}}, ckpt / "checkpoint_epoch=1.pt")
    with pytest.raises(ValueError, match="not both"):
        check_run_dirs(ckpt, tmp_path / "model.pt", resume=resume, overwrite=overwrite)
    assert (ckpt / "checkpoint_epoch=1.pt").exists()


def test_unwritable_output_folders_are_named_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError) as e:
        check_writable(output_dir=tmp_path / "ok", ckpt_dir=blocker / "ckpt", model_dir=blocker / "models")
    msg = str(e.value)
    assert f"--ckpt_dir {str(blocker / 'ckpt')!r} cannot be written" in msg and "--model_dir" in msg
    assert "--output_dir" not in msg
    with pytest.raises(PermissionError, match="--model_dir"):
        check_run_dirs(tmp_path / "ckpt", blocker / "models" / "model.pt")
