from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine

from custom_components.engines.schedules import IterationLrSchedule


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
    from custom_components.engines.schedules import DelayedValidationHandler

    validated = []
    validator = Engine(lambda e, b: None)
    validator.run = lambda epoch: validated.append(epoch)
    trainer = Engine(lambda e, b: None)
    DelayedValidationHandler(validator, interval=2, start_iteration=9).attach(trainer)
    trainer.run(range(3), max_epochs=8)  # 3 iterations per epoch; epoch 3 ends at iteration 9
    assert validated == [4, 6, 8]


def _validated_epochs(start_iteration, max_epochs, **trainer_attrs):
    from custom_components.engines.schedules import DelayedValidationHandler

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


def test_the_delay_does_not_depend_on_the_networks():
    """error_weighted has no discriminator but an attention phase: its candidates before the attention starts were
    eligible (the delay was dropped for every trainer without discriminators). The schedule decides the start."""
    assert _validated_epochs(9, 8, global_critic=None, local_discriminator=None) == [4, 6, 8]
    assert _validated_epochs(9, 8, global_critic=None, local_discriminator=object()) == [4, 6, 8]
    assert _validated_epochs(0, 8, global_critic=None, local_discriminator=None) == [2, 4, 6, 8]  # unet: start 0


# --------------------------------------------------------------------------- PhaseSchedule: phases follow the data
from custom_components import bundle_options  # noqa: E402
from custom_components.engines.schedules import PhaseSchedule, check_selection_metric, iterations_per_epoch  # noqa: E402

#: the schedule's options as the bundle sets them: their one default, train.json's (PhaseSchedule restates none)
BUNDLE = bundle_options()


def _schedule(epochs, iterations, variant, **kwargs):
    """A PhaseSchedule with train.json's start fractions and model-selection switch, unless ``kwargs`` set them."""
    defaults = {"adversarial_start": BUNDLE.adversarial_start, "attention_start": BUNDLE.attention_start,
                "select_after_warmup": BUNDLE.select_after_warmup}
    return PhaseSchedule(epochs, iterations, variant, **{**defaults, **kwargs})


@pytest.mark.parametrize("n, batch, world, expected", [(16, 2, 1, 8), (12, 2, 1, 6), (1251, 2, 1, 626), (2, 2, 1, 1),
                                                       (200, 2, 4, 25), (5, 2, 2, 2)])
def test_iterations_per_epoch_follow_subjects_batch_and_ranks(n, batch, world, expected):
    assert iterations_per_epoch(n, batch, world) == expected


@pytest.mark.parametrize("n_train", [2, 12, 16, 200, 1251])
def test_default_fractions_give_every_data_set_size_the_same_phases(n_train):
    """The fixed 1920-iteration warm-up left a 12-subject set a silent UNet; fractions give each size the same run."""
    s = _schedule(300, iterations_per_epoch(n_train, 2), "dual_attention", val_interval=5)
    assert BUNDLE.adversarial_start == 0.8  # train.json's: 80 % of the run plain L1, whatever the size
    assert s.adversarial_warmup == math.floor(BUNDLE.adversarial_start * s.total + 1e-9)
    assert s.adversarial_warmup < s.attention_begins_after < s.total
    assert s.selection_begins_after == s.attention_begins_after
    text = s.describe()
    assert f"discriminators: from iteration {s.adversarial_warmup + 1} (epoch 241)" in text
    assert "attention: from iteration" in text and "model selection: validations from epoch" in text


def test_the_users_12_subject_100_epoch_run_trains_its_discriminators():
    s = _schedule(100, iterations_per_epoch(12, 2), "dual_attention", val_interval=5)  # 6 iterations per epoch
    assert s.adversarial_warmup == 480 and s.total == 600 and s.attention_begins_after == 492


@pytest.mark.parametrize("kwargs, message", [
    ({"adversarial_iterations": 1920}, "discriminators would never train"),  # the old fixed count on a small set
    ({"adversarial_start": 1.0, "attention_start": 1.0}, "discriminators would never train"),
    ({"attention_start": 1.0}, "attention would never start"),
    ({"val_interval": 7}, "no validation would select a model"),  # 6 epochs, first validation at epoch 7
    ({"attention_start": 0.5}, "must be >= adversarial_start"),
    ({"adversarial_start": 1.5}, "adversarial_start must be a fraction"),
    ({"adversarial_iterations": -1}, "adversarial_warmup must be an integer"),
])
def test_a_schedule_that_never_reaches_its_phases_is_refused_with_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        _schedule(6, iterations_per_epoch(12, 2), "dual_attention", **kwargs)
    if "never" in message:
        assert "6 epochs x 6 iterations = 36 iterations" in str(err.value)


def test_unet_has_no_phases_and_validates_from_the_start():
    s = _schedule(2, 1, "unet", adversarial_start=0.99, attention_start=0.99)
    assert s.selection_begins_after == 0
    assert _schedule(4, 2, "error_weighted").selection_begins_after == 6


def test_explicit_iterations_override_the_fractions_and_selection_can_start_at_once():
    s = _schedule(10, 4, "dual", adversarial_iterations=0, attention_iterations=3, select_after_warmup=False)
    assert (s.adversarial_warmup, s.attention_warmup, s.selection_begins_after) == (0, 3, 0)


def test_the_trainer_must_run_the_epochs_the_schedule_was_resolved_for():
    from ignite.engine import Engine

    s = _schedule(3, 4, "dual_attention")
    engine = Engine(lambda e, b: None)
    s.attach(engine)
    with pytest.raises(ValueError, match="resolved for 3 x 4"):
        engine.run([0, 1, 2], max_epochs=3)  # 3 iterations per epoch, not 4


def test_selection_metric_must_be_computed_and_higher_is_better():
    metrics = {"val_psnr": 0}, {"val_ssim": 0, "val_mae": 0, "val_psnr_tumour": 0, "val_qa": 0}
    assert check_selection_metric("val_psnr_tumour", *metrics) == "val_psnr_tumour"
    for bad in ("val_mae", "val_qa", "val_psnr_brain"):
        with pytest.raises(ValueError, match="selection_metric"):
            check_selection_metric(bad, *metrics)
