"""End-to-end runs of `python -m monai.bundle run training` on a tiny phantom (slow: a few minutes in all)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom_components.apps.phantom_dataset import ensure_phantom

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EPOCH_LENGTH = 2  # 2 training subjects, batch_size 1
DEFAULT_VARIANT = json.loads((ROOT / "bundle" / "configs" / "train.json").read_text())["variant"]




def _run(phantom, bundle_root, *overrides, check=True):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", "bundle/configs/train.json", "--meta_file", "bundle/configs/metadata.json",
           "--logging_file", "bundle/configs/logging.conf",
           "--bundle_root", str(bundle_root), "--model_dir", str(bundle_root / "models"),
           "--dataset_dir", str(phantom), "--make_phantom", "false", "--variant", "dual_attention", "--adversarial_warmup", "0", "--attention_warmup", "0",
           "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]", "--batch_size", "1",
           "--samples_per_volume", "2", "--val_interval", "1", "--log_every", "1", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_train_writes_model_checkpoints_logs_and_resumes(phantom, tmp_path):
    proc = _run(phantom, tmp_path, "--epochs", "2")
    log = proc.stdout + proc.stderr
    assert "val_psnr" in log and "val_psnr_tumour" in log and "val_ssim" in log
    for term in ("loss_recon", "loss_adv_global", "loss_adv_local", "gradient_penalty", "wasserstein", "confidence_mean"):
        assert term in log
    model = tmp_path / "models" / "model.pt"
    assert model.is_file()
    weights = torch.load(model, weights_only=True)
    assert any(k.startswith("model.") for k in weights)  # the generator's state dict
    ckpt_dir = tmp_path / "runs" / "dual_attention" / "checkpoints"
    final = ckpt_dir / "checkpoint_final.pt"
    state = torch.load(final, weights_only=True)
    assert {"generator", "g_optimizer", "global_critic", "global_optimizer", "local_discriminator",
            "local_optimizer", "trainer"} <= set(state)
    assert state["trainer"]["iteration"] == 2 * EPOCH_LENGTH
    assert list((tmp_path / "runs" / "dual_attention").glob("events.out.tfevents.*"))

    # a fresh run into the same folders refuses to overwrite them
    again = _run(phantom, tmp_path, "--epochs", "2", check=False)
    assert again.returncode != 0 and "--resume true" in again.stdout + again.stderr

    resumed = _run(phantom, tmp_path, "--epochs", "3", "--resume", "true")
    log = resumed.stdout + resumed.stderr
    assert "Restored all variables from" in log and "checkpoint_final.pt" in log
    assert "Epoch[3] Complete" in log and "Epoch[1] Complete" not in log and "Epoch[2] Complete" not in log
    state = torch.load(final, weights_only=True)
    assert state["trainer"]["iteration"] == 3 * EPOCH_LENGTH


@pytest.mark.parametrize("variant", ["unet", "global", "local", "dual"])
def test_every_variant_trains_through_the_bundle(phantom, tmp_path, variant):
    proc = _run(phantom, tmp_path, "--epochs", "1", "--variant", variant)
    log = proc.stdout + proc.stderr
    assert "val_psnr" in log
    state = torch.load(tmp_path / "runs" / variant / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert ("global_critic" in state) == (variant in ("global", "dual"))
    assert ("local_discriminator" in state) == (variant in ("local", "dual"))


def test_default_paths_short_run_saves_its_model_and_evaluate_finds_it(phantom, tmp_path):
    """The README's commands with default paths: a run shorter than the shipped 1920-iteration adversarial warm-up
    still validates and writes runs/<variant>/models/model.pt, and the evaluate command (no --model_dir) reads it
    and writes runs/<variant>/eval/metrics.csv."""
    small = ["--bundle_root", str(tmp_path), "--dataset_dir", str(phantom), "--make_phantom", "false",
             "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]"]
    train = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                            "bundle/configs/train.json", *small, "--epochs", "2", "--batch_size", "1",
                            "--samples_per_volume", "2", "--val_interval", "1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "runs" / DEFAULT_VARIANT
    assert "val_psnr" in train.stdout + train.stderr and (run / "models" / "model.pt").is_file()
    evaluate = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
                               "['bundle/configs/train.json','bundle/configs/evaluate.json']", *small,
                               "--figures", "false"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    rows = (run / "eval" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and "psnr_tumour" in rows[0]  # header + the one test subject


def _run_default_schedule(phantom, bundle_root, *overrides):
    """The bundle as a new user runs it: the shipped phase fractions, no iteration counts given."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json",
           "--logging_file", "bundle/configs/logging.conf", "--bundle_root", str(bundle_root),
           "--dataset_dir", str(phantom), "--make_phantom", "false", "--patch_size", "[32,32]",
           "--generator_channels", "[8,16,32,64]", "--local_channels", "[4,4,8,8]", "--samples_per_volume", "2",
           "--log_every", "1", "--variant", "dual_attention", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_default_schedule_trains_the_discriminators_of_a_two_subject_set(phantom, tmp_path):
    """A fixed 1920-iteration warm-up made dual_attention a silent UNet on small sets; the phases are now fractions
    of the run: 2 subjects, batch 2 -> 1 iteration per epoch, 10 epochs: discriminators from iteration 9."""
    proc = _run_default_schedule(phantom, tmp_path, "--epochs", "10", "--batch_size", "2", "--val_interval", "1")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "the run has 10 epochs x 1 iterations = 10 iterations" in log
    assert "discriminators: from iteration 9 (epoch 9)" in log and "attention: from iteration 9 (epoch 9)" in log
    assert "model selection: validations from epoch 9" in log
    assert "loss_local_discriminator" in log and "loss_global_critic" in log  # the discriminators really trained
    assert "Epoch[8] Metrics" not in log and "Epoch[9] Metrics" in log  # no candidate from the plain-L1 phase
    models = tmp_path / "runs" / "dual_attention" / "models"
    assert {"model.pt", "model_final.pt", "local_discriminator.pt", "local_discriminator_final.pt", "error_head.pt",
            "error_head_final.pt"} <= {p.name for p in models.iterdir()}


