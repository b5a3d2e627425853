"""Kill-and-resume and determinism runs of the training bundle (slow); the DDP run is in test_multi_gpu_config.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from custom_components.apps.phantom_dataset import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SMALL = ["--make_phantom", "false", "--variant", "dual_attention", "--adversarial_warmup", "0", "--attention_warmup", "0", "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]",
         "--local_channels", "[8,8,16,16]", "--batch_size", "1", "--samples_per_volume", "2", "--log_every", "1",
         "--lr_schedule", "constant"]


PHANTOM = {"n_train": 4, "n_val": 2, "n_test": 1, "seed": 5}  # a larger phantom than the default (conftest.py)


def _args(phantom, root):
    return ["--config_file", "bundle/configs/train.json", "--bundle_root", str(root), "--model_dir",
            str(root / "models"), "--dataset_dir", str(phantom), *SMALL]


def test_sigkill_then_resume_loses_at_most_one_interval(phantom, tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", *_args(phantom, tmp_path), "--epochs", "60",
           "--val_interval", "60"]  # the only validation at the end, never reached before the kill
    ckpt = tmp_path / "runs" / "dual_attention" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(ckpt.glob("checkpoint_epoch=*.pt"))) < 2:
            time.sleep(0.2)
        time.sleep(1.3)  # somewhere inside a later epoch, possibly during a save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = sorted(ckpt.glob("checkpoint_epoch=*.pt"), key=lambda p: p.stat().st_mtime)
    assert saved, "no checkpoint was written before the kill"
    last_epoch = int(re.search(r"epoch=(\d+)", saved[-1].name).group(1))
    state = torch.load(saved[-1], weights_only=True)  # the latest checkpoint is complete and loadable
    assert state["trainer"]["iteration"] == last_epoch * 4  # 4 subjects, batch 1
    resumed = subprocess.run([*cmd[:-4], "--epochs", str(last_epoch + 1), "--val_interval", str(last_epoch + 1),
                              "--resume", "true"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert "Restored all variables" in log and f"Epoch[{last_epoch + 1}] Complete" in log
    assert f"Epoch[{last_epoch}] Complete" not in log
    final = torch.load(ckpt / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == (last_epoch + 1) * 4


def _losses(log: str) -> list[str]:
    return re.findall(r"Iter: \d+/\d+ -- (.*)", log)


def test_same_seed_same_losses(phantom, tmp_path):
    runs = []
    for i in range(2):
        root = tmp_path / f"run{i}"
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", *_args(phantom, root),
                               "--epochs", "2", "--val_interval", "2", "--seed", "7"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(_losses(proc.stdout + proc.stderr))
    assert len(runs[0]) == 8 and runs[0] == runs[1]
    other = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", *_args(phantom, tmp_path / "o"),
                            "--epochs", "1", "--val_interval", "1", "--seed", "8"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert _losses(other.stdout + other.stderr)[:2] != runs[0][:2]


def _train(phantom, root, *overrides):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", *_args(phantom, root), *map(str, overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, proc.stdout + proc.stderr


def test_resume_keeps_best_model_last_n_checkpoints_and_checks_options(phantom, tmp_path):
    """Issue 10, items 1-3, through the real config: a worse resumed run must not replace model.pt, resume picks
    the checkpoint by its stored iteration, "keep 2" holds across resumes, changed options are refused or applied."""
    proc, log = _train(phantom, tmp_path, "--epochs", 2, "--val_interval", 1)
    assert proc.returncode == 0, log[-4000:]
    ckpt, model = tmp_path / "runs" / "dual_attention" / "checkpoints", tmp_path / "models" / "model.pt"
    best = model.read_bytes()
    # sabotage the generator in the checkpoints, so every later validation is worse than the best so far,
    # and reorder the file times as a plain copy does (epoch 1 looks newest)
    for name in ("checkpoint_epoch=2.pt", "checkpoint_final.pt"):
        state = torch.load(ckpt / name, weights_only=True)
        state["generator"] = {k: torch.zeros_like(v) for k, v in state["generator"].items()}
        torch.save(state, ckpt / name)
    for i, name in enumerate(["checkpoint_final.pt", "checkpoint_epoch=2.pt", "checkpoint_epoch=1.pt"]):
        os.utime(ckpt / name, (1000 + i, 1000 + i))

    refused, log = _train(phantom, tmp_path, "--epochs", 3, "--val_interval", 1, "--resume", "true", "--lr_g", "1e6")
    assert refused.returncode != 0
    assert "1 option(s) differ from the checkpointed run" in log and "lr_g: 0.001 in the checkpointed run, 1000000.0 now" in log
    assert "--apply_changes true" in log and "Epoch[3]" not in log

    # a learning rate too small for the zeroed generator to recover: its validation stays worse than the best
    proc, log = _train(phantom, tmp_path, "--epochs", 3, "--val_interval", 1, "--resume", "true", "--lr_g", "1e-9",
                       "--apply_changes", "true")
    assert proc.returncode == 0, log[-4000:]
    assert "applying changed option lr_g: 0.001 in the checkpointed run, 1e-09 now" in log
    assert "Epoch[3] Complete" in log and "Epoch[2] Complete" not in log  # resumed from epoch 2, not epoch 1
    assert model.read_bytes() == best  # the worse resumed run did not replace the best model
    assert sorted(p.name for p in ckpt.glob("checkpoint_*.pt")) == [
        "checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "checkpoint_final.pt"]
    final = torch.load(ckpt / "checkpoint_final.pt", weights_only=True)
    assert final["g_optimizer"]["param_groups"][0]["lr"] == 1e-9
    assert final["best_metric"]["best_metric_epoch"] in (1, 2)
    history = json.loads((ckpt / "run_config.json").read_text())
    assert [h["options"]["lr_g"] for h in history] == [0.001, 1e-9]


KILL_ARGS = ["--make_phantom", "false", "--variant", "dual_attention", "--adversarial_warmup", "0", "--attention_warmup", "0", "--patch_size", "[32,16]", "--generator_channels", "[4,8,8,8]",
             "--local_channels", "[4,4,4,4]", "--batch_size", "1", "--samples_per_volume", "1", "--log_every", "1",
             "--val_interval", "1", "--cache_rate", "1.0", "--lr_schedule", "constant"]


def test_random_sigkills_lose_nothing(tmp_path_factory, tmp_path):
    """Issue 10: SIGKILL at random moments (at least 10 times), resume each time, then check the run."""
    import random

    data = tmp_path_factory.mktemp("kill_phantom")
    ensure_phantom(data, task="t1t2", n_train=2, n_val=1, n_test=1, shape=(32, 32, 32), seed=11)
    epochs, epoch_length = 20, 2
    base = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json",
            "--bundle_root", str(tmp_path), "--model_dir", str(tmp_path / "models"), "--dataset_dir", str(data),
            *KILL_ARGS]
    ckpt, models = tmp_path / "runs" / "dual_attention" / "checkpoints", tmp_path / "models"
    rng, kills, runs = random.Random(0), 0, 0
    while True:
        has_ckpt = any(ckpt.glob("checkpoint_*.pt"))
        done = max((int(re.search(r"=(\d+)", p.name).group(1)) for p in ckpt.glob("checkpoint_epoch=*.pt")), default=0)
        if done >= epochs:  # killed after the last epoch's save: a resume would be refused as finished, so go on
            epochs += 10
        cmd = base + ["--epochs", str(epochs)] + (["--resume", "true"] if has_ckpt else ["--overwrite", "true"])
        log_file = tmp_path / f"log{runs}.txt"
        runs += 1
        with open(log_file, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if kills < 10:
                deadline = time.time() + 300
                while time.time() < deadline and proc.poll() is None and "Epoch[" not in log_file.read_text():
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 2.0))  # anywhere in training, validation or a save
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
            proc.wait(timeout=600)
        text = log_file.read_text()
        if proc.returncode == 0 and kills >= 10:
            break
        if proc.returncode == 0:  # finished before enough kills: train on (epochs may change on a resume)
            epochs += 10
            continue
        assert proc.returncode == -signal.SIGKILL, text[-4000:]  # only our kills may stop a run
        assert runs < 40, "the run makes no progress between kills"
    assert kills >= 10
    final_log = text
    assert f"Epoch[{epochs}] Complete" in final_log

    leftovers = [p.name for d in (ckpt, models) for p in d.iterdir() if p.name.startswith((".", "tmp"))]
    assert leftovers == []
    for f in ckpt.glob("checkpoint_*.pt"):
        state = torch.load(f, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["generator"].values() if v.is_floating_point())
    assert sorted(p.name for p in ckpt.glob("checkpoint_*.pt")) == sorted([  # both sorted as text: 99 vs 100
        f"checkpoint_epoch={epochs - 1}.pt", f"checkpoint_epoch={epochs}.pt", "checkpoint_final.pt"])
    final = torch.load(ckpt / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == epochs * epoch_length
    best = final["best_metric"]["best_metric"]

    # model.pt, evaluated again, scores the recorded best, and no validation of the last run did better
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
    parser.update({"bundle_root": str(tmp_path), "model_dir": str(models), "dataset_dir": str(data),
                   "make_phantom": False, "variant": "dual_attention", "adversarial_warmup": 0, "attention_warmup": 0, "patch_size": [32, 16], "generator_channels": [4, 8, 8, 8],
                   "local_channels": [4, 4, 4, 4], "validate#handlers": [], "device": "cpu"})
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    assert evaluator.state.metrics["val_psnr"] >= best - 1e-4
    last_run = [float(v) for v in re.findall(r"val_psnr: ([0-9.]+)", final_log)]
    assert last_run and max(last_run) <= best + 5e-5  # the log prints 4 decimals: 13.940157 shows as 13.9402


# ---------------------------------------------------------------------------------------------------------------
# issue 17: locks, clean overwrites, plain errors, inference and export killed and rerun


def _bundle(*args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc, proc.stdout + proc.stderr


def test_a_second_training_into_a_running_one_stops_naming_the_folder_and_the_process(phantom, tmp_path):
    """Item 2: two trainings started 3 s apart into one output_dir both exited 0, the second replacing the first's
    checkpoints and mixing their event files."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", *_args(phantom, tmp_path), "--epochs", "100",
           "--val_interval", "100"]
    lock = tmp_path / "runs" / "dual_attention" / ".run.lock"
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not lock.exists() and first.poll() is None:
            time.sleep(0.2)
        assert lock.exists(), "the first run took no lock"
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    log = second.stdout + second.stderr
    assert second.returncode != 0
    assert f"ERROR (RunLockedError): run folder '{tmp_path.resolve()}" in log and f"in use by process {first.pid}" in log
    assert "Traceback" not in log and "Epoch[1]" not in log
    # the killed run's lock is stale: a resume takes it over and goes on
    resumed, log = _bundle("run", "training", *_args(phantom, tmp_path), "--epochs", "1", "--val_interval", "1",
                           "--overwrite", "true")
    assert resumed.returncode == 0, log[-3000:]
    assert f"taking over the lock left by process {first.pid}" in log
    assert not lock.exists()  # released when the run ended


