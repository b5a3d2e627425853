"""Floor 10, the top: applications standing on the floors below: the phantom, data preparation and preprocessing,
inference, evaluation, the MONAI Label task.

A module here imports only from this group and the groups below it:
utils, losses, config, networks, transforms, data, inferers, metrics, engines, handlers.
"""

from __future__ import annotations

from . import phantom, phantom_dataset, prepare, preprocess, inference, evaluation, label_task, writers, splits, phantom_tissues

__all__ = ['evaluation', 'inference', 'label_task', 'phantom', 'phantom_dataset', 'phantom_tissues', 'prepare', 'preprocess', 'splits', 'writers']
