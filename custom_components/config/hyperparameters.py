"""The training options of the bundle, as one validated object (issue 20, item 1).

:class:`TrainingOptions` is the single source of every training option's type and allowed range or choice; each
option's one default is its top-level id in ``train.json`` (none is restated in Python, see the class). The trainer
(:class:`custom_components.engines.trainer.DualAttentionTrainer`) validates its options through it, ``validate_hyperparameters`` (train.json's
``check_options``) builds it from train.json's ``run_options`` (the options written to ``run_config.json`` and sent
to MLflow), and the command-line check takes its rules for training options from it
(:data:`custom_components.config.options.OPTION_RULES`). Unknown keys are refused, naming the closest option. The run
record (``run_config.json``) and the resume comparison store each option as this object stores it
(:func:`normalised_options`), and the ablation, the tuner and the benchmark check their overrides with its rules
before any run (:func:`check_overrides`).

This module stands on the ground floor: it imports the standard library, ``monai.utils`` and the two enums of
:mod:`custom_components.losses.synthesis`, and nothing that imports the trainer.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from monai.utils import StrEnum, str2bool

from ..losses.synthesis import AttentionNorm, AttentionSource

__all__ = [
    "CONFIG_VALUE", "PRECISIONS", "FreshBatches", "LocalTarget", "Rule", "TRAINER_OPTIONS", "TrainingOptions", "Variant", "as_flag",
    "RENAMED", "check_overrides", "closest_name", "normalised_options",
]


class Variant(StrEnum):
    """Model variants compared in the paper (section 3.1-3.2)."""

    UNET = "unet"  # G with the plain L1/L2 loss only
    GLOBAL = "global"  # sGAN-1: G + global critic D1
    LOCAL = "local"  # sGAN-2: G + local discriminator D2
    DUAL = "dual"  # sGAN-dual: both discriminators, plain L1/L2
    DUAL_ATTENTION = "dual_attention"  # the full method: both discriminators + difficulty-aware attention
    ERROR_WEIGHTED = "error_weighted"  # G alone, voxel loss weighted by F from the error |Y - G(X)| (focal-style L1)


class FreshBatches(StrEnum):
    """Which updates of one iteration draw their own mini-batch from the training loader."""

    NONE = "none"  # one batch and one G(X) for every update (cheapest)
    GENERATOR = "generator"  # the paper (section 2.2): G is updated "using another mini-batch"
    ALL = "all"  # additionally, every critic update after the first uses a fresh batch


class LocalTarget(StrEnum):
    """What the local discriminator D2 is trained to output (Eq. 4 and an option beyond the paper)."""

    BINARY = "binary"  # the paper: 1 on every voxel of Y, 0 on every voxel of G(X)
    # additionally a per-voxel composite of Y and G(X) under a random mask, whose voxels D2 must label (as in
    # U-Net GAN, Schoenfeld et al., CVPR 2020): D2 cannot answer from global cues, only from what each region shows
    MIXED = "mixed"


#: the numeric precisions the trainer trains in (``fp16`` needs CUDA)
PRECISIONS = ("fp32", "bf16", "fp16")

# --- what a value may be ---------------------------------------------------------------------------------------------

#: words a switch may be given as that ``monai.utils.str2bool`` does not know (it takes yes/true/t/y/1, no/false/f/n/0):
#: on/off, and an empty or null value (a switch left unset on the command line) as false
_FLAG_WORDS = {"on": "true", "off": "false", "none": "false", "null": "false", "": "false"}


def as_flag(value: bool | str | int | None, name: str = "flag") -> bool:
    """A boolean config option given as a bool or as the text a command line passes (``true``/``false``, ``1``/``0``).

    ``python -m monai.bundle run ... --resume true`` hands the config the string ``"true"``; a bare string would
    always be truthy, so configs read their switches through this function (as ``custom_components.config.options.as_flag``).
    The words are those of ``monai.utils.str2bool``, plus ``on``/``off`` and an empty or null value (false); anything
    else is a ``ValueError`` naming the option ``name``.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()  # str2bool neither strips nor takes numbers
    text = _FLAG_WORDS.get(text, text)
    try:
        return str2bool(text, raise_exc=True)
    except ValueError:  # str2bool's message does not say which option was wrong
        raise ValueError(f"{name} must be true or false, got {value!r}.") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_flag(value: Any) -> bool:
    try:
        as_flag(value)
    except ValueError:
        return False
    return True


