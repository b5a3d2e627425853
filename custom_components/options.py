"""Options as a command line gives them: ``--resume true`` reaches a config as the text ``"true"``."""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from typing import Any

from monai.utils import str2bool

__all__ = ["OPTION_RULES", "as_flag", "check_command_line", "running_workflow"]

#: words a switch may be given as that ``monai.utils.str2bool`` does not know (it takes yes/true/t/y/1, no/false/f/n/0):
#: on/off, and an empty or null value (a switch left unset on the command line) as false
_FLAG_WORDS = {"on": "true", "off": "false", "none": "false", "null": "false", "": "false"}


def as_flag(value: bool | str | int | None, name: str = "flag") -> bool:
    """A boolean config option given as a bool or as the text a command line passes (``true``/``false``, ``1``/``0``).

    ``python -m monai.bundle run ... --resume true`` hands the config the string ``"true"``; a bare string would
    always be truthy, so configs read their switches through this function. The words are those of
    ``monai.utils.str2bool``, plus ``on``/``off`` and an empty or null value (false); anything else is a
    ``ValueError`` naming the option ``name``.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()  # str2bool neither strips nor takes numbers
    text = _FLAG_WORDS.get(text, text)
    try:
        return str2bool(text, raise_exc=True)
    except ValueError:  # str2bool's message does not say which option was wrong
        raise ValueError(f"{name} must be true or false, got {value!r}.") from None


# --- the command line of `python -m monai.bundle run`, checked before any work -------------------------------------

#: keyword arguments of ``monai.bundle.scripts.run`` / ``ConfigWorkflow`` that are not config ids
_RUN_ARGUMENTS = {"workflow_type", "workflow_name", "properties_path", "config_file", "meta_file", "logging_file",
                  "tracking", "run_id", "init_id", "final_id", "args_file"}
#: what each checked option must be: (test, expected); checked wherever the running config defines the id
_POSITIVE_INT = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_POSITIVE_NUMBER = (lambda v: _is_number(v) and v > 0, "a number > 0")
OPTION_RULES: dict[str, tuple] = {
    "epochs": _POSITIVE_INT, "batch_size": _POSITIVE_INT, "samples_per_volume": _POSITIVE_INT,
    "val_interval": _POSITIVE_INT, "log_every": _POSITIVE_INT, "sw_batch_size": _POSITIVE_INT,
    "gp_interval": _POSITIVE_INT, "error_interval": _POSITIVE_INT,
    "num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "seed": (lambda v: _is_int(v), "an integer"),
    "spatial_dims": (lambda v: v in (2, 3) and _is_int(v), "2 or 3"),
    "cache_rate": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "lr_g": _POSITIVE_NUMBER, "lr_d1": _POSITIVE_NUMBER, "lr_d2": _POSITIVE_NUMBER, "lr_error_head": _POSITIVE_NUMBER,
    "tumour_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "error_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _running(function_name: str, module_name: str) -> dict | None:
    """Locals of the innermost call of ``module_name.function_name`` on the stack, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function_name and frame.f_globals.get("__name__") == module_name:
            return frame.f_locals
        frame = frame.f_back
    return None


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


def _defined_ids(config_files: Any, tracking: Any) -> set[str]:
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
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean --{close[0]}?)" if close else ""


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
    cli = _running("run", "monai.bundle.scripts")
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
        defined = _defined_ids(cli.get("config_file") or (), cli.get("tracking"))
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