def test_a_run_that_would_never_select_a_model_is_refused_before_any_work(phantom, tmp_path):
    proc = _run_default_schedule(phantom, tmp_path, "--epochs", "3", "--batch_size", "1", "--val_interval", "5")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "no validation would select a model" in log and "3 epochs x 2 iterations = 6 iterations" in log
    assert "Epoch[1]" not in log and not (tmp_path / "runs" / "dual_attention" / "checkpoints").exists()


def test_3d_patches_train_with_tumour_and_error_oversampling(phantom, tmp_path):
    proc = _run(phantom, tmp_path, "--epochs", "2", "--spatial_dims", "3", "--patch_size", "[32,16,16]",
                "--generator_channels", "[4,8,16,16]", "--local_channels", "[4,4,8,8]", "--tumour_weight", "4",
                "--hard_sampling", "true", "--error_interval", "1")
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "error-weighted sampling: updated the sampling weights of 2 cached volume(s)" in proc.stdout + proc.stderr


@pytest.mark.parametrize("override,message", [
    (["--variant", "triple"], "variant must be one of"),
    (["--beta", "-1"], "beta must be a number >= 0"),
])
def test_config_errors_are_clear(phantom, tmp_path, override, message):
    proc = _run(phantom, tmp_path, "--epochs", "1", *override, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


def test_bad_datalist_stops_before_training(phantom, tmp_path):
    datalist = json.loads((phantom / "datalist.json").read_text())
    for section in ("training", "validation", "test"):  # absolute paths, so the list can live elsewhere
        for item in datalist[section]:
            item.update({k: str(phantom / v) for k, v in item.items() if k != "subject"})
    first = datalist["training"][0]
    first["target"] = first["target"].replace("t2.nii.gz", "t2_missing.nii.gz")
    (tmp_path / "bad.json").write_text(json.dumps(datalist))
    proc = _run(phantom, tmp_path, "--epochs", "1", "--datalist", str(tmp_path / "bad.json"), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"subject {first['subject']}: target file {first['target']} does not exist" in out
    assert "Epoch[1]" not in out


def test_mr_to_ct_from_mha_files_trains_and_evaluates_in_hu(tmp_path):
    """SynthRAD 2025-style .mha files through the MR->CT config (SimpleITK reader), then evaluation in HU."""
    import SimpleITK as sitk

    ph = tmp_path / "phantom"
    ensure_phantom(ph, task="mrct", n_train=2, n_val=1, n_test=1, shape=(48, 48, 32), seed=4)
    datalist = json.loads((ph / "datalist.json").read_text())
    for section in ("training", "validation", "test"):
        for item in datalist[section]:
            for key in ("source", "target", "mask"):
                mha = str(ph / item[key]).replace(".nii.gz", ".mha")
                sitk.WriteImage(sitk.ReadImage(str(ph / item[key])), mha)
                item[key] = mha
    (tmp_path / "mha.json").write_text(json.dumps(datalist))
    configs = "['bundle/configs/train.json','bundle/configs/mrct.json']"
    proc = _run(ph, tmp_path, "--config_file", configs, "--datalist", str(tmp_path / "mha.json"), "--epochs", "1")
    assert "val_psnr_body" in proc.stdout + proc.stderr
    evaluate = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
         "['bundle/configs/train.json','bundle/configs/mrct.json','bundle/configs/evaluate.json']",
         "--datalist", str(tmp_path / "mha.json"), "--bundle_root", str(tmp_path), "--model_dir", str(tmp_path / "models"),
         "--eval_dir", str(tmp_path / "eval"), "--patch_size", "[32,32]", "--generator_channels", "[8,16,32,64]",
         "--make_phantom", "false", "--figures", "false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    header = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"mae_hu_volume", "mae_hu_foreground", "psnr_hu_foreground", "psnr_foreground"} <= set(header)


def test_an_error_during_training_is_reported_plainly(phantom, tmp_path):
    """Issue 10 (14): an error raised inside the run (the non-finite guard) ends with the plain message, and the
    training library's handlers no longer print its traceback first."""
    proc = _run(phantom, tmp_path, "--epochs", "1", "--lr_g", "1e6", check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ERROR (FloatingPointError): iteration" in log and "is nan" in log
    assert "Traceback" not in log
