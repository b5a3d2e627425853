"""Floor 9: handlers: training handlers, checkpointing and resume, run folders.

A module here imports only from this group and the groups below it:
utils, losses, config, networks, transforms, data, inferers, metrics, engines.
"""

from __future__ import annotations

from . import training, checkpointing, runs

__all__ = ['checkpointing', 'runs', 'training']
