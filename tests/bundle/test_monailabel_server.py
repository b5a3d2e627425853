"""The real MONAI Label server serves the synthesis through /infer (slow; needs the optional MONAI Label install)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom_components.paths import config_files
from custom_components.phantom_dataset import ensure_phantom

pytest.importorskip("monailabel", reason="MONAI Label is optional (see bundle/docs/README.md, Serving with MONAI Label)")
requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_returns_float32_synthesis_in_source_geometry(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundle" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "infer"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", "save_confidence": True})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    torch.save(parser.get_parsed_content("local_discriminator").state_dict(), bundle / "models" / "local_discriminator.pt")
    phantom = tmp_path / "phantom"
    ensure_phantom(phantom, task="t1t2", n_train=1, n_val=1, n_test=1, shape=(48, 48, 32), seed=4)
    studies = tmp_path / "studies"
    studies.mkdir()
    for i, t1 in enumerate(sorted(phantom.rglob("t1.nii.gz"))):
        shutil.copy(t1, studies / f"case{i}_t1.nii.gz")
    source = studies / "case0_t1.nii.gz"
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "monailabel_app"),
                               "--studies", str(studies), "--conf", "bundle", str(bundle), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(f"{url}/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, "MONAI Label server exited during start-up"
            time.sleep(1)
        info = requests.get(f"{url}/info/", timeout=30).json()
        assert info["models"]["synthesis"]["type"] == "others"
        outputs = {}
        for model in ("synthesis", "synthesis_confidence"):
            with open(source, "rb") as f:
                reply = requests.post(f"{url}/infer/{model}", params={"output": "image"},
                                      files={"file": ("case0_t1.nii.gz", f)}, timeout=600)
            assert reply.status_code == 200, reply.text[:2000]
            (tmp_path / f"{model}.nii.gz").write_bytes(reply.content)
            outputs[model] = nib.load(tmp_path / f"{model}.nii.gz")
    finally:
        server.terminate()
        server.wait(timeout=60)
    src = nib.load(source)
    reference = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file",
                    str(config_files(bundle, "infer")), "--bundle_root", str(bundle), "--input", str(studies),
                    "--output_dir", str(reference)], check=True, capture_output=True, timeout=600)
    for model, postfix in (("synthesis", "synthetic"), ("synthesis_confidence", "confidence")):
        img = outputs[model]
        assert img.get_data_dtype() == np.float32 and img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        values = img.get_fdata()
        assert 0 <= values.min() and values.max() <= 1 and values.std() > 0
        expected = nib.load(reference / f"case0_t1_{postfix}.nii.gz").get_fdata()
        np.testing.assert_allclose(values, expected, atol=1e-6)  # the bundle's own inference, unchanged
