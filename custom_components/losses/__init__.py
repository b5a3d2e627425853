"""Floor 1: the method's losses (Eq. 2-7): the confidence map, the difficulty-aware weight, the gradient penalty.

A module here imports only from this group and the groups below it:
utils.
"""

from __future__ import annotations

from . import synthesis

__all__ = ['synthesis']
