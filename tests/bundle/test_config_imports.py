"""Every ``custom_components.<module>`` a config names must resolve after a bare ``import custom_components``.

An overlay's ``imports`` list replaces train.json's (MONAI merges configs key by key), so an overlay that did not
repeat ``$import custom_components.utils.tracking`` broke training with ``module 'custom_components' has no attribute
'tracking'`` (train.json + mrct.json, train.json + multi_gpu_train.json). The package loads sub-modules on access.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "bundle" / "configs").glob("*.json"))


def _referenced_modules() -> set[str]:
    names = set()
    for path in CONFIGS:
        names |= set(re.findall(r"custom_components\.([A-Za-z_]+)\.", path.read_text()))
    return names


def test_configs_name_modules():
    assert {"tracking", "data", "paths"} <= _referenced_modules()


def test_every_module_named_by_a_config_resolves_after_a_bare_package_import():
    modules = sorted(_referenced_modules())
    code = ("import custom_components\nfor name in %r:\n    print(getattr(custom_components, name).__name__)" % modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [f"custom_components.{m}" for m in modules]


def test_unknown_attribute_still_raises():
    import custom_components

    with pytest.raises(AttributeError, match="no_such_module"):
        custom_components.no_such_module  # noqa: B018


def test_multi_gpu_overlay_keeps_every_check_of_train_json():
    """The DDP overlay switches the process-group step of train.json's ``initialize`` on instead of restating the
    list, so every check train.json runs before work starts also runs under DDP, first of all joining the group."""
    train = json.loads((ROOT / "bundle" / "configs" / "train.json").read_text())
    multi = json.loads((ROOT / "bundle" / "configs" / "multi_gpu_train.json").read_text())
    assert "initialize" not in multi
    assert train["initialize"][0] == "@init_distributed" and train["init_distributed"]["_disabled_"] is True
    assert multi["init_distributed#_disabled_"] is False
