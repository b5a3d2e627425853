"""Floor 6: inferers: whole-slice inference of a 2D network over a volume.

A module here imports only from this group and the groups below it:
utils, losses, config, networks, transforms, data.
"""

from __future__ import annotations

from . import inferer

__all__ = ['inferer']
