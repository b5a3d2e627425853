"""The bundle's training options for a user of the Python API: every option's one default, read from ``train.json``.

The bundle writes each hyperparameter once, as a top-level id of ``configs/train.json`` (the model-zoo convention);
Python restates none of them (:class:`~custom_components.config.hyperparameters.TrainingOptions`). A script or a
notebook that builds the trainer itself takes them from there::

    from custom_components import DualAttentionTrainer, bundle_options

    options = bundle_options(overlays=["paper.json"], attention_warmup=0, adversarial_warmup=0)
    trainer = DualAttentionTrainer(device, epochs, loader, g, g_opt, global_critic=d1, global_optimizer=d1_opt,
                                   local_discriminator=d2, local_optimizer=d2_opt, **options.trainer_kwargs())

``train.json`` leaves the two warm-ups null (they follow from the start fractions and the data set's size, which
:class:`custom_components.engines.schedules.PhaseSchedule` resolves); a caller of the trainer gives them in
iterations, as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hyperparameters import TrainingOptions
from .paths import bundle_root, config_files

__all__ = ["bundle_options"]


def bundle_options(overlays: Sequence[str] = (), root: str | None = None, **overrides: Any) -> TrainingOptions:
    """The training options of the bundle's ``train.json``, merged with ``overlays`` (file names in its ``configs``
    folder, e.g. ``"paper.json"``, ``"3d.json"``; or paths) and then ``overrides`` (option name -> value), checked.

    Args:
        overlays: config files merged over train.json, in order, as ``--config_file`` would merge them.
        root: the bundle folder (default: :func:`custom_components.config.paths.bundle_root`).
        overrides: options to set; a name that is not an option is refused, naming the closest one.

    Raises:
        FileNotFoundError: an overlay that is not there (named, with the folder searched).
        ValueError: a bad value or an unknown option (named, with what was expected).
    """
    from monai.bundle import ConfigParser  # monai.bundle is heavy; the options module stays light

    root = str(Path(root or bundle_root()).resolve())
    configs = Path(root) / "configs"
    files = list(config_files(root, "train"))
    for overlay in overlays:
        path = Path(overlay) if Path(overlay).is_file() else configs / overlay
        if not path.is_file():
            raise FileNotFoundError(f"overlay {overlay!r} not found (looked in {configs}).")
        files.append(str(path))
    TrainingOptions.from_mapping(overrides)  # names and values checked before the configs are evaluated
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = root
    values = {name: parser.get_parsed_content(name) for name in TrainingOptions.names()
              if name in parser and name not in overrides}
    return TrainingOptions.from_mapping({**values, **overrides})