def test_overwrite_leaves_nothing_of_the_earlier_run_and_promote_reads_only_the_new_one(phantom, tmp_path):
    """Item 3: '--overwrite true --variant unet' over a dual_attention run kept local_discriminator.pt and the event
    files; inference then wrote the old discriminator's map and promote shipped it with val_qa metrics of the old
    run."""
    import importlib.util

    run = tmp_path / "run"
    common = ["--config_file", "bundle/configs/train.json", "--bundle_root", str(tmp_path), "--dataset_dir",
              str(phantom), "--make_phantom", "false", "--output_dir", str(run), "--model_dir", str(run / "models"),
              "--adversarial_warmup", "0", "--attention_warmup", "0", "--patch_size", "[32,32]", "--batch_size", "1",
              "--samples_per_volume", "1", "--epochs", "1", "--val_interval", "1", "--lr_schedule", "constant"]
    proc, log = _bundle("run", "training", *common, "--variant", "dual_attention")
    assert proc.returncode == 0, log[-3000:]
    assert (run / "models" / "local_discriminator.pt").is_file()
    old_events = sorted(run.glob("events.out.tfevents.*"))
    time.sleep(1.1)  # event files are named by the second they were created in
    proc, log = _bundle("run", "training", *common, "--variant", "unet", "--overwrite", "true")
    assert proc.returncode == 0, log[-3000:]
    models = sorted(p.name for p in (run / "models").iterdir())
    assert models == ["error_head.pt", "error_head_final.pt", "model.pt", "model_final.pt"], models
    assert not set(old_events) & set(run.glob("events.out.tfevents.*"))
    assert [h["options"]["variant"] for h in json.loads((run / "checkpoints" / "run_config.json").read_text())] == ["unet"]

    spec = importlib.util.spec_from_file_location("export_bundle", ROOT / "scripts" / "export_bundle.py")
    export_bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_bundle)
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundle", bundle, ignore=shutil.ignore_patterns("runs", "eval", "data", "inference", "*.pt"))
    metrics = export_bundle.promote(str(run), bundle_dir=str(bundle))
    assert sorted(p.name for p in (bundle / "models").glob("*.pt")) == ["error_head.pt", "model.pt"]
    assert not any(k.startswith("val_local_") for k in metrics), metrics  # only a dual_attention run has those


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_on_a_cpu_machine_is_one_plain_line(phantom, tmp_path):
    """Item 13: a raw traceback in training, and 'the file is truncated' about the weights in inference."""
    infer = ["run", "inferring", "--config_file", "bundle/configs/inference.json", "--input", str(phantom / "datalist.json"),
             "--output_dir", str(tmp_path / "out"), "--device", "cuda"]
    proc, log = _bundle(*infer)
    assert proc.returncode != 0 and "ERROR (ValueError): --device cuda: this machine has no usable GPU" in log
    assert "truncated" not in log and "Traceback" not in log
    # training: checked by check_run_dirs (train.json's check_outputs passes it the device)
    proc, log = _bundle("run", "training", *_args(phantom, tmp_path), "--epochs", "1", "--val_interval", "1", "--device", "cuda")
    assert proc.returncode != 0 and "ERROR (ValueError): --device cuda: this machine has no usable GPU" in log
    assert "Traceback" not in log and not (tmp_path / "runs").exists()


