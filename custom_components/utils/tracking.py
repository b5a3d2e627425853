"""Experiment tracking (``--tracking mlflow`` or ``--tracking configs/mlflow_settings.json``) for the synthesis trainer.

MONAI's tracking handlers expect a trainer's ``engine.state.output`` in MONAI's decollated form, a list of per-sample
dicts in which the loss is replicated (the stock MLflow settings read it with
``from_engine(['loss'], first=True)``). :class:`~custom_components.DualAttentionTrainer` keeps one dict per batch
(plain-float loss terms and batch tensors), which the bundle's own handlers read. :func:`with_tracking` adapts each
``MLFlowHandler`` of the trainer to that form at its boundary, and gives it the run's hyperparameters and the best
model folder as artifacts, so both MONAI's stock settings and the shipped ones record a complete run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["as_decollated", "with_tracking"]


def as_decollated(output: Any) -> Any:
    """The trainer's per-batch dict as MONAI's decollated output (a one-item list); other forms unchanged."""
    return [output] if isinstance(output, Mapping) else output


def _reads_decollated(transform: Callable) -> Callable:
    def read(output: Any) -> Any:
        return transform(as_decollated(output))

    return read


def with_tracking(handlers: Sequence[Any], params: Mapping[str, Any] | None = None,
                  artifacts: Sequence[str] = ()) -> list[Any]:
    """The trainer's handler list, with every ``MLFlowHandler`` in it adapted to the trainer's output.

    Each such handler reads the output in MONAI's decollated form (see the module doc), logs ``params`` (unless it
    was given its own ``experiment_param``) and, when the run completes, also logs ``artifacts`` (files or folders,
    e.g. the best-model folder). Other handlers are returned unchanged; without tracking this is the identity.
    """
    from monai.handlers import MLFlowHandler

    out = list(handlers)
    for handler in out:
        if not isinstance(handler, MLFlowHandler):
            continue
        handler.output_transform = _reads_decollated(handler.output_transform)
        if not handler.experiment_param and params:
            handler.experiment_param = {str(k): v for k, v in params.items()}
        handler.artifacts = tuple(a for a in handler.artifacts if a) + tuple(str(a) for a in artifacts)
    return out
