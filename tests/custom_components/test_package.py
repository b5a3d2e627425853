from __future__ import annotations

import inspect
import sys
from pathlib import Path

import custom_components

PACKAGE = Path(custom_components.__file__).parent


def test_all_lists_every_public_name_the_package_defines():
    public = {name for name, value in vars(custom_components).items()
              if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"}
    assert sorted(custom_components.__all__) == sorted(public)


def test_each_exported_name_is_a_public_name_of_its_module():
    for name in custom_components.__all__:
        obj = getattr(custom_components, name)
        module = sys.modules[obj.__module__]
        assert name in module.__all__, f"{name} is exported by the package but not by {module.__name__}.__all__"


def test_star_import_gives_exactly_the_public_names():
    namespace: dict = {}
    exec("from custom_components import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(custom_components.__all__)


def test_groups_load_on_access():
    assert custom_components.engines.schedules.__name__ == "custom_components.engines.schedules"


def test_every_module_stands_in_a_group_and_loads_on_access():
    """No module stands flat beside the groups, every group is listed in ``_GROUPS`` (configs name modules through
    it: an overlay may drop their import), and each group's ``__init__`` imports every one of its modules."""
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert flat == []
    groups = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert groups == sorted(custom_components._GROUPS)
    for group in groups:
        package = getattr(custom_components, group)
        modules = sorted(p.stem for p in (PACKAGE / group).glob("*.py") if p.stem != "__init__")
        assert sorted(package.__all__) == modules
        assert all(inspect.ismodule(getattr(package, m)) for m in modules)
