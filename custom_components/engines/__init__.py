"""Floor 8: engines: the dual-attention trainer, its phase schedule, the evaluator, distributed training.

A module here imports only from this group and the groups below it:
utils, losses, config, networks, transforms, data, inferers, metrics.
"""

from __future__ import annotations

from . import trainer, schedules, distributed, evaluator, events, gan_steps, guards, variants, penalty

__all__ = ['distributed', 'evaluator', 'events', 'gan_steps', 'guards', 'penalty', 'schedules', 'trainer', 'variants']