def test_evaluating_before_training_is_one_plain_line_naming_the_missing_file(phantom, tmp_path):
    """Item 14: the right message ('set --model_dir') was on line 25 of a 73-line traceback."""
    proc, log = _bundle("run", "evaluating", "--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']",
                        "--bundle_root", str(tmp_path), "--dataset_dir", str(phantom), "--make_phantom", "false",
                        "--eval_section", "test")
    model = tmp_path / "runs" / json.loads((ROOT / "bundle" / "configs" / "train.json").read_text())["variant"] / \
        "models" / "model.pt"
    assert proc.returncode != 0
    assert f"ERROR (FileNotFoundError): generator weights '{model}' do not exist (set --model_dir" in log
    assert "Traceback" not in log


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB file system (tmpfs): room for two checkpoints of the run below (8.2 MB each) but not three, or a
    skip where mounting is not allowed."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_during_a_checkpoint_is_one_plain_line_and_nothing_is_lost(tmp_path, tmp_path_factory, small_disk):
    """Item 14: disk full during a checkpoint ended in a 142-line traceback with no plain ERROR line."""
    data = tmp_path_factory.mktemp("disk_phantom")
    ensure_phantom(data, task="t1t2", n_train=2, n_val=1, n_test=1, shape=(32, 32, 32), seed=11)
    proc, log = _bundle("run", "training", "--config_file", "bundle/configs/train.json", "--bundle_root", str(tmp_path),
                        "--model_dir", str(tmp_path / "models"), "--dataset_dir", str(data), *KILL_ARGS,
                        "--error_head_channels", "[4,4,8,8]", "--ckpt_dir", str(small_disk), "--epochs", "10")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    error = next(line for line in lines if line.startswith("ERROR ("))
    assert error.startswith(f"ERROR (CheckpointWriteError): could not write {small_disk}/checkpoint_")
    assert "(the disk is full" in error or "is the disk full?" in error
    assert "Traceback" not in log and lines[-1].startswith("(raised in custom_components/handlers/checkpointing.py")
    saved = sorted(small_disk.glob("checkpoint_epoch=*.pt"))
    assert saved and not list(small_disk.glob(".*"))  # earlier checkpoints kept, no partial file
    for f in saved:
        torch.load(f, weights_only=True)


