"""Options as a command line gives them: ``--resume true`` reaches a config as the text ``"true"``."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from ..utils.errors import running_call
from .hyperparameters import Rule, TrainingOptions, _is_int, _is_number, as_flag, closest_name

__all__ = ["OPTION_RULES", "as_flag", "check_command_line", "defined_ids", "running_workflow"]

# ``as_flag`` (a switch given as command-line text) lives beside the options it reads, in
# :mod:`custom_components.config.hyperparameters`; configs call it as ``custom_components.config.options.as_flag``.


# --- the command line of `python -m monai.bundle run`, checked before any work -------------------------------------

#: keyword arguments of ``monai.bundle.scripts.run`` / ``ConfigWorkflow`` that are not config ids
_RUN_ARGUMENTS = {"workflow_type", "workflow_name", "properties_path", "config_file", "meta_file", "logging_file",
                  "tracking", "run_id", "init_id", "final_id", "args_file"}
#: training options whose values are checked on the command line, before any work (their rules are those of
#: :class:`custom_components.config.hyperparameters.TrainingOptions`, the one place a training option's range is written)
_TRAINING_OPTIONS_CHECKED = ("epochs", "batch_size", "samples_per_volume", "val_interval", "gp_interval",
                             "error_interval", "seed", "spatial_dims", "lr_g", "lr_global_critic", "lr_local_discriminator", "lr_error_head",
                             "tumour_weight", "error_weight")
#: what each checked option must be: (test, expected); checked wherever the running config defines the id
OPTION_RULES: dict[str, tuple] = {
    **{name: TrainingOptions.rule(name) for name in _TRAINING_OPTIONS_CHECKED},
    "log_every": Rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "sw_batch_size": Rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_workers": Rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "cache_rate": Rule(lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
}


def running_workflow() -> Any:
    """The ``monai.bundle.ConfigWorkflow`` whose config is being evaluated by the caller, or None."""
    from monai.bundle import ConfigWorkflow

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigWorkflow):
            return owner
        frame = frame.f_back
    return None


def defined_ids(config_files: Any, tracking: Any = None) -> set[str]:
    """The ids the config files (and the tracking settings, if any) define at their top level, plus ``_meta_``."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS
    from monai.utils import ensure_tuple

    ids = {"_meta_"}
    for file in ensure_tuple(config_files):
        ids |= {re.split(r"#|::", key)[0] for key in ConfigParser.load_config_file(str(file))}
    if tracking:
        settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else tracking
        if isinstance(settings, str) or settings is None:
            settings = ConfigParser.load_config_files(tracking)
        ids |= set(settings.get("configs", {}))
    return ids


def _closest(name: str, candidates: set[str]) -> str:
    close = closest_name(name, candidates)
    return f" (did you mean --{close}?)" if close else ""


def check_command_line(rules: dict[str, tuple] | None = None) -> None:
    """Refuse, before any work, a ``python -m monai.bundle run`` command line the configs cannot honour.

    Called first in ``initialize`` and again first in ``run`` (so it holds even when a stray positional word
    became the ``init_id`` and ``initialize`` was skipped). It refuses, with one line each:

    - an ``init_id`` or ``final_id`` the configs do not define (a stray word, or an unquoted list such as
      ``--patch_size [32, 32]``, which the shell splits into two words);
    - an option (``--name value``) that no loaded config file defines, naming the closest defined id
      (``--betta`` would otherwise be echoed and ignored);
    - a value of the wrong type or range for the options of :data:`OPTION_RULES` (``--epochs ten``,
      ``--patch_size 96``, ``--lr_g -0.1``), and a ``patch_size`` that is not ``spatial_dims`` positive integers.

    Outside ``monai.bundle run`` (a ``ConfigParser`` in a script or test) only the values are checked.
    """
    rules = OPTION_RULES if rules is None else rules
    workflow = running_workflow()
    parser = getattr(workflow, "parser", None)
    cli = running_call("run", "monai.bundle.scripts")
    if workflow is not None and cli is not None:
        for which in ("init_id", "final_id"):
            given = getattr(workflow, which, None)
            if given is not None and given not in parser:
                raise ValueError(
                    f"{which} {given!r} is not defined by the configs: a stray word on the command line? (lists "
                    f"must be quoted: --patch_size \"[32, 32]\"); the workflow ids are "
                    f"{', '.join(i for i in ('initialize', 'run', 'training', 'inferring', 'evaluating', 'finalize') if i in parser)}.")
        overrides = dict(cli.get("override") or {})
        if cli.get("args_file"):
            from monai.bundle import ConfigParser

            overrides.update(ConfigParser.load_config_file(str(cli["args_file"])))
        defined = defined_ids(cli.get("config_file") or (), cli.get("tracking"))
        unknown = [k for k in overrides if k not in _RUN_ARGUMENTS and re.split(r"#|::", str(k))[0] not in defined]
        if unknown:
            raise ValueError("; ".join(f"--{k} is not an option of these configs{_closest(str(k), defined)}"
                                       for k in unknown) + ".")
    if parser is None:
        return
    values = {name: parser.get_parsed_content(name) for name in (*rules, "patch_size") if name in parser}
    for name, value in values.items():
        if name not in rules:
            continue
        test, expected = rules[name]
        if not test(value):
            raise ValueError(f"--{name} {value!r}: expected {expected}.")
    if "patch_size" in values and "spatial_dims" in values:
        size, dims = values["patch_size"], values["spatial_dims"]
        if not isinstance(size, (list, tuple)) or len(size) != dims or not all(_is_int(s) and s >= 1 for s in size):
            example = json.dumps([96] * dims)
            raise ValueError(f"--patch_size {size!r}: expected a list of {dims} integers >= 1 (spatial_dims {dims}), "
                             f"quoted on the command line: --patch_size \"{example}\".")
