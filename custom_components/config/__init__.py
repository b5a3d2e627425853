"""Floor 2: the options: the validated training options object, command-line checks, the bundle's paths.

A module here imports only from this group and the groups below it:
utils, losses.
"""

from __future__ import annotations

from . import hyperparameters, options, paths

__all__ = ['hyperparameters', 'options', 'paths']
