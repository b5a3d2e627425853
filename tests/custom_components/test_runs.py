"""Run folders: writable before any work, never overwritten silently, resumable only from a readable checkpoint."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from custom_components.handlers.checkpointing import ResumeError
from custom_components.handlers.runs import check_run_dirs, check_writable


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
    with caplog.at_level(logging.INFO, logger="custom_components.handlers.runs"):
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


# ---------------------------------------------------------------------------------------------------------------
# issue 17, items 2, 3 and 13


@pytest.fixture
def release_locks():
    yield
    from custom_components.handlers import runs

    if hasattr(runs, "release_run_locks"):
        runs.release_run_locks()  # the locks this test process took


def _hold_lock_in_another_process(folder):
    import subprocess
    import sys

    code = ("import sys, time; from custom_components.handlers.runs import lock_run_dir; lock_run_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_locked_folder_stops_naming_the_folder_and_the_other_process(tmp_path, caplog,
                                                                                        release_locks):
    """Issue 17, item 2: two trainings into one output_dir both ran, mixing checkpoints and event files."""
    import json
    import signal

    from custom_components.handlers.runs import LOCK_FILE, RunLockedError

    run = tmp_path / "runs" / "unet"
    other = _hold_lock_in_another_process(run)
    try:
        lock = json.loads((run / LOCK_FILE).read_text())
        assert lock["pid"] == other.pid  # the lock holds the PID of its process
        with pytest.raises(RunLockedError) as e:
            check_run_dirs(run / "checkpoints", run / "models" / "model.pt", output_dir=run)
        assert f"run folder {str(run.resolve())!r} (--output_dir) is in use by process {other.pid}" in str(e.value)
        assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())  # nothing written
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    # the lock of a killed process is stale: detected and taken over, with a warning naming that process
    with caplog.at_level(logging.WARNING, logger="custom_components.handlers.runs"):
        check_run_dirs(run / "checkpoints", run / "models" / "model.pt", output_dir=run)
    assert f"taking over the lock left by process {other.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    check_run_dirs(run / "checkpoints", run / "models" / "model.pt", output_dir=run, overwrite=True)  # own lock: fine


def test_every_run_folder_is_locked_and_released_at_exit(tmp_path, release_locks):
    from custom_components.handlers.runs import LOCK_FILE, release_run_locks

    out, models = tmp_path / "out", tmp_path / "elsewhere" / "models"
    check_run_dirs(out / "checkpoints", models / "model.pt", output_dir=out)
    assert (out / LOCK_FILE).is_file() and (models / LOCK_FILE).is_file()  # a model folder outside the run's too
    assert not (out / "checkpoints" / LOCK_FILE).exists()  # inside the locked output folder: no second lock
    release_run_locks()
    assert not (out / LOCK_FILE).exists() and not (models / LOCK_FILE).exists()


def _earlier_run(out):
    (out / "checkpoints").mkdir(parents=True)
    (out / "models").mkdir()
    torch.save({"trainer": {"iteration": 2, "epoch_length": 2}}, out / "checkpoints" / "checkpoint_epoch=1.pt")
    (out / "checkpoints" / "run_config.json").write_text("[]")
    names = ["model.pt", "local_discriminator.pt", "error_head.pt", "model_final.pt", "local_discriminator_final.pt",
             "error_head_final.pt"]
    for name in names:
        torch.save({"w": torch.ones(1)}, out / "models" / name)
    (out / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"old events")
    (out / "generator_rank0.pt").write_bytes(b"old rank weights")
    (out / "notes.txt").write_text("not written by training")
    return names


def test_overwrite_starts_from_a_clean_run_folder(tmp_path, release_locks):
    """Issue 17, item 3: '--overwrite true' removed the checkpoints and model.pt but kept local_discriminator.pt,
    the final weights and the event files of the earlier run."""
    out = tmp_path / "runs" / "dual_attention"
    _earlier_run(out)
    with pytest.raises(FileExistsError, match="--overwrite true"):
        check_run_dirs(out / "checkpoints", out / "models" / "model.pt", output_dir=out)
    check_run_dirs(out / "checkpoints", out / "models" / "model.pt", output_dir=out, overwrite=True,
                   options={"variant": "unet"})
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == [".run.lock", "checkpoints/run_config.json", "notes.txt"]
    assert json.loads((out / "checkpoints" / "run_config.json").read_text())[0]["options"] == {"variant": "unet"}


def test_a_fresh_run_is_refused_when_only_a_discriminator_and_events_are_left(tmp_path, release_locks):
    out = tmp_path / "run"
    _earlier_run(out)
    for f in list((out / "checkpoints").iterdir()) + [out / "models" / "model.pt"]:
        f.unlink()  # checkpoints and model.pt deleted by hand: local_discriminator.pt and events would be mixed in
    with pytest.raises(FileExistsError, match=r"an earlier run left 7 file\(s\)"):
        check_run_dirs(out / "checkpoints", out / "models" / "model.pt", output_dir=out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device, words", [("cuda", "this machine has no usable GPU"), ("cuda:1", "no usable GPU"),
                                           ("gpu", "is not a device name"), ("meta", "runs on cpu or cuda")])
def test_an_unavailable_device_is_named_before_any_work(tmp_path, device, words, release_locks):
    """Issue 17, item 13: '--device cuda' on a CPU machine gave a raw traceback in training."""
    from custom_components.handlers.runs import check_device

    with pytest.raises(ValueError, match=words) as e:
        check_device(device)
    assert f"--device {device}" in str(e.value) or f"--device {device!r}" in str(e.value)
    with pytest.raises(ValueError, match=words):
        check_run_dirs(tmp_path / "ckpt", tmp_path / "models" / "model.pt", device=device)
    assert not (tmp_path / "ckpt").exists()  # checked before any folder is made
    assert str(check_device("cpu")) == "cpu"


def test_overwrite_keeps_the_weights_the_new_run_starts_from(tmp_path, release_locks):
    out = tmp_path / "run"
    _earlier_run(out)
    start = out / "models" / "model.pt"
    check_run_dirs(out / "checkpoints", out / "models" / "model.pt", output_dir=out, overwrite=True,
                   options={"pretrained_generator": str(start)})
    assert start.is_file() and not (out / "models" / "local_discriminator.pt").exists()
