"""Floor 3: the networks (global critic D1, local discriminator D2, error head) and the one weight loader.

A module here imports only from this group and the groups below it:
utils, losses, config.
"""

from __future__ import annotations

from . import weights, nets

__all__ = ['nets', 'weights']
