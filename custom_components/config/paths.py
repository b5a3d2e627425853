"""Where the bundle is: ``bundle_root`` and default data folders that do not depend on the working directory.

The same configs run from the repository root (``--config_file bundle/configs/train.json``), from inside the bundle
folder (``--config_file configs/train.json``, the model-zoo convention) and from an unzipped release. ``bundle_root``
is therefore not a fixed string but follows the bundle's location, found in this order:

1. the config folder of the running MONAI workflow (``ConfigWorkflow``), with the rule MONAI itself uses when it puts
   the bundle root on ``sys.path``: the parent of a folder named ``configs``;
2. otherwise (a plain ``ConfigParser``), the location of this package: the folder holding ``configs/metadata.json``
   next to it (a release, where the package is copied into the bundle), or ``bundle/`` of the source checkout;
3. otherwise the working directory (or its ``bundle/`` folder when it has one).

An explicit ``--bundle_root`` on the command line (MONAI Label sets it) overrides all of this.
"""

from __future__ import annotations

import os
from pathlib import Path

from .options import running_workflow

__all__ = ["WORKFLOW_CONFIGS", "bundle_root", "config_files", "default_data_dir", "is_source_checkout"]

#: the config files each workflow merges, in order: evaluation and inference are overlays on train.json, which holds
#: the definitions all three share (networks, inferer, data set, intensity settings), so each is written once
WORKFLOW_CONFIGS = {
    "train": ("train.json",),
    "evaluate": ("train.json", "evaluate.json"),
    "infer": ("inference.json",),
}

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def _has_configs(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def _workflow_config_root() -> Path | None:
    """The ``config_root_path`` of the ``monai.bundle.ConfigWorkflow`` evaluating the caller, if any."""
    root = getattr(running_workflow(), "config_root_path", None)
    return Path(root) if root is not None else None


def bundle_root() -> str:
    """Absolute path of the bundle folder (the one holding ``configs/``, ``models/``, ``docs/``); see the module doc."""
    config_root = _workflow_config_root()
    if config_root is not None:
        root = config_root.parent if config_root.name == "configs" else config_root
        return str(root.resolve())
    if _has_configs(_PACKAGE_PARENT):
        return str(_PACKAGE_PARENT)
    if _has_configs(_PACKAGE_PARENT / "bundle"):
        return str(_PACKAGE_PARENT / "bundle")
    cwd = Path.cwd()
    return str(cwd / "bundle") if _has_configs(cwd / "bundle") else str(cwd)


def is_source_checkout(root: str | os.PathLike) -> bool:
    """True when ``root`` is the ``bundle/`` folder of this project's source tree (not an exported release)."""
    parent = Path(root).resolve().parent
    return (parent / "custom_components" / "__init__.py").is_file() and (parent / "setup.cfg").is_file()


def default_data_dir(root: str | os.PathLike, name: str) -> str:
    """Default folder of data set ``name``: ``<repository>/data/<name>`` in a source checkout, else ``<bundle>/data/<name>``.

    Either way it is fixed by the bundle's location, not by the working directory.
    """
    root = Path(root).resolve()
    base = root.parent if is_source_checkout(root) else root
    return str(base / "data" / name)


def config_files(root: str | os.PathLike, workflow: str = "infer") -> list[str]:
    """Paths of the config files ``workflow`` (a key of :data:`WORKFLOW_CONFIGS`) merges, in ``<root>/configs``."""
    if workflow not in WORKFLOW_CONFIGS:
        raise ValueError(f"workflow must be one of {sorted(WORKFLOW_CONFIGS)}, got {workflow!r}.")
    return [str(Path(root) / "configs" / name) for name in WORKFLOW_CONFIGS[workflow]]
