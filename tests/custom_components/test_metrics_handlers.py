from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from custom_components.handlers import GradientPenaltyHandler, every_n_iterations
from custom_components.metrics import MaskedRegressionMetric, batch_items, masked_mae, masked_psnr


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
        return [{"pred": pred, "label": target}]

    engine = Engine(step)
    from monai.handlers import from_engine

    metric = MaskedRegressionMetric("mae", output_transform=from_engine(["pred", "label"]),
                                    batch_transform=batch_items("label"))
    metric.attach(engine, "mae_tumour")
    engine.run(vols, max_epochs=1)
    assert engine.state.metrics["mae_tumour"] == pytest.approx(0.5)


def test_gradient_penalty_handler_logs_without_training():
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    before = [p.clone() for p in critic.parameters()]
    handler = GradientPenaltyHandler(critic, lambda_gp=10.0, output_transform=lambda o: (o["real"], o["fake"]),
                                     interval=2)
    engine = Engine(lambda e, b: {"real": torch.rand(3, 1, 4, 4), "fake": torch.rand(3, 1, 4, 4)})
    handler.attach(engine)
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.metrics.get("gradient_penalty")))
    engine.run([0] * 4, max_epochs=1)
    assert seen[0] is None and seen[1] is not None and seen[1] > 0
    w = critic[1].weight.detach()
    assert seen[-1] == pytest.approx(10.0 * (w.norm().item() - 1.0) ** 2, rel=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, critic.parameters()))
    with pytest.raises(ValueError, match="interval"):
        GradientPenaltyHandler(critic, interval=0)


def test_every_n_iterations_filter():
    f = every_n_iterations(3)
    assert [i for i in range(1, 10) if f(None, i)] == [3, 6, 9]
    with pytest.raises(ValueError, match="n must be"):
        every_n_iterations(0)


def test_error_weighted_sampling_moves_weight_to_wrong_regions():
    from monai.data import CacheDataset
    from monai.inferers import SimpleInferer

    from custom_components.handlers import ErrorWeightedSampling

    target = torch.zeros(1, 8, 8, 4)
    target[:, :2] = 1.0  # the identity "generator" gets this corner wrong
    item = {"source": torch.zeros(1, 8, 8, 4), "target": target, "sampling_weight": torch.ones(1, 8, 8, 4)}
    ds = CacheDataset([item], transform=None, progress=False)
    net = torch.nn.Conv3d(1, 1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ErrorWeightedSampling(ds, net, SimpleInferer(), error_weight=4.0)()
    w = ds._cache[0]["sampling_weight"]
    # mean error in the foreground is 1/4, so a wrong voxel gets 1 + 4 * 1 / 0.25 = 17, a right one stays 1
    assert torch.allclose(w[:, :2], torch.full_like(w[:, :2], 17.0)) and torch.equal(w[:, 2:], torch.ones_like(w[:, 2:]))
    with pytest.raises(ValueError, match="error_weight"):
        ErrorWeightedSampling(ds, net, SimpleInferer(), error_weight=0)
    with pytest.raises(TypeError, match="CacheDataset"):
        ErrorWeightedSampling([item], net, SimpleInferer())