def _tiny_models(folder):
    from monai.bundle import ConfigParser

    from custom_components.config.paths import config_files

    folder.mkdir(parents=True)
    parser = ConfigParser()
    parser.read_config(config_files(ROOT / "bundle", "infer"))
    parser.update({"generator_channels": [4, 8, 16, 16], "error_head_channels": [4, 4, 8, 8], "device": "cpu",
                   "save_confidence": True, "uses_error_head": True, "bundle_root": str(folder.parent)})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    torch.save(parser.get_parsed_content("error_predictor").state_dict(), folder / "error_head.pt")
    return ["--model_dir", str(folder), "--generator_channels", "[4,8,16,16]", "--error_head_channels", "[4,4,8,8]"]


def _writers_are_atomic(config) -> bool:
    """Whether every SaveImaged of the inference config writes under a temporary name
    (:class:`custom_components.apps.writers.AtomicNibabelWriter` or a subclass): the property the kill test relies on."""
    from pydoc import locate

    from monai.bundle import ConfigParser

    from custom_components.apps.writers import AtomicNibabelWriter

    parser = ConfigParser()
    parser.read_config(config)
    savers = [t for t in parser.get("postprocessing")["transforms"] if isinstance(t, dict) and t.get("_target_") == "SaveImaged"]
    writers = [locate(t["writer"]) if isinstance(t.get("writer"), str) else None for t in savers]
    return len(savers) == 2 and all(isinstance(w, type) and issubclass(w, AtomicNibabelWriter) for w in writers)


