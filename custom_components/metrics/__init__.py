"""Floor 7: metrics: masked regression metrics and the confidence map's quality as an error detector.

A module here imports only from this group and the groups below it:
utils, losses, config, networks, transforms, data, inferers.
"""

from __future__ import annotations

from . import synthesis

__all__ = ['synthesis']
