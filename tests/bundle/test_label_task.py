"""The MONAI Label synthesis task, in process: float32 NIfTI in the source geometry, equal to `run inferring`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.label_task import SynthesisTask
from custom_components.paths import config_files

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"generator_channels": [4, 8, 16, 16], "local_channels": [4, 4, 8, 8], "patch_size": [32, 32]}


def _parser(bundle: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "infer"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", **SMALL, **overrides})
    return parser


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """bundle/ configs with small random weights in models/."""
    out = tmp_path_factory.mktemp("bundle")
    shutil.copytree(ROOT / "bundle" / "configs", out / "configs")
    (out / "models").mkdir()
    parser = _parser(out, save_confidence=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), out / "models" / "model.pt")
    torch.save(parser.get_parsed_content("local_discriminator").state_dict(), out / "models" / "local_discriminator.pt")
    return out


@pytest.fixture()
def volume(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    data = (rng.random((40, 36, 12)) * 900).astype(np.float32)
    affine = np.array([[-1.2, 0, 0, 20.0], [0, -0.8, 0, -5.0], [0, 0, 3.0, 11.0], [0, 0, 0, 1]])
    path = tmp_path / "study" / "case7_t1.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, data, affine


def test_networks_are_loaded_by_their_definition_without_initialize(bundle):
    parser = _parser(bundle)
    network = parser.get_parsed_content("network")
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items())
    assert not network.training
    local_d = parser.get_parsed_content("postprocessing#transforms#0").network  # ConfidenceMapd
    saved_d = torch.load(bundle / "models" / "local_discriminator.pt", weights_only=True)
    assert all(torch.equal(v, saved_d[k]) for k, v in local_d.state_dict().items())


def test_preprocessing_accepts_the_image_under_image(bundle, volume):
    path, data, _ = volume
    out = _parser(bundle).get_parsed_content("preprocessing")({"image": str(path)})
    assert tuple(out["source"].shape) == (1, *data.shape)


def test_task_returns_float32_synthesis_in_source_geometry_equal_to_the_bundle_cli(bundle, volume, tmp_path):
    path, data, affine = volume
    task = SynthesisTask(bundle, "synthetic", overrides=SMALL)
    assert task.is_valid() and task.info()["type"] == "others"
    result, info = task({"image": str(path)})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing written next to the source
    img = nib.load(result)
    assert img.get_data_dtype() == np.float32 and img.shape == data.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    values = img.get_fdata()
    assert np.isfinite(values).all() and 0 <= values.min() and values.max() <= 1 and values.std() > 0
    conf = nib.load(info["files"]["confidence"])
    assert conf.get_data_dtype() == np.float32 and conf.shape == data.shape
    np.testing.assert_allclose(conf.affine, affine, atol=1e-5)
    cli_out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", str(config_files(bundle, "infer")),
           "--bundle_root", str(bundle), "--input", str(path.parent), "--output_dir", str(cli_out)]
    for key, value in SMALL.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = nib.load(cli_out / "case7_t1_synthetic.nii.gz").get_fdata()
    np.testing.assert_allclose(values, cli, atol=1e-6)


def test_confidence_task_and_bad_requests(bundle, volume, tmp_path):
    path, data, _ = volume
    result, _ = SynthesisTask(bundle, "confidence", overrides=SMALL)({"image": str(path)})
    conf = nib.load(result).get_fdata()
    assert conf.shape == data.shape and 0 <= conf.min() and conf.max() <= 1
    with pytest.raises(ValueError, match="request\\['image'\\]"):
        SynthesisTask(bundle, overrides=SMALL)({"image": str(tmp_path / "missing.nii.gz")})
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), str(nan))
    with pytest.raises(ValueError, match="non-finite"):
        SynthesisTask(bundle, overrides=SMALL)({"image": str(nan)})
    with pytest.raises(ValueError, match="'synthetic' or 'confidence'"):
        SynthesisTask(bundle, "label")
