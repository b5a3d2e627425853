"""The trainer's non-finite guard: no weight is updated from a NaN/inf loss, and a diverged network stops the run."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events

__all__ = ["NonFiniteGuard", "nonfinite_tensors"]


def nonfinite_tensors(net: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``net`` holding NaN/inf (one device sync)."""
    named = [(n, t) for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_floating_point()]
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named], float("inf"))
    flags = torch.isfinite(torch.stack([n.float() for n in norms]))
    if bool(flags.all()):
        return []
    return [named[i][0] for i in (~flags).nonzero().flatten().tolist()]


class NonFiniteGuard:
    """Stop training with a ``FloatingPointError`` at the first NaN/inf, naming the iteration, what held it and the
    networks already updated in that iteration (whose weights in memory then differ from any checkpoint).

    The trainer calls :meth:`check_loss` on every loss term before the optimizer step it feeds, so no weight is
    updated from it, and :meth:`check_update` after every optimizer step, which also catches a network that diverged
    with finite losses (e.g. an infinite running variance of a batch-norm layer). :meth:`attach` starts each
    iteration with no network updated.

    Args:
        enabled: check at all (``False``: the checks do nothing; the record of updated networks is still kept).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self.updated: list[str] = []  # the networks updated so far in the current iteration, in order

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.reset)

    def reset(self, engine: Engine | None = None) -> None:
        self.updated = []

    def check_loss(self, engine: Engine, term: str, value: torch.Tensor) -> None:
        """Raise if the scalar loss term ``value`` (named ``term``) is NaN/inf."""
        if self.enabled and not math.isfinite(value.item()):
            raise FloatingPointError(
                f"{self._where(engine)}: loss term '{term}' is {value.item()}; training stopped before the update it "
                f"feeds. {self.note()}"
            )

    def check_update(self, engine: Engine, name: str, network: torch.nn.Module) -> None:
        """Record that ``network`` (named ``name``) was just updated, and raise if a parameter or buffer of it is
        NaN/inf."""
        if name not in self.updated:
            self.updated.append(name)
        if not self.enabled:
            return
        bad = nonfinite_tensors(network)
        if bad:
            raise FloatingPointError(
                f"{self._where(engine)}: after the update of {name}, {len(bad)} of its parameters/buffers hold NaN/inf "
                f"(first: {', '.join(bad[:3])}); training stopped. {self.note()}"
            )

    def note(self) -> str:
        """What the error message says about the weights: which networks already stepped, and how to go on."""
        if not self.updated:
            return "No network was updated in this iteration; all keep the weights of the previous iteration."
        return (f"Already updated in this iteration: {', '.join(self.updated)}; the weights in memory are not saved. "
                "The last good weights are in the latest epoch checkpoint, if one was written (none in epoch 1): "
                "resume from it with a lower learning rate ('--resume true --apply_changes true --lr_g ...'), or "
                "start again with one.")

    @staticmethod
    def _where(engine: Engine) -> str:
        return f"iteration {engine.state.iteration} (epoch {engine.state.epoch})"
