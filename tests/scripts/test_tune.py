from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import tune  # noqa: E402


def test_objective_rewards_tumour_psnr_and_penalises_volume_loss_beyond_tolerance():
    unet_volume = 20.0
    assert tune.objective_value({"psnr_tumour": 12.0, "psnr_volume": 19.9}, unet_volume) == pytest.approx(12.0)
    assert tune.objective_value({"psnr_tumour": 12.0, "psnr_volume": 19.3}, unet_volume) == pytest.approx(11.0)
    assert tune.objective_value({"psnr_tumour": 12.0, "psnr_volume": 21.0}, unet_volume) == pytest.approx(12.0)


def test_search_space_options_exist_in_the_training_config():
    import json

    config = json.loads((ROOT / "bundle" / "configs" / "train.json").read_text())
    assert set(tune.SEARCH_SPACE) <= set(config)
