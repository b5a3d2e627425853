"""Handlers and output transforms of custom_components.handlers.training, driven by dummy ignite engines (no model needed)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from custom_components.engines.penalty import GradientPenaltyHandler
from custom_components.handlers.training import attach_handlers, every_n_iterations, image_panels, loss_terms
from custom_components.engines.events import EVENT_TO_ATTR, CriticUpdate, DualAttentionEvents
from custom_components.engines.trainer import DualAttentionKeys


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


def _critic_engine(critic, real, fake):
    """A dummy engine whose iteration is one critic update firing the trainer's critic events (no optimizer)."""
    seen = []

    def update(engine, _):
        engine.state.critic_steps += 1
        step = engine.state.critic_update = CriticUpdate(real, fake)
        engine.fire_event(DualAttentionEvents.CRITIC_STARTED)
        step.scores = [critic(x) for x in step.inputs]
        step.loss = step.scores[1].mean() - step.scores[0].mean()
        engine.fire_event(DualAttentionEvents.CRITIC_LOSS_COMPLETED)
        seen.append((len(step.inputs), step.loss.item(), {k: v.item() for k, v in step.terms.items()}))

    engine = Engine(update)
    engine.register_events(*DualAttentionEvents, event_to_attr=EVENT_TO_ATTR)
    return engine, seen


def test_gradient_penalty_handler_adds_the_lazy_penalty_to_every_kth_critic_loss():
    """For a linear critic d(x) = w.x + b the input gradient is w: GP = lambda (||w|| - 1)^2 on every interpolate."""
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    real, fake = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    engine, seen = _critic_engine(critic, real, fake)
    handler = GradientPenaltyHandler(lambda_gp=10.0, interval=2)
    handler.attach(engine)
    engine.run([0] * 4, max_epochs=1)
    with torch.no_grad():
        wasserstein_loss = (critic(fake).mean() - critic(real).mean()).item()
    gp = 10.0 * (critic[1].weight.norm().item() - 1.0) ** 2
    assert [n for n, _, _ in seen] == [2, 3, 2, 3]  # the interpolates are scored only when the penalty is due
    for step, (_, loss, terms) in enumerate(seen, start=1):
        due = step % 2 == 0
        assert loss == pytest.approx(wasserstein_loss + (2 * gp if due else 0.0), rel=1e-5)  # weighted by the interval
        assert terms == ({DualAttentionKeys.GP: pytest.approx(gp, rel=1e-5)} if due else {})
    assert handler.lambda_gp == 10.0
    with pytest.raises(ValueError, match="interval"):
        GradientPenaltyHandler(interval=0)


def test_gradient_penalty_handler_refuses_a_loss_event_without_its_interpolates():
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    engine, _ = _critic_engine(critic, torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4))
    handler = GradientPenaltyHandler()
    engine.add_event_handler(DualAttentionEvents.CRITIC_LOSS_COMPLETED, handler.add_penalty)  # CRITIC_STARTED unhooked
    with pytest.raises(RuntimeError, match="CRITIC_STARTED"):
        engine.run([0], max_epochs=1)


def test_every_n_iterations_filter():
    f = every_n_iterations(3)
    assert [i for i in range(1, 10) if f(None, i)] == [3, 6, 9]
    with pytest.raises(ValueError, match="n must be"):
        every_n_iterations(0)


def test_error_weighted_sampling_moves_weight_to_wrong_regions():
    from monai.data import CacheDataset
    from monai.inferers import SimpleInferer

    from custom_components.handlers.training import ErrorWeightedSampling

    target = torch.zeros(1, 8, 8, 4)
    target[:, :2] = 1.0  # the identity "generator" gets this corner wrong
    item = {"source": torch.zeros(1, 8, 8, 4), "target": target, "sampling_weight": torch.ones(1, 8, 8, 4)}
    ds = CacheDataset([item], transform=None, progress=False)
    net = torch.nn.Conv3d(1, 1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ErrorWeightedSampling(ds, net, SimpleInferer(), interval=5, error_weight=4.0)()
    w = ds._cache[0]["sampling_weight"]
    # mean error in the foreground is 1/4, so a wrong voxel gets 1 + 4 * 1 / 0.25 = 17, a right one stays 1
    assert torch.allclose(w[:, :2], torch.full_like(w[:, :2], 17.0)) and torch.equal(w[:, 2:], torch.ones_like(w[:, 2:]))
    with pytest.raises(ValueError, match="error_weight"):
        ErrorWeightedSampling(ds, net, SimpleInferer(), interval=5, error_weight=0)
    with pytest.raises(TypeError, match="CacheDataset"):
        ErrorWeightedSampling([item], net, SimpleInferer(), interval=5, error_weight=4.0)
