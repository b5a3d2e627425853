"""Issue 20's "every hyperparameter has exactly one default": train.json's top-level id.

No training option restates a value in Python: not in :class:`TrainingOptions`, not in the trainer, and not in any
of the project's components a config feeds from an option (the check below reads every ``_target_`` of every shipped
config). A user of the Python API takes the bundle's values with ``bundle_options``.
"""

from __future__ import annotations

import inspect
import json
import pydoc
import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet

from custom_components import DualAttentionTrainer, GlobalCritic, LocalDiscriminator, TrainingOptions, bundle_options
from custom_components.config.hyperparameters import CONFIG_VALUE, TRAINER_OPTIONS, Variant
from custom_components.data.datalist import PrepareSourceTarget

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.json") if p.name not in ("metadata.json",))

#: defaults that mean "off", "none" or "once" (a component used without the option does nothing extra): not a value of
#: the option restated, so a component may keep them
NEUTRAL = (None, False, 0, 1)
#: the networks keep architectural defaults (a network built without arguments is the paper's, as MONAI's networks
#: have theirs); the bundle passes every one of them from its options
ARCHITECTURE = "custom_components.networks."
#: arguments fed from an option that are not its value (the file's name in messages)
NOT_A_VALUE = {("custom_components.data.datalist.check_splits", "name")}


def _component(target: str):
    """The project's class or function a config's ``_target_`` names (None for other packages)."""
    return pydoc.locate(target) if target.startswith("custom_components.") else None


def _fed_arguments(config: dict):
    """(id path, target, argument, the options it reads) of every argument of the project's components that a config
    feeds from a training option (``"@name"`` or an expression that reads ``@name``)."""
    names = set(TrainingOptions.names())

    def walk(node, path):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str) and _component(node["_target_"]) is not None:
                for key, value in node.items():
                    refs = set(re.findall(r"@(\w+)", value)) & names if isinstance(value, str) else set()
                    if refs:
                        yield path, node["_target_"], key, refs
            for key, value in node.items():
                yield from walk(value, f"{path}#{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}#{i}")

    yield from walk(config, "")


def _restated(file: str) -> list[str]:
    found = []
    for path, target, argument, refs in _fed_arguments(json.loads((CONFIGS / file).read_text())):
        obj = _component(target)
        parameters = inspect.signature(obj).parameters
        if argument not in parameters or (target, argument) in NOT_A_VALUE:
            continue
        default = parameters[argument].default
        neutral = default is inspect.Parameter.empty or any(default is n or (type(default) in (int, float)
                                                            and type(n) is int and default == n) for n in NEUTRAL)
        if not neutral and not obj.__module__.startswith(ARCHITECTURE):
            found.append(f"{file}{path}: {target}({argument}={default!r}) is fed from {sorted(refs)}")
    return found


@pytest.mark.parametrize("file", CONFIG_FILES)
def test_no_component_restates_the_value_of_an_option_it_is_fed(file):
    assert _restated(file) == []


def test_the_check_finds_a_restated_value(monkeypatch):
    """The check itself: a default such as the trainer's old lambda_adv_global=0.01 is found."""
    from custom_components.engines import schedules

    original = schedules.PhaseSchedule.__init__

    def restating(self, epochs, iterations_per_epoch, variant="dual_attention", *, adversarial_start=0.8,
                  attention_start, **kwargs):
        original(self, epochs, iterations_per_epoch, variant, adversarial_start=adversarial_start,
                 attention_start=attention_start, **kwargs)

    monkeypatch.setattr(schedules.PhaseSchedule, "__init__", restating)
    found = _restated("train.json")
    assert any("PhaseSchedule(variant='dual_attention') is fed from ['variant']" in f for f in found), found
    assert any("PhaseSchedule(adversarial_start=0.8)" in f for f in found), found
    assert len(found) == 2


