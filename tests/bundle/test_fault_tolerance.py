"""Multi-process (DDP, gloo), kill-and-resume and determinism runs of the training bundle (slow)."""

from __future__ import annotations

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

from custom_components.phantom import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SMALL = ["--make_phantom", "false", "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]",
         "--local_channels", "[8,8,16,16]", "--batch_size", "1", "--samples_per_volume", "2", "--log_every", "1"]


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
        "checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "checkpoint_final.pt"]
    state = torch.load(run / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * 2  # 4 subjects over 2 ranks, batch 1: 2 iterations per epoch
    assert (tmp_path / "models" / "model.pt").is_file()


def test_sigkill_then_resume_loses_at_most_one_interval(phantom, tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", *_args(phantom, tmp_path), "--epochs", "60",
           "--val_interval", "100"]
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
    resumed = subprocess.run([*cmd[:-4], "--epochs", str(last_epoch + 1), "--val_interval", "100", "--resume", "true"],
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
                               "--epochs", "2", "--val_interval", "100", "--seed", "7"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(_losses(proc.stdout + proc.stderr))
    assert len(runs[0]) == 8 and runs[0] == runs[1]
    other = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", *_args(phantom, tmp_path / "o"),
                            "--epochs", "1", "--val_interval", "100", "--seed", "8"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert _losses(other.stdout + other.stderr)[:2] != runs[0][:2]