def _kill_at_a_random_moment(proc, started, rnd, pause: float, wait: float, poll: float) -> bool:
    """Wait (at most ``wait`` s) until ``started()`` or the process ends, then a random ``[0, pause]`` s more, then
    SIGKILL ``proc`` if it still runs; True if it was killed."""
    deadline = time.time() + wait
    while time.time() < deadline and proc.poll() is None and not started():
        time.sleep(poll)
    time.sleep(rnd.uniform(0.0, pause))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return True


class _ProgressTrigger:
    """True once the inference log shows the start of input ``j`` of the ``k`` left, with ``j`` drawn at random
    among the inputs that still have another one after them (so work remains when the kill comes)."""

    def __init__(self, log, rnd):
        self.log, self.rnd, self.target = log, rnd, None

    def __call__(self) -> bool:
        found = re.findall(r"inference (\d+)/(\d+):", self.log.read_text())
        if not found:
            return False
        if self.target is None:
            left = int(found[0][1])
            self.target = self.rnd.randint(1, max(1, left - 1))
        return any(int(j) >= self.target for j, _ in found)


def _readable(path):
    import nibabel as nib
    import numpy as np

    try:
        return bool(np.isfinite(nib.load(str(path)).get_fdata()).all())
    except Exception:  # noqa: BLE001 - any failure to read counts as unreadable
        return False


