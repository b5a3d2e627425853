from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine

from custom_components.schedules import IterationLrSchedule


def _run(schedule, max_epochs, epoch_length=5, start=0, resume_at=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    seen = []
    engine = Engine(lambda e, b: seen.append(opt.param_groups[0]["lr"]))
    IterationLrSchedule([opt, None], schedule, start=start).attach(engine)
    engine.run(range(epoch_length), max_epochs=max_epochs)
    return seen


def test_cosine_runs_from_base_to_zero_after_start():
    lrs = _run("cosine", 2, start=2)
    assert lrs[:3] == pytest.approx([0.1, 0.1, 0.1])
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 8)) for i in range(2, 10)]
    assert lrs[2:] == pytest.approx(expected)
    assert lrs[-1] < lrs[3] < 0.1


def test_constant_leaves_the_rate_alone():
    assert _run("constant", 2) == pytest.approx([0.1] * 10)


def test_rate_depends_only_on_the_iteration_so_a_resume_continues_the_curve():
    sched = IterationLrSchedule([torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)], "cosine")
    assert sched.factor(0, 10) == 1.0 and sched.factor(5, 10) == pytest.approx(0.5) and sched.factor(10, 10) == 0.0


def test_bad_options_are_named():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="min_factor"):
        IterationLrSchedule([opt], "cosine", min_factor=2)
    with pytest.raises(ValueError):
        IterationLrSchedule([opt], "linear")


def test_delayed_validation_runs_only_after_the_warmup_every_interval():
    from custom_components.schedules import DelayedValidationHandler

    validated = []
    validator = Engine(lambda e, b: None)
    validator.run = lambda epoch: validated.append(epoch)
    trainer = Engine(lambda e, b: None)
    DelayedValidationHandler(validator, interval=2, start_iteration=9).attach(trainer)
    trainer.run(range(3), max_epochs=8)  # 3 iterations per epoch; epoch 3 ends at iteration 9
    assert validated == [4, 6, 8]


def _validated_epochs(start_iteration, max_epochs, **trainer_attrs):
    from custom_components.schedules import DelayedValidationHandler

    validated = []
    validator = Engine(lambda e, b: None)
    validator.run = lambda epoch: validated.append(epoch)
    trainer = Engine(lambda e, b: None)
    for name, value in trainer_attrs.items():
        setattr(trainer, name, value)
    DelayedValidationHandler(validator, interval=2, start_iteration=start_iteration).attach(trainer)
    trainer.run(range(3), max_epochs=max_epochs)
    return validated


def test_a_run_that_ends_within_the_warmup_still_validates():
    """240 epochs with a 1920-iteration warm-up (8 per epoch) never reached the adversarial phase and saved no
    model.pt at all; such a run is a plain UNet and validates from the start."""
    assert _validated_epochs(9, 3) == [2]  # 9 iterations in all = the warm-up
    assert _validated_epochs(100, 6) == [2, 4, 6]
    assert _validated_epochs(9, 8) == [4, 6, 8]  # longer than the warm-up: delayed as before


def test_a_trainer_without_discriminators_is_not_delayed():
    assert _validated_epochs(9, 8, global_critic=None, local_discriminator=None) == [2, 4, 6, 8]
    assert _validated_epochs(9, 8, global_critic=None, local_discriminator=object()) == [4, 6, 8]
