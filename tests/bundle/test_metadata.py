"""bundle/configs/metadata.json: valid for the model zoo, true of the network and the release, and the options it
and the docs tell users to set reach what they control."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
META = json.loads((CONFIGS / "metadata.json").read_text())
SCHEMA = ROOT.parent / "shared" / "monai-schema" / "meta_schema_20240725.json"


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"offline schema not found at {SCHEMA}")
def test_metadata_validates_against_model_zoo_schema():
    out = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "bundle/configs/metadata.json",
         "--filepath", str(SCHEMA)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "metadata is verified with no error" in out.stdout + out.stderr


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_the_version_is_the_newest_changelog_entry_and_the_package_version():
    """The release copies custom_components into the bundle, so the bundle version names that code too."""
    import custom_components

    assert META["version"] == max(META["changelog"], key=_release) == custom_components.__version__


def test_the_name_is_a_model_zoo_bundle_name():
    """The release folder and zip are named after it (test_export_bundle.py), and model-zoo folders are snake_case."""
    assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", META["name"]), META["name"]


def _pins() -> dict[str, str]:
    return dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))


def test_required_packages_are_the_tested_versions_and_not_the_project_itself():
    # the project's own package is shipped inside the release, not installed from an index
    assert "dual-attention-synthesis" not in META["required_packages_version"]
    pins = _pins()
    assert {k: v for k, v in META["required_packages_version"].items() if pins.get(k) != v} == {}
    assert (META["monai_version"], META["pytorch_version"], META["numpy_version"]) == (
        pins["monai"], pins["torch"], pins["numpy"])


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

    required = META["required_packages_version"]
    # torch, monai and numpy have their own fields; every other runtime dependency of setup.cfg is listed
    assert {_normalise(k) for k in required} == _install_requires() - {"torch", "monai", "numpy"}
    assert "nibabel" in required  # the bundle reads and writes NIfTI through it
    for name in required:  # a name pip cannot install (e.g. "ignite" for "pytorch-ignite") is not installed here
        try:
            version(name)
        except PackageNotFoundError:
            pytest.fail(f"required_packages_version names {name!r}, which is not a distribution pip knows here.")


def _shape(spec: list[str], n: int) -> list[int]:
    """An advertised spatial shape (``["16*n", "16*n"]``) for one ``n``."""
    return [int(re.fullmatch(r"(\d+)\*n", s).group(1)) * n for s in spec]


@pytest.mark.parametrize("n", [1, 3])  # the smallest advertised input, and one that is not a power of two
def test_the_network_of_inference_json_takes_and_gives_what_network_data_format_says(n):
    """What the model zoo's ``verify_net_in_out`` runs (channels and dtypes), and the spatial shapes as well, on the
    generator built from inference.json alone."""
    import torch
    from monai.bundle import ConfigParser, verify_net_in_out

    image, pred = META["network_data_format"]["inputs"]["image"], META["network_data_format"]["outputs"]["pred"]
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"), device="cpu", n=n)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    net = parser.get_parsed_content("network_def").eval()
    x = torch.rand(1, image["num_channels"], *_shape(image["spatial_shape"], n), dtype=getattr(torch, image["dtype"]))
    with torch.no_grad():
        y = net(x)
    assert list(y.shape) == [1, pred["num_channels"], *_shape(pred["spatial_shape"], n)]
    assert y.dtype == getattr(torch, pred["dtype"])


def test_the_inference_pipeline_feeds_the_network_only_advertised_shapes():
    """inference.json's inferer pads each whole slice of a volume to the advertised multiple before the generator."""
    import torch
    from monai.bundle import ConfigParser

    multiple = {int(re.fullmatch(r"(\d+)\*n", s).group(1))
                for s in META["network_data_format"]["inputs"]["image"]["spatial_shape"]}
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    net = parser.get_parsed_content("network_def").eval()
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    volume = torch.rand(1, 1, 40, 52, 3)  # slices of 40 x 52 voxels, neither a multiple of 16
    with torch.no_grad():
        out = parser.get_parsed_content("inferer")(volume, net)
    assert out.shape == volume.shape
    assert seen and all(size % m == 0 for shape in seen for size in shape for m in multiple), seen


def test_the_options_users_set_reach_what_they_control(phantom, tmp_path):
    """The ids the README and the model zoo tell users to override (``--epochs 7``, ``--beta 1.5``, ...) change the
    built trainer, optimisers, data and output folders. The workflow ids (``training``, ``run``, ``initialize``) are
    checked by ``check_properties`` in test_export_bundle.py and used by every end-to-end run."""
    import torch
    from monai.bundle import ConfigParser

    from custom_components.engines.schedules import DelayedValidationHandler

    datalist = json.loads((phantom / "datalist.json").read_text())
    for item in datalist["training"][:1] + datalist["validation"]:
        item.update({k: str(phantom / v) for k, v in item.items() if k != "subject"})
    datalist["training"] = datalist["training"][:1]
    (tmp_path / "one.json").write_text(json.dumps(datalist))
    options = {"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(phantom), "make_phantom": False,
               "datalist": str(tmp_path / "one.json"), "output_dir": str(tmp_path / "out"),
               "ckpt_dir": str(tmp_path / "ckpt"), "device": "cpu", "spatial_dims": 2, "patch_size": [48, 32],
               "batch_size": 3, "samples_per_volume": 2, "epochs": 7, "val_interval": 2, "variant": "dual_attention",
               "beta": 1.5, "p": 2, "lambda_gp": 7.0, "lambda_adv_global": 0.003, "lambda_adv_local": 0.07,
               "n_critic": 2, "lr_g": 3e-4, "lr_global_critic": 4e-4, "lr_local_discriminator": 5e-4, "seed": 9, "cache_rate": 0.0,
               "generator_channels": [8, 16, 32, 64]}
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(options)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 7 and trainer.state.device == torch.device("cpu")
    assert (trainer.variant, trainer.beta, trainer.recon_loss.p, trainer.n_critic) == ("dual_attention", 1.5, 2, 2)
    assert trainer.gradient_penalty.lambda_gp == 7.0
    assert (trainer.lambda_adv_global, trainer.lambda_adv_local) == (0.003, 0.07)
    lrs = [o.param_groups[0]["lr"] for o in (trainer.g_optimizer, trainer.global_optimizer, trainer.local_optimizer)]
    assert lrs == [3e-4, 4e-4, 5e-4]
    loader = trainer.data_loader
    assert loader.batch_size == 3 and len(loader.dataset) == 1  # the one training subject of our datalist
    batch = next(iter(loader))
    assert list(batch["source"].shape) == [2, 1, 48, 32]  # 1 volume x 2 samples, 2D patches of patch_size
    validation = [h for h in parser.get_parsed_content("train#handlers") if isinstance(h, DelayedValidationHandler)]
    assert [h.interval for h in validation] == [2]  # every val_interval epochs
    assert parser.get_parsed_content("check_options").seed == 9
    assert Path(parser.get_parsed_content("train#checkpoint_saver").save_dir) == tmp_path / "ckpt"
    assert Path(parser.get_parsed_content("train#final_model_saver").save_dir) == tmp_path / "out" / "models"
    assert Path(parser.get_parsed_content("cache_dir")) == tmp_path / "bundle" / "runs" / "cache"
