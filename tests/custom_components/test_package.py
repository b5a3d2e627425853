from __future__ import annotations

import inspect
import sys

import custom_components


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


def test_sub_modules_still_load_on_access():
    assert custom_components.schedules.__name__ == "custom_components.schedules"


def test_every_module_of_the_package_loads_on_access():
    """A new module must be listed in ``_SUBMODULES``, or configs naming it fail under overlays that drop its import."""
    from pathlib import Path

    files = {p.stem for p in Path(custom_components.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert sorted(files) == sorted(custom_components._SUBMODULES)
