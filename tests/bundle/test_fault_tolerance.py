"""Multi-process (DDP, gloo), kill-and-resume and determinism runs of the training bundle (slow)."""

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

from custom_components.phantom_dataset import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SMALL = ["--make_phantom", "false", "--variant", "dual_attention", "--adversarial_warmup", "0", "--attention_warmup", "0", "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]",
         "--local_channels", "[8,8,16,16]", "--batch_size", "1", "--samples_per_volume", "2", "--log_every", "1",
         "--lr_schedule", "constant"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    ensure_phantom(out, task="t1t2", n_train=4, n_val=2, n_test=1, shape=(48, 48, 32), seed=5)
    return out


def _args(phantom, root):
    return ["--config_file", "bundle/configs/train.json", "--bundle_root", str(root), "--model_dir",
            str(root / "models"), "--dataset_dir", str(phantom), *SMALL]


def test_ddp_two_cpu_processes_keep_identical_weights_and_only_rank0_writes(phantom, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
           *_args(phantom, tmp_path), "--config_file",
           "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']",
           "--epochs", "2", "--val_interval", "1", "--save_rank_weights", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    run = tmp_path / "runs" / "dual_attention"
    ranks = [torch.load(run / f"generator_rank{r}.pt", weights_only=True) for r in (0, 1)]
    params = [k for k in ranks[0] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params and all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)  # synchronised by DDP
    # only rank 0 logs, writes TensorBoard events and checkpoints
    assert log.count("Epoch[1] Metrics") == 1
    writers = {p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")}
    assert len(writers) == 1, writers
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "checkpoint_final.pt", "run_config.json"]
    assert len(json.loads((run / "checkpoints" / "run_config.json").read_text())) == 1  # written once, by rank 0
    state = torch.load(run / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * 2  # 4 subjects over 2 ranks, batch 1: 2 iterations per epoch
    assert (tmp_path / "models" / "model.pt").is_file()


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
