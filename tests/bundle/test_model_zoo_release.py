"""The exported release as the model zoo sees it: unzipped into a ``models/`` folder, in a fresh virtual environment
that holds only the packages ``metadata.json`` names (installed the zoo's way, ``ci/get_bundle_requirements.py``:
``monai==``, ``torch==``, ``numpy==`` and ``required_packages_version``, plus jsonschema from the zoo's dev
requirements), never this project's package. ``scripts/verify_release.py`` runs the zoo's checks with
``configs/inference.json`` alone, then the zoo's standard inference command runs inside the release folder.

Slow (the fresh environment takes about a minute to install from the package index, the checks and the inference
about a minute more).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_NAME = "meta_schema_20240725.json"
pytestmark = pytest.mark.slow


def _schema() -> Path:
    """The offline copy of the model-zoo schema (nothing can be downloaded here); ``MONAI_BUNDLE_SCHEMA`` overrides."""
    candidates = [os.environ.get("MONAI_BUNDLE_SCHEMA", ""), ROOT.parent / "shared" / "monai-schema" / SCHEMA_NAME,
                  Path("/work/shared/monai-schema") / SCHEMA_NAME]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail(f"offline model-zoo schema {SCHEMA_NAME} not found (set MONAI_BUNDLE_SCHEMA); tried {candidates}")


def _zoo_requirements(meta: dict) -> list[str]:
    reqs = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    reqs += [f"{name}=={version}" for name, version in meta.get("required_packages_version", {}).items()]
    return reqs + ["jsonschema"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(python of the fresh environment, the release folder in ``<tmp>/models/<name>``, its environment variables)."""
    spec = importlib.util.spec_from_file_location("export_bundle", ROOT / "scripts" / "export_bundle.py")
    export_bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_bundle)
    tmp = tmp_path_factory.mktemp("zoo")
    archive = Path(export_bundle.export(str(tmp / "release"), bundle_dir=str(ROOT / "bundle")))
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp / "models")
    folder = tmp / "models" / archive.name.split("_v")[0]
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *_zoo_requirements(meta)],
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return python, folder, env


def test_the_fresh_environment_has_no_copy_of_the_project_package(zoo, tmp_path):
    python, folder, env = zoo
    outside = subprocess.run([str(python), "-c", "import custom_components"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert outside.returncode != 0 and "No module named 'custom_components'" in outside.stderr
    inside = subprocess.run([str(python), "-c", "import custom_components; print(custom_components.__file__)"],
                            cwd=folder, env=env, capture_output=True, text=True)
    assert Path(inside.stdout.strip()).parent == folder / "custom_components", inside.stderr  # the release's copy


def test_the_model_zoo_checks_pass_on_the_release_with_inference_json_alone(zoo):
    python, folder, env = zoo
    proc = subprocess.run([str(python), str(ROOT / "scripts" / "verify_release.py"), "--bundle", str(folder),
                           "--schema", str(_schema())], cwd=folder.parent, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verified = [line for line in proc.stdout.splitlines() if line.startswith("verified: ")]
    assert len(verified) == 7, proc.stdout
    assert "all model-zoo checks passed" in proc.stdout


def test_the_zoo_inference_command_synthesises_the_test_volumes_inside_the_release(zoo):
    """``python -m monai.bundle run --config_file configs/inference.json``, nothing else, inside the release: the
    shipped weights synthesise the built-in phantom's test volumes (generated on first use, as training does)."""
    python, folder, env = zoo
    proc = subprocess.run([str(python), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = folder / "data" / "phantom_t1t2"
    tests = json.loads((data / "datalist.json").read_text())["test"]
    summary = json.loads((folder / "inference" / "inference_summary.json").read_text())
    assert summary["failed"] == [] and len(summary["synthesised"]) == len(tests) == 4
    for item in tests:
        source = Path(item["source"])
        src = nib.load(data / source)
        for postfix in ("synthetic", "confidence"):
            out = nib.load(folder / "inference" / source.parent / f"{source.name[:-len('.nii.gz')]}_{postfix}.nii.gz")
            assert out.shape == src.shape and out.get_data_dtype() == np.float32
            np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
            values = out.get_fdata()
            assert np.isfinite(values).all() and 0.0 <= values.min() and values.max() <= 1.0
    shutil.rmtree(folder / "inference")