class Rule(NamedTuple):
    """What an option's value must be: ``test(value)`` is true for the allowed values, ``expected`` says which."""

    test: Callable[[Any], bool]
    expected: str


def _choice(enum: type[StrEnum]) -> Rule:
    def test(value: Any) -> bool:
        try:
            enum(value)
        except (ValueError, TypeError):
            return False
        return True

    return Rule(test, f"one of {[e.value for e in enum]}")


def _ints() -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and len(v) >= 1 and all(_is_int(s) and s >= 1 for s in v),
                "a list of integers >= 1")


_POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_POSITIVE_NUMBER = Rule(lambda v: _is_number(v) and v > 0, "a number > 0")
_NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, "a number >= 0")
_FRACTION = Rule(lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
_FLAG = Rule(_is_flag, "true or false")
_BETAS = Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1)")


def _warmup(start: str) -> Rule:
    return Rule(lambda v: v is None or (_is_int(v) and v >= 0), f"an integer >= 0 (or null: from {start})")


class _ConfigValue:
    """An option's default: its top-level id in ``train.json`` (a ``TrainingOptions`` built without it holds this)."""

    _instance = None

    def __new__(cls) -> _ConfigValue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<train.json's value>"


#: the marker of an option left to train.json (see :class:`_ConfigValue`)
CONFIG_VALUE = _ConfigValue()


def _option(default: Any, rule: Rule | None = None, convert: Callable[[Any, str], Any] | None = None,
            trainer: bool = False) -> Any:
    """A field of :class:`TrainingOptions`: its ``default``, its ``rule`` (None: checked where it is used), how a
    valid value is stored (``convert(value, name)``, e.g. a string to its enum) and whether the trainer takes it."""
    return dataclasses.field(default=default, metadata={"rule": rule, "convert": convert, "trainer": trainer})


def _trainer(rule: Rule, convert: Callable[[Any, str], Any] | None = None) -> Any:
    """A field of :class:`TrainingOptions` that is also a keyword argument of the trainer (its default: train.json's)."""
    return _option(CONFIG_VALUE, rule, convert, trainer=True)


def _to_float(value: Any, _: str) -> float:
    return float(value)


def _to_enum(enum: type[StrEnum]) -> Callable[[Any, str], StrEnum]:
    return lambda value, _: enum(value)


