"""Handlers and output transforms of custom_components.handlers, driven by dummy ignite engines (no model needed)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from custom_components.handlers import (
    GradientPenaltyHandler,
    attach_handlers,
    every_n_iterations,
    image_panels,
    loss_terms,
)
from custom_components.trainer import DualAttentionKeys


def test_loss_terms_reads_the_float_terms_of_a_dict_or_its_decollated_form():
    out = {DualAttentionKeys.LOSS: 1.0, DualAttentionKeys.RECON: 0.5, DualAttentionKeys.PRED: torch.zeros(1, 1, 2, 2),
           "step": 3}
    assert loss_terms(out) == loss_terms([out]) == {"loss": 1.0, "loss_recon": 0.5}  # no tensor, no int
    assert all(type(k) is str for k in loss_terms(out))
    with pytest.raises(TypeError, match="int"):
        loss_terms(3)


def test_image_panels_stack_synthetic_and_confidence_as_channels():
    pred, conf = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert torch.equal(image_panels({DualAttentionKeys.PRED: pred}), pred)
    panels = image_panels({DualAttentionKeys.PRED: pred, DualAttentionKeys.CONFIDENCE: conf})
    assert panels.shape == (2, 2, 4, 4) and torch.equal(panels[:, 1:], conf)


def test_attach_handlers_attaches_in_order_and_skips_disabled_ones():
    engine, seen = Engine(lambda e, b: None), []

    class Probe:
        def __init__(self, name):
            self.name = name

        def attach(self, eng):
            eng.add_event_handler(Events.STARTED, lambda _: seen.append(self.name))

    attach_handlers(engine, [Probe("saver"), None, Probe("loader")])
    engine.run([0], max_epochs=1)
    assert seen == ["saver", "loader"]


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