def test_inference_killed_at_random_moments_then_rerun_completes_every_output(tmp_path):
    """Item 4: SIGKILL during inference left a 0-byte *_synthetic.nii.gz that the rerun skipped as done."""
    import random

    import nibabel as nib
    import numpy as np

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for n in range(6):
        nib.save(nib.Nifti1Image((rng.random((48, 48, 32)) * 500).astype(np.float32), np.eye(4)), str(inp / f"s{n}.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), str(inp / "tiny.nii.gz"))  # item 9
    config = str(ROOT / "bundle" / "configs" / "inference.json")
    assert _writers_are_atomic(config)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", config, "--input", str(inp),
           "--output_dir", str(out), *_tiny_models(tmp_path / "models"), "--patch_size", "[32,32]"]
    finals = [out / f"s{n}_{kind}.nii.gz" for n in range(6) for kind in ("synthetic", "confidence")]
    rnd, kills = random.Random(1), 0
    for attempt in range(8):
        with open(tmp_path / f"log{attempt}.txt", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            started = _ProgressTrigger(tmp_path / f"log{attempt}.txt", rnd)
            kills += _kill_at_a_random_moment(proc, started, rnd, pause=0.4, wait=300, poll=0.02)
            proc.wait(timeout=120)
        # whatever moment the kill hit, no file under a final name is incomplete
        assert all(_readable(f) for f in finals if f.exists()), [f.name for f in finals if f.exists() and not _readable(f)]
        if all(f.exists() for f in finals):
            if kills >= 2:
                break
            # a fast machine finished the rest before the kill: take two subjects' outputs away and go on, so the
            # test always sees at least two kills (the property is the same: a rerun completes what is missing)
            for f in finals[:4]:
                f.unlink()
    assert kills >= 2
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode != 0 and "1 of 7 input(s) could not be synthesised" in log  # only the tiny one
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [Path(f["file"]).name for f in summary["failed"]] == ["tiny.nii.gz"]
    assert "its slices are 16 x 16 voxels" in summary["failed"][0]["reason"]
    done = sorted(Path(f).name for f in summary["synthesised"]) + sorted(Path(f["file"]).name for f in summary["skipped"])
    assert sorted(done) == [f"s{n}.nii.gz" for n in range(6)]
    assert all(_readable(f) for f in finals)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_export_killed_at_random_moments_then_rerun_completes(tmp_path):
    """Item 4 (and 5): SIGKILL during `export_bundle.py export`, then a rerun that completes the release."""
    import random
    import zipfile

    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundle", bundle, ignore=shutil.ignore_patterns("runs", "eval", "data", "inference"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    out = tmp_path / "release"
    final_zip, final_dir = out / f"{meta['name']}_v{meta['version']}.zip", out / meta["name"]
    cmd = [sys.executable, "scripts/export_bundle.py", "export", "--output_dir", str(out), "--bundle_dir", str(bundle)]
    rnd, kills = random.Random(2), 0
    for _ in range(4):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += _kill_at_a_random_moment(proc, lambda: any(out.glob(".*")), rnd, pause=0.3, wait=120, poll=0.005)
        proc.wait(timeout=60)
        if final_zip.exists():  # a complete release, or nothing, under the final names
            assert zipfile.ZipFile(final_zip).testzip() is None and final_dir.is_dir()
            break
    assert kills >= 1
    proc = subprocess.run(cmd + (["--overwrite", "true"] if final_zip.exists() else []), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert zipfile.ZipFile(final_zip).testzip() is None and (final_dir / "models" / "model.pt").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
