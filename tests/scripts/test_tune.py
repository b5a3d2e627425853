from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import tune  # noqa: E402


def test_objective_rewards_tumour_psnr_and_penalises_volume_and_ssim_loss_beyond_tolerance():
    unet = {"psnr_volume": 20.0, "ssim_volume": 0.80}
    ok = {"psnr_tumour": 12.0, "psnr_volume": 19.9, "ssim_volume": 0.797}
    assert tune.objective_value(ok, unet) == pytest.approx(12.0)
    assert tune.objective_value({**ok, "psnr_volume": 19.3}, unet) == pytest.approx(11.0)
    assert tune.objective_value({**ok, "psnr_volume": 21.0}, unet) == pytest.approx(12.0)
    assert tune.objective_value({**ok, "ssim_volume": 0.785}, unet) == pytest.approx(11.0)  # 0.010 beyond 0.005
    assert tune.objective_value({**ok, "ssim_volume": 0.9}, unet) == pytest.approx(12.0)


def test_search_space_options_exist_in_the_training_config():
    import json

    config = json.loads((ROOT / "bundle" / "configs" / "train.json").read_text())
    assert set(tune.SEARCH_SPACE) <= set(config) and set(tune.ADDED_LATER) <= set(tune.SEARCH_SPACE)
    for k, v in tune.ADDED_LATER.items():  # the value earlier runs had is the config's default
        assert config[k] == v


def test_trial_names_are_stable_and_ignore_options_added_later_at_their_old_value():
    a = {"beta": 2.0, "attention_source": "error"}
    assert tune.trial_name(a) == tune.trial_name(dict(reversed(list(a.items()))))
    assert tune.trial_name({**a, "local_ema": 0.0}) == tune.trial_name(a)
    assert tune.trial_name({**a, "local_ema": 0.99}) != tune.trial_name(a)
    assert tune.trial_name({**a, "beta": 4.0}) != tune.trial_name(a)


def test_last_logged_value(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("x val_local_qa_auroc_worst: 0.5123 y\nz val_local_qa_auroc_worst: 0.6 \n")
    assert tune.last_logged(log, "val_local_qa_auroc_worst") == pytest.approx(0.6)
    assert tune.last_logged(log, "missing") != tune.last_logged(log, "missing")  # NaN


def test_every_choice_of_the_search_space_is_checked_before_any_run(monkeypatch):
    """Issue 20: a bad choice would fail only when TPE samples it; check_space refuses it at start."""
    tune.check_space(tune.SEARCH_SPACE, {"epochs": 2})
    with pytest.raises(ValueError, match=r"attention_floor must be a number in \[0, 1\], got 1.5"):
        tune.check_space({**tune.SEARCH_SPACE, "attention_floor": [0.0, 1.5]}, {})
    with pytest.raises(ValueError, match=r"not training options"):
        tune.check_space({"num_workers": [0, 1]}, {})


def test_the_renamed_option_keeps_the_folder_names_of_the_finished_study():
    """lr_d2 became lr_local_discriminator (0.4.0); the study's folders (bundle/docs/tuning_trials.csv) keep their
    names, so its finished runs are still reused."""
    import csv

    from custom_components.config.hyperparameters import RENAMED

    rows = [r for r in csv.DictReader(open(ROOT / "bundle" / "docs" / "tuning_trials.csv")) if r["number"].isdigit()]
    assert rows
    for row in rows:
        params = {RENAMED.get(k, k): _typed(row[k]) for k in row if RENAMED.get(k, k) in tune.SEARCH_SPACE}
        assert set(params) == set(tune.SEARCH_SPACE)
        assert tune.trial_name(params) == Path(row["run_dir"]).parent.name


def _typed(text):
    """A CSV cell as the search space holds it (bool, int, float or text)."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
