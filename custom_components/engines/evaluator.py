"""The bundle's evaluator: MONAI's ``SupervisedEvaluator`` with the output keys of the rest of the bundle.

``SupervisedEvaluator`` returns ``{"image": X, "label": Y, "pred": G(X)}``: in a segmentation bundle the label is the
target. In this bundle the batch already holds a ``label``, the tumour labels, so one word would mean two things in
the same config (a tumour metric reads the target from the output and the tumour labels from the batch).
:class:`SynthesisEvaluator` returns the images under the batch's names instead, ``source``, ``target`` and ``pred``
(:class:`~custom_components.engines.events.DualAttentionKeys`, the trainer's keys), so metrics read
``from_engine(["pred", "target"])``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from monai.engines import IterationEvents, SupervisedEvaluator
from monai.utils.enums import CommonKeys

from .events import DualAttentionKeys

__all__ = ["SynthesisEvaluator"]

#: MONAI's output key -> the bundle's
_RENAMED = {str(CommonKeys.IMAGE.value): str(DualAttentionKeys.SOURCE.value),
            str(CommonKeys.LABEL.value): str(DualAttentionKeys.TARGET.value)}


class SynthesisEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose iteration output holds ``source``, ``target`` and ``pred`` (see the module doc).

    Takes the arguments of ``monai.engines.SupervisedEvaluator``. The keys are renamed as soon as the network has
    run (``IterationEvents.FORWARD_COMPLETED``), before MONAI decollates the output and applies the postprocessing
    (both at ``MODEL_COMPLETED``), so the postprocessing, the metrics and every other handler see the bundle's names.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_event_handler(IterationEvents.FORWARD_COMPLETED, _rename_output)


def _rename_output(engine: SupervisedEvaluator) -> None:
    output = engine.state.output
    if isinstance(output, MutableMapping):
        for key in [k for k in output if str(k) in _RENAMED]:
            output[_RENAMED[str(key)]] = output.pop(key)