def test_the_trainer_and_the_schedule_are_among_the_checked_components():
    fed = {(t, a) for _, t, a, _ in _fed_arguments(json.loads((CONFIGS / "train.json").read_text()))}
    assert ("custom_components.DualAttentionTrainer", "lambda_adv_global") in fed
    assert ("custom_components.engines.schedules.PhaseSchedule", "attention_start") in fed
    trainer = {a for t, a in fed if t == "custom_components.DualAttentionTrainer"}
    # every trainer option but the warm-ups, which the schedule resolves from its options (checked there)
    assert set(TRAINER_OPTIONS) - trainer == {"attention_warmup", "adversarial_warmup"}
    assert {("custom_components.engines.schedules.PhaseSchedule", a)
            for a in ("adversarial_iterations", "attention_iterations")} <= fed


# --- the bundle's options for the Python API ---------------------------------------------------------------------


def _top(file: str) -> dict:
    return json.loads((CONFIGS / file).read_text())


def test_bundle_options_are_train_json_values():
    options, config = bundle_options(), _top("train.json")
    for name in ("variant", "lambda_adv_global", "gp_interval", "attention_norm", "n_critic", "epochs", "lr_g"):
        stored = getattr(options, name)
        assert (stored.value if hasattr(stored, "value") else stored) == config[name], name
    assert options.attention_warmup is None and options.adversarial_warmup is None  # null: from the fractions
    assert all(getattr(options, n) is not CONFIG_VALUE for n in TrainingOptions.names())


def test_an_overlay_and_the_overrides_win_in_order():
    paper = _top("paper.json")
    options = bundle_options(overlays=["paper.json"], beta=3.0)
    assert options.variant is Variant(paper["variant"]) and options.n_critic == paper["n_critic"] == 5
    assert options.gp_interval == paper["gp_interval"] and options.fresh_batches.value == paper["fresh_batches"]
    assert options.lambda_adv_global == _top("train.json")["lambda_adv_global"]  # paper.json leaves it
    assert options.beta == 3.0


def test_bundle_options_refuse_an_unknown_option_or_overlay():
    with pytest.raises(ValueError, match="'lamda_gp' .* did you mean 'lambda_gp'"):
        bundle_options(lamda_gp=5.0)
    with pytest.raises(ValueError, match="gp_interval must be an integer >= 1"):
        bundle_options(gp_interval=0)
    with pytest.raises(FileNotFoundError, match=r"overlay 'papr.json' not found \(looked in .*configs\)"):
        bundle_options(overlays=["papr.json"])


def test_trainer_kwargs_name_what_is_missing():
    with pytest.raises(ValueError, match="the trainer needs variant, beta, p, .*bundle_options"):
        TrainingOptions(epochs=3).trainer_kwargs()


def test_the_papers_method_trains_from_the_bundle_options():
    """The Python API's path: the paper's options from train.json + paper.json, two iterations of all three nets."""
    options = bundle_options(overlays=["paper.json"], attention_warmup=0, adversarial_warmup=0, n_critic=2)
    torch.manual_seed(0)
    g = UNet(2, 1, 1, (4, 8), (2,), num_res_units=0)
    d1 = GlobalCritic(2, channels=(4, 8, 8, 8), fc_features=(8, 4, 1), norm=None)
    d2 = LocalDiscriminator(2, channels=(4, 4, 8, 8))
    factory = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    batches = [{"source": torch.rand(2, 1, 16, 16), "target": torch.rand(2, 1, 16, 16)} for _ in range(2)]
    trainer = DualAttentionTrainer("cpu", 1, batches, g, torch.optim.Adam(g.parameters(), lr=1e-3),
                                   global_critic=d1, global_optimizer=factory, local_discriminator=d2,
                                   local_optimizer=factory, prepare_batch=PrepareSourceTarget(),
                                   **options.trainer_kwargs())
    trainer.run()
    assert trainer.variant is Variant.DUAL_ATTENTION and trainer.state.iteration == 2
    assert trainer.state.critic_steps == 4  # paper.json's lazy-free penalty at each of n_critic=2 steps per iteration
    assert trainer.gp_interval == 1