# --- the options -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Every training option with its default, type and allowed range or choice, checked when the object is built.

    **Defaults.** Each option has one default, written once: the value of its top-level id in the bundle's
    ``train.json`` (the model-zoo convention: the hyperparameters on top, where users read and override them). No
    value is restated here: a field built without its value holds :data:`CONFIG_VALUE` (left out of :meth:`as_dict`
    and of the checks), and the Python components that take a method hyperparameter (the trainer, the phase
    schedule, the error-weighted sampling) take it without a default. A user of the Python API gets the bundle's
    values from :func:`custom_components.config.bundle_options.bundle_options` (``overlays=["paper.json"]`` for the
    paper's method) and the trainer's keyword arguments from :meth:`trainer_kwargs`.

    **Checks.** Building the object (``TrainingOptions(...)`` or :meth:`from_mapping`) checks every field's value
    against its :class:`Rule` and raises a ``ValueError`` naming the option, the value found and what was expected;
    enum options are stored as their enums, switches as bools, real-valued options as floats. Fields without a rule
    are checked where they are used (networks, optimisers, schedule). :meth:`from_mapping` also refuses unknown keys,
    naming the closest option.
    """

    # options of the trainer (DualAttentionTrainer's keyword arguments)
    variant: Variant = _trainer(_choice(Variant), _to_enum(Variant))
    beta: float = _trainer(_NON_NEGATIVE, _to_float)
    p: int = _trainer(Rule(lambda v: _is_int(v) and v in (1, 2), "1 or 2"))
    lambda_gp: float = _trainer(_NON_NEGATIVE, _to_float)
    lambda_adv_global: float = _trainer(_NON_NEGATIVE, _to_float)
    lambda_adv_local: float = _trainer(_NON_NEGATIVE, _to_float)
    n_critic: int = _trainer(_POSITIVE_INT)
    attention_warmup: int | None = _trainer(_warmup("attention_start"))
    attention_norm: AttentionNorm = _trainer(_choice(AttentionNorm), _to_enum(AttentionNorm))
    attention_floor: float = _trainer(_FRACTION, _to_float)
    adversarial_warmup: int | None = _trainer(_warmup("adversarial_start"))
    local_conditional: bool = _trainer(_FLAG, as_flag)
    fresh_batches: FreshBatches = _trainer(_choice(FreshBatches), _to_enum(FreshBatches))
    attention_source: AttentionSource = _trainer(_choice(AttentionSource), _to_enum(AttentionSource))
    local_target: LocalTarget = _trainer(_choice(LocalTarget), _to_enum(LocalTarget))
    n_local: int = _trainer(_POSITIVE_INT)
    local_mix_cell: int = _trainer(Rule(_POSITIVE_INT.test, "an integer >= 1 (voxels)"))
    attention_smoothing: float = _trainer(Rule(_NON_NEGATIVE.test, "a number >= 0 (voxels)"), _to_float)
    local_ema: float = _trainer(Rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1) (0 = off)"), _to_float)
    precision: str = _trainer(Rule(lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}"))
    gp_interval: int = _trainer(_POSITIVE_INT)

    # options the config consumes: their one default is train.json's value (CONFIG_VALUE here)
    epochs: int = _option(CONFIG_VALUE, _POSITIVE_INT)
    val_interval: int = _option(CONFIG_VALUE, _POSITIVE_INT)
    seed: int = _option(CONFIG_VALUE, Rule(_is_int, "an integer"))
    spatial_dims: int = _option(CONFIG_VALUE, Rule(lambda v: _is_int(v) and v in (2, 3), "2 or 3"))
    patch_size: tuple = _option(CONFIG_VALUE, _ints())
    batch_size: int = _option(CONFIG_VALUE, _POSITIVE_INT)
    samples_per_volume: int = _option(CONFIG_VALUE, _POSITIVE_INT)
    datalist: str | None = _option(CONFIG_VALUE)  # train.json: <dataset_dir>/datalist.json, checked when it is read
    tumour_weight: float = _option(CONFIG_VALUE, _NON_NEGATIVE)
    hard_sampling: bool = _option(CONFIG_VALUE, _FLAG, as_flag)
    error_weight: float = _option(CONFIG_VALUE, _NON_NEGATIVE)
    error_interval: int = _option(CONFIG_VALUE, _POSITIVE_INT)
    lr_g: float = _option(CONFIG_VALUE, _POSITIVE_NUMBER)
    lr_global_critic: float = _option(CONFIG_VALUE, _POSITIVE_NUMBER)
    lr_local_discriminator: float = _option(CONFIG_VALUE, _POSITIVE_NUMBER)
    lr_error_head: float = _option(CONFIG_VALUE, _POSITIVE_NUMBER)
    betas_g: tuple = _option(CONFIG_VALUE, _BETAS)
    betas_global_critic: tuple = _option(CONFIG_VALUE, _BETAS)
    betas_local_discriminator: tuple = _option(CONFIG_VALUE, _BETAS)
    lr_schedule: str = _option(CONFIG_VALUE)  # checked by custom_components.engines.schedules.IterationLrSchedule
    adversarial_start: float = _option(CONFIG_VALUE)  # both checked by custom_components.engines.schedules.PhaseSchedule
    attention_start: float = _option(CONFIG_VALUE)
    select_after_warmup: bool = _option(CONFIG_VALUE, _FLAG, as_flag)
    selection_metric: str = _option(CONFIG_VALUE)  # checked by custom_components.engines.schedules.check_selection_metric
    pretrained_generator: str | None = _option(CONFIG_VALUE)
    generator_channels: tuple = _option(CONFIG_VALUE, _ints())
    critic_norm: Any = _option(CONFIG_VALUE)  # the three checked by custom_components.networks.nets.GlobalCritic
    critic_downsample: str = _option(CONFIG_VALUE)
    critic_act: Any = _option(CONFIG_VALUE)
    local_channels: tuple = _option(CONFIG_VALUE, _ints())
    local_stem_stride: int = _option(CONFIG_VALUE, _POSITIVE_INT)
    error_head: bool = _option(CONFIG_VALUE, _FLAG, as_flag)
    error_head_channels: tuple = _option(CONFIG_VALUE, _ints())
    error_head_stem_stride: int = _option(CONFIG_VALUE, _POSITIVE_INT)
    metric_range: float = _option(CONFIG_VALUE, _POSITIVE_NUMBER)

    def __post_init__(self) -> None:
        for name in self.names():
            object.__setattr__(self, name, self.check(name, getattr(self, name)))
        if self.variant == Variant.ERROR_WEIGHTED and self.attention_source in (AttentionSource.GAP,
                                                                                AttentionSource.PREDICTED):
            raise ValueError(f"variant 'error_weighted' always weights by the error; attention_source "
                             f"{self.attention_source.value!r} is for the variants with a local discriminator.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names of every option, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check(cls, name: str, value: Any) -> Any:
        """``value`` as option ``name`` stores it (an enum, a bool, a float), after checking it against the option's
        rule; a ``ValueError`` naming the option, the value and what was expected otherwise."""
        f = cls._fields()[name]
        rule, convert = f.metadata["rule"], f.metadata["convert"]
        if value is CONFIG_VALUE:
            return value
        if rule is not None and not rule.test(value):
            raise ValueError(f"{name} must be {rule.expected}, got {value!r}.")
        return value if convert is None else convert(value, name)

    @classmethod
    def _fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def rule(cls, name: str) -> Rule | None:
        """The :class:`Rule` of option ``name`` (None: checked where it is used)."""
        return cls._fields()[name].metadata["rule"]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> TrainingOptions:
        """The options of ``mapping`` (e.g. train.json's ``run_options``, or a trainer's keyword arguments), checked.

        Missing options hold :data:`CONFIG_VALUE` (their default is train.json's). A key that is not an option raises a
        ``ValueError`` naming it, its value and the closest option (never dropped silently); so does a bad value.
        """
        names = cls.names()
        unknown = [k for k in mapping if k not in names]
        if unknown:
            def closest(key: str) -> str:
                close = closest_name(key, names)
                return f"did you mean {close!r}?" if close else "no option has a similar name"

            raise ValueError("; ".join(f"{k!r} (value {mapping[k]!r}) is not a training option: {closest(k)}"
                                       for k in unknown) + f" (expected one of the fields of {cls.__name__}).")
        return cls(**mapping)

    def trainer_kwargs(self) -> dict[str, Any]:
        """The trainer's options (:data:`TRAINER_OPTIONS`) as keyword arguments of
        :class:`custom_components.engines.trainer.DualAttentionTrainer`; a ``ValueError`` naming those left to
        train.json (build the options with ``bundle_options()`` to have them all)."""
        if missing := [name for name in TRAINER_OPTIONS if getattr(self, name) is CONFIG_VALUE]:
            raise ValueError(f"the trainer needs {', '.join(missing)}: give them, or take the bundle's values with "
                             "custom_components.bundle_options().")
        return {name: getattr(self, name) for name in TRAINER_OPTIONS}

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict (enums as their values), e.g. for a record or a tracker; options left to
        train.json (:data:`CONFIG_VALUE`) are left out."""
        return {name: (value.value if isinstance(value, StrEnum) else value)
                for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
                if value is not CONFIG_VALUE}


#: the options :class:`custom_components.engines.trainer.DualAttentionTrainer` takes as keyword arguments (a test keeps this
#: equal to the trainer's signature)
TRAINER_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainingOptions) if f.metadata["trainer"])


