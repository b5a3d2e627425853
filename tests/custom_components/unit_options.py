"""The training options unit tests build a trainer with.

The trainer's options have no Python default (their one default is train.json's top-level id), so a unit test
states its own: these are Eq. 2-7 as the paper writes them, at the smallest cost (no warm-ups, F as given, the
penalty at every critic step, one critic and one local update per iteration, fp32). A test changes what it tests
with ``trainer_options(name=value)``.
"""

from __future__ import annotations

from typing import Any

UNIT_OPTIONS: dict[str, Any] = {
    "beta": 2.0, "p": 1, "lambda_gp": 10.0, "lambda_adv_global": 0.01, "lambda_adv_local": 0.05, "n_critic": 1,
    "attention_warmup": 0, "attention_norm": "none", "attention_floor": 0.0, "adversarial_warmup": 0,
    "local_conditional": False, "fresh_batches": "none", "attention_source": "confidence", "local_target": "binary",
    "n_local": 1, "local_mix_cell": 16, "attention_smoothing": 0.0, "local_ema": 0.0, "precision": "fp32",
    "gp_interval": 1,
}


def trainer_options(**overrides: Any) -> dict[str, Any]:
    """:data:`UNIT_OPTIONS` with ``overrides``, as keyword arguments of ``DualAttentionTrainer``."""
    return {**UNIT_OPTIONS, **overrides}
