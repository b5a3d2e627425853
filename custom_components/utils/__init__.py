"""Floor 0, the ground: process-wide error reporting, the raw-data folder layouts, experiment tracking.

A module here imports only from this group and the groups below it:
none: it is the ground floor.
"""

from __future__ import annotations

from . import checks, errors, layouts, tracking

__all__ = ['checks', 'errors', 'layouts', 'tracking']
