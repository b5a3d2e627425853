from __future__ import annotations

import json
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


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"offline schema not found at {SCHEMA}")
def test_schema_rejects_metadata_without_network_format():
    import jsonschema

    meta = json.loads((ROOT / "bundle/configs/metadata.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(meta, schema)
    del meta["network_data_format"]
    with pytest.raises(jsonschema.ValidationError, match="network_data_format"):
        jsonschema.validate(meta, schema)


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
