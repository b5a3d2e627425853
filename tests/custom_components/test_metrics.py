"""Masked regression metrics, and the confidence map's quality as an error detector (custom_components.metrics.synthesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from scipy.stats import spearmanr

from custom_components.metrics.synthesis import (
    QA_KEYS,
    SPARSIFICATION_FRACTIONS,
    ConfidenceQAMetric,
    MaskedRegressionMetric,
    batch_items,
    confidence_qa,
    masked_mae,
    masked_psnr,
    sparsification_curve,
)


def _volume(seed=0, shape=(1, 24, 20, 6)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    pred = (target + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return pred, target


def test_perfect_inverted_and_uninformative_maps():
    pred, target = _volume()
    err = (target - pred).abs()
    perfect = confidence_qa(1 - err, pred, target)
    assert perfect["qa_auroc_worst"] == pytest.approx(1.0) and perfect["qa_spearman"] == pytest.approx(1.0)
    inverted = confidence_qa(err, pred, target)
    assert inverted["qa_auroc_worst"] == pytest.approx(0.0) and inverted["qa_spearman"] == pytest.approx(-1.0)
    flat = confidence_qa(torch.full_like(err, 0.7), pred, target)
    assert flat["qa_auroc_worst"] == pytest.approx(0.5)  # ties: no information
    assert math.isnan(flat["qa_spearman"])


def test_auroc_matches_pairwise_definition_inside_the_foreground():
    pred, target = _volume(1, (1, 10, 8, 3))
    g = torch.Generator().manual_seed(2)
    m = torch.rand(pred.shape, generator=g)
    mask = torch.zeros_like(pred)
    mask[:, 2:9, 1:7] = 1
    out = confidence_qa(m, pred, target, mask=mask, worst_fraction=0.2)
    fg = mask.bool().flatten()
    err, score = (target - pred).abs().flatten()[fg].numpy(), (1 - m).flatten()[fg].numpy()
    pos = err >= np.quantile(err, 0.8)
    # probability that a random worst voxel scores above a random other voxel (ties count half)
    diff = score[pos][:, None] - score[~pos][None, :]
    expected = float((diff > 0).mean() + 0.5 * (diff == 0).mean())
    assert out["qa_auroc_worst"] == pytest.approx(expected, rel=1e-9)
    assert out["qa_spearman"] == pytest.approx(spearmanr(score, err).statistic, rel=1e-9)


def test_mean_confidence_inside_and_outside_tumour():
    pred, target = _volume()
    m = torch.full_like(pred, 0.8)
    label = torch.zeros_like(pred)
    label[:, 5:10, 5:10] = 1
    m[label > 0] = 0.2
    mask = torch.ones_like(pred)
    mask[:, :2] = 0  # background is not "outside the tumour"
    m[mask == 0] = 0.0
    out = confidence_qa(m, pred, target, mask=mask, label=label)
    assert out["qa_confidence_tumour"] == pytest.approx(0.2)
    assert out["qa_confidence_outside"] == pytest.approx(0.8)
    assert math.isnan(confidence_qa(m, pred, target)["qa_confidence_tumour"])


def test_bad_inputs_are_named():
    pred, target = _volume()
    with pytest.raises(ValueError, match="worst_fraction"):
        confidence_qa(pred, pred, target, worst_fraction=1.5)
    with pytest.raises(ValueError, match="same number of voxels"):
        confidence_qa(pred[:, :5], pred, target)


def test_metric_averages_volumes_and_names_entries():
    vols = [_volume(s) for s in range(3)]
    items = [{"pred": p, "target": t, "confidence": 1 - (t - p).abs()} for p, t in vols]
    batches = [{"mask": None, "label": None} for _ in vols]

    def step(engine, _):
        return [items[engine.state.iteration - 1]]

    engine = Engine(step)
    engine.add_event_handler(Events.ITERATION_STARTED,
                             lambda e: setattr(e.state, "batch", [batches[e.state.iteration - 1]]))
    metric = ConfidenceQAMetric()
    metric.attach(engine, "val_qa")
    engine.run(range(3), max_epochs=1)
    assert set(engine.state.metrics) == {f"val_{k}" for k in QA_KEYS}
    assert engine.state.metrics["val_qa_auroc_worst"] == pytest.approx(1.0)
    expected = np.mean([confidence_qa(i["confidence"], i["pred"], i["target"])["qa_spearman"] for i in items])
    assert engine.state.metrics["val_qa_spearman"] == pytest.approx(expected)


def test_metric_without_confidence_map_says_what_to_add():
    pred, target = _volume()
    metric = ConfidenceQAMetric()
    metric.reset()
    with pytest.raises(KeyError, match="ConfidenceMapd"):
        metric.update(([{"pred": pred, "target": target}], [{}]))


def test_masked_metrics_match_hand_computation():
    pred = torch.tensor([[[0.0, 0.5], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    mask = torch.tensor([[[0, 1], [1, 0]]])
    assert masked_mae(pred, target, mask) == pytest.approx((0.5 + 1.0) / 2)
    assert masked_psnr(pred, target, mask, 1.0) == pytest.approx(10 * math.log10(1 / ((0.25 + 1.0) / 2)))
    assert math.isnan(masked_mae(pred, target, torch.zeros_like(mask)))


def test_masked_metric_on_engine_averages_non_empty_volumes():
    vols = [(torch.full((1, 2, 2), 0.5), torch.ones(1, 2, 2), torch.ones(1, 2, 2)),
            (torch.full((1, 2, 2), 0.9), torch.ones(1, 2, 2), torch.zeros(1, 2, 2)),  # empty tumour: skipped
            (torch.full((1, 2, 2), 0.75), torch.ones(1, 2, 2), None)]  # no label at all: skipped

    def step(engine, batch):
        pred, target, label = batch
        engine.state.batch = [{"label": label} if label is not None else {}]
        return [{"pred": pred, "target": target}]

    engine = Engine(step)
    from monai.handlers import from_engine

    metric = MaskedRegressionMetric("mae", output_transform=from_engine(["pred", "target"]),
                                    batch_transform=batch_items("label"))
    metric.attach(engine, "mae_tumour")
    engine.run(vols, max_epochs=1)
    assert engine.state.metrics["mae_tumour"] == pytest.approx(0.5)


def _errors(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return rng, rng.random(n) ** 3  # skewed, like synthesis errors


def test_sparsification_curve_by_hand_and_oracle_shape():
    err = np.array([4.0, 1.0, 3.0, 0.0, 2.0])  # mean 2
    curve = sparsification_curve(-np.arange(5.0), err, [0.0, 0.2, 0.4, 0.6, 0.8])  # removes 4, then 1, 3, 0
    np.testing.assert_allclose(curve, np.array([2.0, 6 / 4, 5 / 3, 2 / 2, 2 / 1]) / 2.0)
    _, err = _errors()
    oracle = sparsification_curve(err, err)
    assert oracle.shape == (len(SPARSIFICATION_FRACTIONS),) and oracle[0] == pytest.approx(1.0)
    assert (np.diff(oracle) <= 1e-12).all() and oracle[-1] < 0.5
    assert np.isnan(sparsification_curve(np.ones(3), np.zeros(3))).all()  # no error: nothing to normalise by
    with pytest.raises(ValueError, match="fractions"):
        sparsification_curve(err, err, [0.0, 1.0])
    with pytest.raises(ValueError, match="same size"):
        sparsification_curve(err[:-1], err)


def test_sparsification_curve_averages_ties_like_random_tie_breaking():
    rng, err = _errors(200)
    coarse = rng.integers(0, 3, err.size).astype(float)  # three tie groups
    fractions = [0.0, 0.1, 0.33, 0.5, 0.7]
    expected = np.mean([sparsification_curve(coarse + 1e-6 * rng.random(err.size), err, fractions)
                        for _ in range(3000)], axis=0)  # random order inside each group
    np.testing.assert_allclose(sparsification_curve(coarse, err, fractions), expected, atol=5e-3)  # MC error ~1e-3
    for e in (np.sort(err), np.sort(err)[::-1]):  # constant map: the flat line, whatever the voxel order
        np.testing.assert_allclose(sparsification_curve(np.zeros(err.size), e), 1.0)
    perm = rng.permutation(err.size)  # the voxel order does not matter
    np.testing.assert_allclose(sparsification_curve(coarse[perm], err[perm]), sparsification_curve(coarse, err))


def _qa_of_uncertainty(uncertainty, err):
    """confidence_qa with pred = 0 and target = err, so the error is err and M = 1 - uncertainty."""
    return confidence_qa(torch.as_tensor(1.0 - uncertainty), torch.zeros(err.size), torch.as_tensor(err))


def test_ause_perfect_random_negated_and_constant_maps():
    rng, err = _errors()
    perfect = _qa_of_uncertainty(err, err)
    assert perfect["qa_ause"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["qa_sparsification_gain"] == pytest.approx(1.0, abs=1e-5)
    random = _qa_of_uncertainty(rng.random(err.size), err)
    negated = _qa_of_uncertainty(-err, err)
    assert negated["qa_ause"] > random["qa_ause"] > perfect["qa_ause"]
    assert negated["qa_sparsification_gain"] < 0 and abs(random["qa_sparsification_gain"]) < 0.1
    oracle = sparsification_curve(err, err)
    assert random["qa_ause"] == pytest.approx(np.mean(1 - oracle), abs=0.03)  # the flat line minus the oracle
    constant = _qa_of_uncertainty(np.full(err.size, 0.3), err)
    assert abs(constant["qa_sparsification_gain"]) < 0.05
    assert constant["qa_ause"] == pytest.approx(np.mean(1 - oracle), abs=1e-4)


def test_ause_is_restricted_to_the_foreground():
    rng, err = _errors(2000)
    mask = rng.random(err.size) > 0.5
    unc = np.where(mask, err, -err)  # perfect inside the foreground, inverted outside
    out = confidence_qa(torch.as_tensor(1.0 - unc), torch.zeros(err.size), torch.as_tensor(err),
                        mask=torch.as_tensor(mask))
    assert out["qa_ause"] == pytest.approx(0.0, abs=1e-6)


def test_new_keys_are_floats_and_nan_when_undefined():
    pred, target = _volume()
    out = confidence_qa(torch.rand_like(pred), pred, target)
    assert set(out) == set(QA_KEYS) and {"qa_ause", "qa_sparsification_gain"} <= set(out)
    assert all(isinstance(v, float) for v in out.values()) and math.isfinite(out["qa_ause"])
    mask = torch.zeros_like(pred)
    mask.view(-1)[3] = 1  # a one-voxel foreground
    tiny = confidence_qa(torch.rand_like(pred), pred, target, mask=mask)
    assert all(math.isnan(tiny[k]) for k in ("qa_ause", "qa_sparsification_gain", "qa_auroc_worst"))
    exact = confidence_qa(torch.rand_like(pred), target, target)  # no error at all
    assert math.isnan(exact["qa_ause"]) and math.isnan(exact["qa_sparsification_gain"])