#: config ids renamed in version 0.4.0, so that each concept has one name (D1 is the global critic, D2 the local
#: discriminator): old -> new. A run recorded under the old names resumes (:func:`normalised_options`), and a check
#: of a name suggests the new one (:func:`closest_name`).
RENAMED: dict[str, str] = {
    "lr_d1": "lr_global_critic", "lr_d2": "lr_local_discriminator", "betas_d1": "betas_global_critic",
    "betas_d2": "betas_local_discriminator", "optimizer_d1": "global_critic_optimizer",
    "optimizer_d2": "local_discriminator_optimizer", "local_d_file": "local_discriminator_file",
    "local_d_path": "local_discriminator_path",
}


def closest_name(name: Any, candidates: Iterable[str]) -> str | None:
    """The name among ``candidates`` closest to ``name`` (``difflib``, similarity >= 0.6), for a "did you mean"; the
    new name of a renamed id (:data:`RENAMED`) first; or None. Every check of an option's name words its hint from
    this one choice."""
    if str(name) in RENAMED and RENAMED[str(name)] in set(candidates):
        return RENAMED[str(name)]
    close = difflib.get_close_matches(str(name), sorted(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def check_overrides(overrides: Mapping[str, Any], config_ids: Iterable[str] | None = None,
                    what: str = "override") -> dict[str, Any]:
    """``overrides`` (config id -> value, as a script passes them to ``python -m monai.bundle run``), checked before
    any work: a training option's value by its rule in :class:`TrainingOptions` (a ``ValueError`` naming the option,
    the value and what was expected), and, given ``config_ids``, every other key against the ids the configs define
    (naming the closest). A value holding ``{seed}`` is a per-seed template and is checked once it is filled in.
    Returns the overrides unchanged."""
    names = set(TrainingOptions.names())
    known = None if config_ids is None else set(config_ids) | names
    problems = []
    for key, value in overrides.items():
        base = re.split(r"#|::", str(key))[0]
        if base in names:
            if isinstance(value, str) and "{seed}" in value:
                continue
            try:
                TrainingOptions.check(base, value)
            except ValueError as e:
                problems.append(f"{what} {e}")
        elif known is not None and base not in known:
            close = closest_name(base, known)
            hint = f": did you mean {close!r}?" if close else ""
            problems.append(f"{what} {key!r} is not an option of the configs{hint}")
    if problems:
        raise ValueError("; ".join(problems))
    return dict(overrides)


def normalised_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with each training option's value as :class:`TrainingOptions` stores it (an enum as its value, a
    switch as a bool, a real number as a float), so that ``"false"`` and ``False``, or ``2`` and ``2.0``, compare
    equal; other keys, and a value its option's rule refuses, are kept as given (for a record and its comparison)."""
    names, out = set(TrainingOptions.names()), {}
    for key, value in options.items():
        key = RENAMED.get(key, key)  # a record written before the rename
        if key in names:
            try:
                value = TrainingOptions.check(key, value)
            except (ValueError, TypeError):
                pass
        out[key] = value.value if isinstance(value, StrEnum) else value
    return out
