"""Floor 4: dictionary transforms: intensity windows, sampling weights and tables, fused patch crops.

A module here imports only from this group and the groups below it:
utils, losses, config, networks.
"""

from __future__ import annotations

from . import dictionary, patches, confidence

__all__ = ['confidence', 'dictionary', 'patches']
