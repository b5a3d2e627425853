"""Floor 2: the options: the validated training options object, command-line checks, the bundle's paths, and the bundle's
options (train.json's values) for the Python API.

A module here imports only from this group and the groups below it:
utils, losses.
"""

from __future__ import annotations

from . import bundle_options, hyperparameters, options, paths

__all__ = ['bundle_options', 'hyperparameters', 'options', 'paths']
