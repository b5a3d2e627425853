"""The trainer's non-finite guard: parameters and buffers checked after every update, and a true message."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import UNet

from custom_components import DualAttentionTrainer, GlobalCritic, LocalDiscriminator
from unit_options import trainer_options


def _trainer(max_epochs=2):
    torch.manual_seed(0)
    g = UNet(2, 1, 1, (4, 8, 16), (2, 2), num_res_units=0, norm="batch")
    d1 = GlobalCritic(2, channels=(4, 8, 8, 8), fc_features=(8, 4, 1))
    d2 = LocalDiscriminator(2, channels=(4, 4, 8, 8))
    factory = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    batches = [{"source": torch.rand(2, 1, 16, 16, generator=gen), "target": torch.rand(2, 1, 16, 16, generator=gen)}
               for _ in range(2)]
    trainer = DualAttentionTrainer("cpu", max_epochs, batches, g, torch.optim.Adam(g.parameters(), lr=1e-3),
                                   "dual_attention", d1, factory, d2, factory, **trainer_options())
    return trainer, g, d1, d2


def test_infinite_batchnorm_statistics_stop_training_naming_the_buffer():
    trainer, g, _, _ = _trainer()
    bn = next(m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d))

    @trainer.on(Events.ITERATION_STARTED(once=3))
    def blow_up(engine):  # as after a diverging forward pass: infinite running variance, finite losses
        bn.running_var.fill_(float("inf"))

    with pytest.raises(FloatingPointError) as e:
        trainer.run()
    msg = str(e.value)
    assert "iteration 3 (epoch 2): after the update of generator" in msg and "running_var" in msg
    assert "Already updated in this iteration: global_critic, local_discriminator, generator" in msg


def test_nonfinite_generator_loss_says_which_networks_already_stepped():
    trainer, _, _, d2 = _trainer()

    def nan_for_generator(module, inputs, output):  # only while D2 is frozen, i.e. in G's update
        return output * float("nan") if not next(module.parameters()).requires_grad else output

    d2.register_forward_hook(nan_for_generator)
    with pytest.raises(FloatingPointError) as e:
        trainer.run()
    msg = str(e.value)
    assert "iteration 1 (epoch 1): loss term 'loss" in msg and "is nan" in msg
    assert "Already updated in this iteration: global_critic, local_discriminator;" in msg
    assert "keep the weights of the previous iteration" not in msg


def test_nonfinite_first_loss_says_nothing_was_updated():
    trainer, g, _, _ = _trainer()
    g.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(FloatingPointError, match="No network was updated in this iteration"):
        trainer.run()


def test_finite_training_is_not_stopped():
    trainer, g, _, _ = _trainer(max_epochs=1)
    trainer.run()
    assert trainer.state.iteration == 2
    assert all(torch.isfinite(t).all() for t in list(g.parameters()) + list(g.buffers()) if t.is_floating_point())


def test_the_guard_is_its_own_handler_and_forgets_the_updates_of_the_previous_iteration():
    """Driven by a dummy engine: each iteration updates one network; the record starts empty at every iteration."""
    from ignite.engine import Engine

    from custom_components.engines.guards import NonFiniteGuard

    guard, net, notes = NonFiniteGuard(), torch.nn.Linear(2, 1), []

    def update(engine, batch):
        notes.append(guard.note())
        guard.check_update(engine, batch, net)
        guard.check_loss(engine, "loss", torch.tensor(float("nan") if engine.state.iteration == 3 else 1.0))

    engine = Engine(update)
    guard.attach(engine)
    with pytest.raises(FloatingPointError, match=r"iteration 3 \(epoch 1\): loss term 'loss' is nan.* updated in this "
                                                 r"iteration: local_discriminator;"):
        engine.run(["generator", "global_critic", "local_discriminator"], max_epochs=1)
    assert all(note.startswith("No network was updated") for note in notes)
    off = NonFiniteGuard(enabled=False)
    off.check_loss(engine, "loss", torch.tensor(float("inf")))  # switched off: nothing raised, the record still kept
    off.check_update(engine, "generator", net)
    assert off.updated == ["generator"]
