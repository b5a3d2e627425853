"""The training bundle under a memory budget: a budget too small to cache anything trains from the disk cache, with
the same results as the run that holds everything in RAM (slow: two short trainings)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from custom_components.apps.phantom_dataset import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(phantom, bundle_root, *overrides):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", "bundle/configs/train.json", "--meta_file", "bundle/configs/metadata.json",
           "--logging_file", "bundle/configs/logging.conf",
           "--bundle_root", str(bundle_root), "--model_dir", str(bundle_root / "models"),
           "--dataset_dir", str(phantom), "--make_phantom", "false", "--variant", "unet", "--adversarial_warmup", "0",
           "--attention_warmup", "0", "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]",
           "--batch_size", "1", "--samples_per_volume", "2", "--val_interval", "1", "--log_every", "1",
           "--epochs", "2", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _metrics(log):
    return re.findall(r"(val_\w+): (-?[0-9.]+(?:e-?\d+)?)", log)


def test_a_budget_too_small_for_one_subject_trains_from_disk_like_the_run_in_ram(tmp_path):
    phantom = tmp_path / "phantom"
    ensure_phantom(phantom, task="t1t2", n_train=2, n_val=1, n_test=0, shape=(48, 48, 32), seed=3)
    ram = _run(phantom, tmp_path / "ram")
    assert "training data: 2 subjects" in ram and "2 cached in RAM" in ram
    disk = _run(phantom, tmp_path / "disk", "--cache_memory_gb", "0")
    assert "0 cached in RAM" in disk and "2 from the disk cache" in disk and "1 from the disk cache" in disk
    assert len(list((tmp_path / "disk" / "runs" / "cache").glob("*.pt"))) == 3  # 2 training + 1 validation
    # the same patches, steps and validation (in the original geometry): the same figures
    assert _metrics(ram) and _metrics(ram) == _metrics(disk)
    assert re.findall(r"loss: ([0-9.]+)", ram) == re.findall(r"loss: ([0-9.]+)", disk)
