"""One validated options object (issue 20, item 1): TrainingOptions holds every training option's default, type and
range; the trainer, validate_hyperparameters (train.json's check_options), run_options and the command-line check
all go through it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from custom_components import DualAttentionTrainer, TrainingOptions, Variant, validate_hyperparameters
from custom_components.utils.errors import project_error
from custom_components.config.hyperparameters import (CONFIG_VALUE, TRAINER_OPTIONS, FreshBatches, LocalTarget,
                                                      check_overrides)
from custom_components.losses.synthesis import AttentionNorm, AttentionSource
from custom_components.config.options import OPTION_RULES
from unit_options import trainer_options

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"

#: values each option must refuse (every option with a rule is listed: a test below keeps it so)
BAD_VALUES: dict[str, list] = {
    "variant": ["gan", "", None, 3],
    "beta": [-0.5, "2", None, float("nan"), float("inf"), True],
    "p": [0, 3, 1.5, "1", True],
    "lambda_gp": [-1, "10"], "lambda_adv_global": [-0.01, None], "lambda_adv_local": [-1e-9, "0.05"],
    "n_critic": [0, -1, 1.0, True, "5"],
    "attention_warmup": [-2, 1.5, "10"], "adversarial_warmup": [-1, 0.5, "3"],
    "attention_norm": ["max", None], "attention_floor": [-0.1, 1.01, "0.5"],
    "local_conditional": ["maybe", 2], "fresh_batches": ["some", True],
    "attention_source": ["attention", None], "local_target": ["soft", 1],
    "n_local": [0, 1.0, True], "local_mix_cell": [0, 8.0, False], "attention_smoothing": [-1.0, "1.5"],
    "local_ema": [1.0, -0.1, 1.5, "0.9", True], "precision": ["int8", "fp64", None], "gp_interval": [0, 4.0, "4", True],
    "epochs": [0, "ten", 2.5], "val_interval": [0, None], "seed": ["zero", 1.5, None], "spatial_dims": [1, 4, "2", 2.0],
    "patch_size": [96, [], [96, 0], [96.0, 96], "[96, 96]"], "batch_size": [0, "2"], "samples_per_volume": [0, 1.5],
    "tumour_weight": [-1, "0"], "hard_sampling": ["maybe"], "error_weight": [-4.0], "error_interval": [0],
    "lr_g": [0, -1e-3, "1e-3"], "lr_global_critic": [0.0], "lr_local_discriminator": [-1], "lr_error_head": [None],
    "betas_g": [[0.5], [0.5, 1.0], [-0.1, 0.9], "0.5,0.999"], "betas_global_critic": [[0.5, 0.999, 0.1]], "betas_local_discriminator": [None],
    "select_after_warmup": ["later"], "generator_channels": [[16, 0], 16], "local_channels": [[]],
    "local_stem_stride": [0], "error_head": ["sometimes"], "error_head_channels": [[16.0]],
    "error_head_stem_stride": [0], "metric_range": [0, -1.0],
}
#: options without a rule: checked where they are used (schedule, networks, data)
CHECKED_WHERE_USED = {"datalist", "lr_schedule", "adversarial_start", "attention_start", "selection_metric",
                      "pretrained_generator", "critic_norm", "critic_downsample", "critic_act"}


def _tiny_trainer(**options):
    g = UNet(2, 1, 1, (4, 8), (2,), num_res_units=0)
    return DualAttentionTrainer("cpu", 1, [], g, torch.optim.Adam(g.parameters()),
                                **trainer_options(**{"variant": "unet", **options}))


def test_every_checked_option_has_bad_values_in_this_test():
    checked = {f.name for f in dataclasses.fields(TrainingOptions) if f.metadata["rule"] is not None}
    assert checked == set(BAD_VALUES)
    assert set(TrainingOptions.names()) == checked | CHECKED_WHERE_USED


@pytest.mark.parametrize("name,value", [(n, v) for n, values in BAD_VALUES.items() for v in values])
def test_every_bad_value_of_every_option_is_refused_naming_option_value_and_expectation(name, value):
    rule = TrainingOptions.rule(name)
    with pytest.raises(ValueError) as error:
        TrainingOptions.from_mapping({name: value})
    assert str(error.value) == f"{name} must be {rule.expected}, got {value!r}."


@pytest.mark.parametrize("name,value", [(n, v) for n, values in BAD_VALUES.items() if n in TRAINER_OPTIONS
                                        for v in values])
def test_the_trainer_refuses_every_bad_value_of_its_options_naming_the_option(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be "):
        _tiny_trainer(**{name: value})


def test_the_trainer_takes_its_options_without_a_default_of_its_own():
    """One default per option, train.json's: the trainer's training options have no keyword default."""
    signature = inspect.signature(DualAttentionTrainer.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(TrainingOptions)}
    takes = [name for name in signature if name in fields]
    assert takes == list(TRAINER_OPTIONS)  # the fields marked as the trainer's are exactly those it takes
    for name in TRAINER_OPTIONS:
        assert signature[name].default is inspect.Parameter.empty, name
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'gp_interval'"):
        g = UNet(2, 1, 1, (4, 8), (2,), num_res_units=0)
        options = trainer_options(variant="unet")
        del options["gp_interval"]
        DualAttentionTrainer("cpu", 1, [], g, torch.optim.Adam(g.parameters()), **options)


def test_the_trainer_holds_the_checked_and_converted_values():
    trainer = _tiny_trainer(beta=3, local_conditional="false", attention_norm="mean", fresh_batches="generator",
                            local_target="mixed", local_ema=0, gp_interval=4, attention_warmup=7)
    assert trainer.beta == 3.0 and isinstance(trainer.beta, float)
    assert trainer.local_conditional is False  # bool("false") would be True
    assert trainer.attention_norm is AttentionNorm.MEAN and trainer.fresh_batches is FreshBatches.GENERATOR
    assert trainer.local_target is LocalTarget.MIXED and trainer.variant is Variant.UNET
    assert (trainer.gp_interval, trainer.attention_warmup, trainer.local_ema) == (4, 7, 0.0)


@pytest.mark.parametrize("name,start", [("attention_warmup", "attention_start"),
                                        ("adversarial_warmup", "adversarial_start")])
def test_a_warmup_left_to_the_config_is_refused_by_the_trainer(name, start):
    TrainingOptions(**{name: None})  # a config's null: resolved from the start fraction by its schedule
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 0 here, got None; .* from {start}"):
        _tiny_trainer(**{name: None})


@pytest.mark.parametrize("given,closest", [("lamda_gp", "lambda_gp"), ("betta", "beta"), ("gp_intervall", "gp_interval"),
                                           ("local_emma", "local_ema"), ("atention_norm", "attention_norm")])
def test_an_unknown_key_is_refused_with_the_closest_name(given, closest):
    with pytest.raises(ValueError, match=rf"^'{given}' \(value 0\.5\) is not a training option: did you mean "
                                         rf"'{closest}'\?"):
        TrainingOptions.from_mapping({"beta": 1.0, given: 0.5})


def test_unknown_keys_are_all_named_and_a_far_name_gets_no_guess():
    with pytest.raises(ValueError) as error:
        TrainingOptions.from_mapping({"zzz": 1, "lr_gg": 1e-3})
    assert "'zzz' (value 1) is not a training option: no option has a similar name" in str(error.value)
    assert "'lr_gg' (value 0.001) is not a training option: did you mean 'lr_g'?" in str(error.value)


def test_validate_hyperparameters_does_not_drop_a_mistyped_option():
    options = {**TrainingOptions().as_dict(), "lambda_adv_gobal": 0.5}
    with pytest.raises(ValueError, match="did you mean 'lambda_adv_global'"):
        validate_hyperparameters(**options)


def test_validate_hyperparameters_returns_the_checked_options():
    options = validate_hyperparameters(variant="dual", beta=1, lambda_adv_global=0.001)
    assert isinstance(options, TrainingOptions)
    assert (options.variant, options.beta, options.lambda_adv_global) == (Variant.DUAL, 1.0, 0.001)
    assert options.gp_interval is CONFIG_VALUE  # a missing option is left to train.json, its one default


def test_values_are_stored_as_their_types():
    options = TrainingOptions(variant="dual", attention_source="gap", local_conditional="yes", hard_sampling="off",
                              beta=2, local_ema=0)
    assert options.variant is Variant.DUAL and options.attention_source is AttentionSource.GAP
    assert options.local_conditional is True and options.hard_sampling is False
    assert type(options.beta) is float and type(options.local_ema) is float
    assert options.as_dict()["variant"] == "dual" and type(options.as_dict()["variant"]) is str
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beta = 3.0


@pytest.mark.parametrize("source", ["gap", "predicted"])
def test_error_weighted_refuses_a_map_of_the_local_discriminator(source):
    TrainingOptions(variant="dual_attention", attention_source=source)
    with pytest.raises(ValueError, match=f"variant 'error_weighted' always weights by the error; attention_source "
                                         f"'{source}'"):
        TrainingOptions(variant="error_weighted", attention_source=source)


def test_the_command_line_check_uses_the_options_rules():
    for name in set(OPTION_RULES) & set(TrainingOptions.names()):
        assert OPTION_RULES[name] is TrainingOptions.rule(name), name


# --- the bundle's configs ------------------------------------------------------------------------------------------


def _train_json() -> dict:
    return json.loads((CONFIGS / "train.json").read_text())


def test_run_options_are_exactly_the_options_object():
    """What run_config.json records and MLflow receives (run_options) is every option of TrainingOptions, by name."""
    run_options = _train_json()["run_options"]
    assert sorted(run_options) == sorted(TrainingOptions.names())
    assert all(value == f"@{name}" for name, value in run_options.items())  # each the top-level id of its name


def test_every_option_has_its_one_default_in_train_json():
    """Issue 20 ("every hyperparameter has exactly one default"): no option restates a value in Python (its field
    holds CONFIG_VALUE), the trainer's included, and train.json defines each at its top level."""
    config = _train_json()
    for f in dataclasses.fields(TrainingOptions):
        assert f.default is CONFIG_VALUE, f.name
        assert f.name in config, f.name
    assert "epochs" not in TrainingOptions(beta=1.0).as_dict()  # left to train.json: not recorded as a marker
    assert TrainingOptions(beta=1.0).as_dict() == {"beta": 1.0}


