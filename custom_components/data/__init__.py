"""Floor 5: data: readers, datalist checks, the memory-budgeted cache.

A module here imports only from this group and the groups below it:
utils, losses, config, networks, transforms.
"""

from __future__ import annotations

from . import readers, caching, datalist, shapes

__all__ = ['caching', 'datalist', 'readers', 'shapes']
