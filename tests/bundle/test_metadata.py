from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT.parent / "shared" / "monai-schema" / "meta_schema_20240725.json"


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"offline schema not found at {SCHEMA}")
def test_metadata_validates_against_model_zoo_schema():
    out = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "bundle/configs/metadata.json",
         "--filepath", str(SCHEMA)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "metadata is verified with no error" in out.stdout + out.stderr


def test_train_config_exposes_the_contract_ids():
    config = json.loads((ROOT / "bundle/configs/train.json").read_text())
    required = ["bundle_root", "dataset_dir", "datalist", "output_dir", "ckpt_dir", "device", "spatial_dims",
                "patch_size", "batch_size", "epochs", "val_interval", "variant", "beta", "p", "lambda_gp",
                "lambda_adv_global", "lambda_adv_local", "n_critic", "lr_g", "lr_d1", "lr_d2", "seed", "training", "run",
                "initialize"]
    assert [k for k in required if k not in config] == []


def test_metadata_names_the_release_and_lists_only_published_packages():
    meta = json.loads((ROOT / "bundle/configs/metadata.json").read_text())
    assert meta["name"] == "dual_attention_synthesis"
    assert meta["version"] in meta["changelog"]
    # the project's own package is shipped inside the release, not installed from an index
    assert "dual-attention-synthesis" not in meta["required_packages_version"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {k: v for k, v in meta["required_packages_version"].items() if pins.get(k) != v} == {}


def _install_requires() -> set[str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines() if ln.strip()]
    return {_normalise(re.match(r"[A-Za-z0-9_.-]+", ln).group()) for ln in lines}


def _normalise(name: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_required_packages_are_the_runtime_dependencies_under_their_pip_names():
    from importlib.metadata import PackageNotFoundError, version

    meta = json.loads((ROOT / "bundle/configs/metadata.json").read_text())
    required = meta["required_packages_version"]
    # torch, monai and numpy have their own fields; every other runtime dependency of setup.cfg is listed
    assert {_normalise(k) for k in required} == _install_requires() - {"torch", "monai", "numpy"}
    assert "nibabel" in required  # the bundle reads and writes NIfTI through it
    for name in required:  # a name pip cannot install (e.g. "ignite" for "pytorch-ignite") is not installed here
        try:
            version(name)
        except PackageNotFoundError:
            pytest.fail(f"required_packages_version names {name!r}, which is not a distribution pip knows here.")
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert (meta["monai_version"], meta["pytorch_version"], meta["numpy_version"]) == (
        pins["monai"], pins["torch"], pins["numpy"])


def test_bundle_version_is_the_package_version():
    """The release copies custom_components into the bundle, so the bundle version names that code too."""
    import custom_components

    meta = json.loads((ROOT / "bundle/configs/metadata.json").read_text())
    assert meta["version"] == custom_components.__version__


def test_network_data_format_matches_the_inference_network():
    """Channels, spatial rank and shape rule of ``network_data_format`` hold for the inference config's generator."""
    import torch
    from monai.bundle import ConfigParser

    from custom_components.config.paths import config_files

    meta = json.loads((ROOT / "bundle/configs/metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config(config_files(ROOT / "bundle", "infer"))
    parser.update({"bundle_root": str(ROOT / "bundle")})
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    spatial_dims, patch = parser["spatial_dims"], parser["patch_size"]
    assert parser["network_def"]["in_channels"] == image["num_channels"]
    assert parser["network_def"]["out_channels"] == pred["num_channels"]
    assert len(image["spatial_shape"]) == len(pred["spatial_shape"]) == spatial_dims == len(patch)
    multiples = {int(re.fullmatch(r"(\d+)\*n", s).group(1)) for s in image["spatial_shape"] + pred["spatial_shape"]}
    assert len(multiples) == 1
    k = multiples.pop()
    assert all(s % k == 0 for s in patch), f"patch_size {patch} is not of the advertised shape {k}*n"
    net = parser.get_parsed_content("network_def").eval()
    for n in (1, 3):  # the smallest advertised input, and one that is not a power of two
        x = torch.rand(1, image["num_channels"], *[k * n] * spatial_dims, dtype=getattr(torch, image["dtype"]))
        with torch.no_grad():
            y = net(x)
        assert tuple(y.shape) == (1, pred["num_channels"], *x.shape[2:])
        assert y.dtype == getattr(torch, pred["dtype"])