@pytest.mark.parametrize("overlays", [[], ["paper.json"], ["3d.json"], ["mrct.json"]])
def test_the_shipped_configs_pass_and_their_values_win(overlays):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ["train.json", *overlays]])
    options = parser.get_parsed_content("check_options")
    assert isinstance(options, TrainingOptions)
    for name in TrainingOptions.names():
        given = parser.get_parsed_content(name)
        assert options.as_dict()[name] == (given if name not in ("local_conditional", "hard_sampling",
                                                                 "select_after_warmup", "error_head") else bool(given))
    assert options.gp_interval == (1 if overlays == ["paper.json"] else 4)  # train.json's 4, paper.json's 1
    assert options.lambda_adv_global == 0.001


def test_a_mistyped_run_option_in_a_config_is_refused():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["run_options"]["lambda_gpp"] = "@lambda_gp"
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps a component's error
        parser.get_parsed_content("check_options")
    error = project_error(raised.value)
    assert isinstance(error, ValueError) and "'lambda_gpp' (value 10.0) is not a training option: did you mean " \
        "'lambda_gp'?" in str(error)


def test_the_options_module_stands_on_the_ground_floor():
    """It imports only the standard library, monai.utils and the losses' enums: never the trainer (no cycle)."""
    tree = ast.parse(Path(inspect.getfile(TrainingOptions)).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    package = {m for m in imported if m.startswith(".")}
    assert package == {"..losses.synthesis"}
    assert not {m for m in imported - package if not re.match(r"^(__future__|dataclasses|difflib|math|re|collections"
                                                              r"\.abc|typing|monai\.utils)$", m)}


def test_a_name_from_before_the_rename_is_refused_naming_the_new_one():
    """0.4.0 renamed the networks' options (lr_d1 -> lr_global_critic, ...); the old name is not taken silently and
    the message names its successor, which difflib alone would not find (the names are too different)."""
    with pytest.raises(ValueError, match=r"'lr_d1' \(value 0.001\) is not a training option: did you mean "
                                         r"'lr_global_critic'\?"):
        TrainingOptions.from_mapping({"lr_d1": 0.001})
    with pytest.raises(ValueError, match=r"'local_d_file' is not an option of the configs: did you mean "
                                         r"'local_discriminator_file'\?"):
        check_overrides({"local_d_file": "d2.pt"}, {"local_discriminator_file", "epochs"})
