"""`run inferring` with inference.json, TorchScript export, and verify_net_in_out (bundle CLI in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "bundle" / "configs" / "inference.json"
META = ROOT / "bundle" / "configs" / "metadata.json"
SMALL = ["--generator_channels", "[4,8,16,16]", "--local_channels", "[4,4,8,8]", "--patch_size", "[32,32]"]


def _bundle(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Randomly initialised generator and local discriminator saved as the training run saves them."""
    out = tmp_path_factory.mktemp("models")
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update({"generator_channels": [4, 8, 16, 16], "local_channels": [4, 4, 8, 8], "save_confidence": True,
                   "device": "cpu"})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), out / "model.pt")
    torch.save(parser.get_parsed_content("local_discriminator").state_dict(), out / "local_discriminator.pt")
    return out


def _volume(path, shape=(37, 29, 11), affine=None, value=None):
    rng = np.random.default_rng(1)
    data = rng.random(shape).astype(np.float32) * 800 if value is None else np.asarray(value, dtype=np.float32)
    if affine is None:  # LPS-like: first two axes flipped, anisotropic spacing, off-centre origin
        affine = np.array([[-1.1, 0, 0, 30.0], [0, -0.9, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


def test_odd_sized_volume_keeps_shape_affine_and_gives_confidence(models, tmp_path):
    inp = tmp_path / "in" / "case01"
    inp.mkdir(parents=True)
    data, affine = _volume(inp / "t1.nii.gz")
    out = tmp_path / "out"
    _bundle("run", "inferring", "--config_file", CONFIG, "--input", tmp_path / "in", "--model_dir", models,
            "--output_dir", out, *SMALL)
    syn = nib.load(out / "case01" / "t1_synthetic.nii.gz")
    conf = nib.load(out / "case01" / "t1_confidence.nii.gz")
    assert syn.shape == data.shape and conf.shape == data.shape
    np.testing.assert_allclose(syn.affine, affine, atol=1e-5)
    np.testing.assert_allclose(conf.affine, affine, atol=1e-5)
    c = conf.get_fdata()
    assert c.min() >= 0 and c.max() <= 1 and np.isfinite(c).all()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["failed"] == [] and len(summary["synthesised"]) == 1


def test_ct_output_is_in_hounsfield_units_and_round_trips(tmp_path):
    """An identity 'generator' with the CT window on both sides must give back the input HU exactly."""
    (tmp_path / "models").mkdir()
    torch.save({}, tmp_path / "models" / "model.pt")
    inp = tmp_path / "in"
    inp.mkdir()
    hu = np.linspace(-1024, 3000, 24 * 16 * 8, dtype=np.float32).reshape(24, 16, 8)
    _volume(inp / "ct.nii.gz", value=hu)
    _bundle("run", "inferring", "--config_file", CONFIG, "--input", inp, "--model_dir", tmp_path / "models",
            "--output_dir", tmp_path / "out", "--network_def", "{'_target_': 'torch.nn.Identity'}",
            "--save_confidence", "false", "--target_window", "[-1024,3000]",
            "--source_intensity#a_min", "-1024", "--source_intensity#a_max", "3000", "--patch_size", "[16,16]")
    out = nib.load(tmp_path / "out" / "ct_synthetic.nii.gz").get_fdata()
    np.testing.assert_allclose(out, hu, atol=1e-3)


def test_bad_inputs_are_reported_and_others_processed_and_nothing_overwritten(models, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    _volume(inp / "good.nii.gz")
    _volume(inp / "nan.nii.gz", value=np.full((16, 16, 8), np.nan))
    _volume(inp / "flat.nii.gz", value=np.zeros((16, 16)))
    _volume(inp / "multi.nii.gz", value=np.zeros((16, 16, 8, 2)))
    (inp / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    args = ["run", "inferring", "--config_file", CONFIG, "--input", inp, "--model_dir", models, "--output_dir", out, *SMALL]
    proc = _bundle(*args)
    log = proc.stdout + proc.stderr
    summary = json.loads((out / "inference_summary.json").read_text())
    reasons = {Path(f["file"]).name: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {"nan.nii.gz", "flat.nii.gz", "multi.nii.gz", "broken.nii.gz"}
    assert "non-finite" in reasons["nan.nii.gz"] and "2D" in reasons["flat.nii.gz"]
    assert "2 channels" in reasons["multi.nii.gz"] and "cannot be read" in reasons["broken.nii.gz"]
    assert "broken.nii.gz" in log
    good = out / "good_synthetic.nii.gz"
    stamp = os.stat(good).st_mtime_ns
    again = _bundle(*args)
    summary = json.loads((out / "inference_summary.json").read_text())
    assert any("good.nii.gz" in f["file"] and "exists" in f["reason"] for f in summary["failed"])
    assert os.stat(good).st_mtime_ns == stamp, again.stdout[-2000:]
    _bundle(*args, "--overwrite", "true")
    assert os.stat(good).st_mtime_ns != stamp


def test_torchscript_export_matches_eager_and_net_in_out_verifies(models, tmp_path):
    ts = tmp_path / "model.ts"
    _bundle("ckpt_export", "network_def", "--filepath", ts, "--ckpt_file", models / "model.pt", "--meta_file", META,
            "--config_file", CONFIG, *SMALL[:2])
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update({"generator_channels": [4, 8, 16, 16], "device": "cpu"})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    eager.eval()
    scripted = torch.jit.load(str(ts))
    x = torch.rand(2, 1, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=1e-5)
    _bundle("verify_net_in_out", "network_def", "--meta_file", META, "--config_file", CONFIG, *SMALL[:2])
