from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from custom_components.apps.evaluation import region_metrics, save_panel, subject_metrics


def test_region_metrics_match_hand_computation():
    target = torch.zeros(1, 16, 16, 16)
    pred = target.clone()
    pred[0, :8] = 0.2  # error 0.2 in half the volume
    region = torch.zeros_like(target)
    region[0, :8, :, :4] = 1  # a region entirely inside the erroneous half
    whole = region_metrics(pred, target, None, 1.0)
    assert whole["mae"] == pytest.approx(0.1)
    assert whole["psnr"] == pytest.approx(10 * math.log10(1 / (0.5 * 0.04)))
    inside = region_metrics(pred, target, region, 1.0)
    assert inside["mae"] == pytest.approx(0.2)
    assert inside["psnr"] == pytest.approx(10 * math.log10(1 / 0.04))
    same = region_metrics(target, target, None, 1.0)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5) and same["psnr"] == math.inf


def test_subject_metrics_regions_and_ct_conventions():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 20, 20, 20, generator=g)
    pred = (target + 0.05 * torch.randn(1, 20, 20, 20, generator=g)).clamp(0, 1)
    mask = torch.zeros_like(target)
    mask[0, 2:18, 2:18, 2:18] = 1
    label = torch.zeros_like(target)
    label[0, 8:12, 8:12, 8:12] = 2
    m = subject_metrics(pred, target, mask, label, hu_window=(-1024, 3000))
    assert m["mae_tumour"] == pytest.approx(float((pred - target)[label > 0].abs().mean()), rel=1e-5)
    assert m["mae_foreground"] == pytest.approx(float((pred - target)[mask > 0].abs().mean()), rel=1e-5)
    # HU: normalised [0, 1] is [-1024, 3000] HU, so HU MAE is 4024 x normalised MAE; PSNR uses range 4024
    assert m["mae_hu_volume"] == pytest.approx(4024 * m["mae_volume"], rel=1e-4)
    assert m["psnr_hu_foreground"] == pytest.approx(m["psnr_foreground"], rel=1e-4)
    no_label = subject_metrics(pred, target, mask, None)
    assert math.isnan(no_label["psnr_tumour"]) and "mae_hu_volume" not in no_label
    with pytest.raises(ValueError, match="same shape"):
        subject_metrics(pred, target[:, :10])


def test_panel_is_written_on_largest_tumour_slice(tmp_path):
    vol = np.random.default_rng(0).random((16, 16, 10)).astype(np.float32)
    label = np.zeros_like(vol)
    label[4:8, 4:8, 7] = 1
    label[5:6, 5:6, 2] = 1
    z = save_panel(tmp_path / "fig.png", vol, vol, vol, confidence=vol, label=label, title="s")
    assert z == 7 and (tmp_path / "fig.png").stat().st_size > 1000


def test_an_existing_evaluation_is_not_overwritten_and_the_hint_names_the_real_option(tmp_path):
    """The refusal named --output_dir, but evaluate.json's option is --eval_dir (issue 17, item 15)."""
    from ignite.engine import Engine

    from custom_components.apps.evaluation import SubjectMetricsWriter

    (tmp_path / "metrics.csv").write_text("subject\n")
    writer = SubjectMetricsWriter(str(tmp_path), figures=False)
    engine = Engine(lambda e, b: None)
    writer.attach(engine)
    with pytest.raises(FileExistsError, match="--eval_dir"):
        engine.run([0])
    assert (tmp_path / "metrics.csv").read_text() == "subject\n"


def test_the_attention_panel_is_the_weight_training_applies():
    """Issue 20: the figures' F panel was (1 - M)^beta whatever attention_norm and attention_floor the run used."""
    from custom_components.apps.evaluation import attention_panel
    from custom_components.losses.synthesis import attention_weight

    m = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32) * 0.8
    plain = np.clip(1 - m, 0, 1) ** 2
    np.testing.assert_allclose(attention_panel(m, 2.0), plain, atol=1e-6)
    shipped = attention_panel(m, 2.0, "mean", 0.5)
    expected = attention_weight(torch.as_tensor(m)[None, None], 2.0, "mean", 0.5)[0, 0].numpy()
    np.testing.assert_allclose(shipped, expected, atol=1e-6)
    assert not np.allclose(shipped, plain) and abs(float(shipped.mean()) - 1.0) < 1e-5  # mean 1: normalised, floored
